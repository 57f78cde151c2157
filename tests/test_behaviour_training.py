"""Training behaviours a test must see happen, not only their labels: the dtype bf16 autocast gives
the forward pass, the update that gradient clipping shortens, an early stop on the epoch its rule
names, and the same scheduler and stop decisions on every rank of a 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}

# fit() as train.py runs it, with one seam: the model the engine builds gets a forward hook on its head
# that records the dtype of the logits in training mode, and its initial parameters are saved.
FIT_SCRIPT = """
import json, sys
import torch
from safetensors.torch import save_file
import chexdist.training.engine as engine
from chexdist.config import load_config

out, overrides = sys.argv[1], sys.argv[2:]
seen, built = set(), engine.create_model

def create_model(*args, **kwargs):
    model = built(*args, **kwargs)
    model.get_classifier().register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)) if m.training else None)
    save_file({k: v.detach().clone().contiguous() for k, v in model.named_parameters()}, out + "-initial.safetensors")
    return model

engine.create_model = create_model
cfg = load_config("tiny", overrides=overrides)
records = []
result = engine.fit(cfg, out, report=records.append, progress=False)
rank = result.is_main_process and "0" or "1"
with open(f"{out}-rank{rank}.json", "w") as f:
    json.dump({"train_dtypes": sorted(seen), "lr": [r["lr"] for r in records], "epochs": result.epochs,
               "stopped_early": result.stopped_early, "auc": [r["val_auc_mean"] for r in records],
               "world_size": result.world_size}, f)
"""


def fit_script(tmp_path: Path) -> Path:
    script = tmp_path / "fit_hooked.py"
    script.write_text(FIT_SCRIPT)
    return script


def run_fit(tmp_path: Path, name: str, shards: Path, *sets: str, nproc: int = 1) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path / name
    cmd = [sys.executable, str(fit_script(tmp_path)), str(out), f"data.shards={shards}", *sets]
    if nproc > 1:
        cmd = [sys.executable, "-c", "import sys; from chexdist.training.launcher import run_workers; "
               f"sys.exit(run_workers({cmd!r}, {nproc}, cpu=True))"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def rank_report(out: Path, rank: int = 0) -> dict:
    return json.loads(Path(f"{out}-rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("precision,dtype", [("bf16", "torch.bfloat16"), ("no", "torch.float32")])
def test_autocast_sets_the_forward_dtype_in_training(train_shards, tmp_path, precision, dtype):
    """The head's output in training steps is bf16 under train.precision=bf16 (autocast on CPU), fp32 without."""
    out, _ = run_fit(tmp_path, precision, train_shards, "train.epochs=1", "data.max_train_batches=2",
                     f"train.precision={precision}")
    assert rank_report(out)["train_dtypes"] == [dtype]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["precision"] == precision


def one_sgd_step(tmp_path: Path, shards: Path, clip: float) -> tuple[torch.Tensor, float]:
    """The parameter update of one plain SGD step (lr 0.1, no momentum or decay): -lr x the applied gradient."""
    out, _ = run_fit(tmp_path, f"clip{clip}", shards, "train.epochs=1", "data.max_train_batches=1", "optim.name=sgd",
                     "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0", "train.deterministic=true",
                     f"train.grad_clip={clip}")
    before = load_file(f"{out}-initial.safetensors")
    (checkpoint,) = (out / "checkpoints").iterdir()
    after = load_file(checkpoint / "model.safetensors")
    return torch.cat([(after[k] - before[k]).flatten().double() for k in sorted(before)]), 0.1


@pytest.mark.slow
def test_grad_clip_shortens_the_update_to_the_clip_norm(train_shards, tmp_path):
    clip = 0.05
    free, lr = one_sgd_step(tmp_path, train_shards, 0.0)
    clipped, _ = one_sgd_step(tmp_path, train_shards, clip)
    grad_norm = float(free.norm()) / lr
    assert grad_norm > 4 * clip, "the unclipped gradient must be longer than the clip norm for this test to mean anything"
    assert float(clipped.norm()) == pytest.approx(lr * clip, rel=1e-3)
    # same seed, same batch: the clipped step is the unclipped one scaled by clip / ||g||
    # (weights are float32, so compare directions: the update differences lie at float32 rounding)
    assert float(torch.nn.functional.cosine_similarity(clipped, free, dim=0)) > 0.9999
    assert (clipped - free * (clip / grad_norm)).norm() < 1e-3 * clipped.norm()


def expected_stop(aucs: list[float], patience: int) -> int:
    """The epoch the rule stops after: `patience` epochs in a row without a strictly better val mean AUROC."""
    best, bad = -float("inf"), 0
    for epoch, auc in enumerate(aucs, start=1):
        best, bad = (auc, 0) if auc > best else (best, bad + 1)
        if bad >= patience:
            return epoch
    return len(aucs)


@pytest.mark.slow
def test_two_ranks_stop_early_together_with_the_same_plateau_lrs(train_shards, tmp_path):
    """2 processes, plateau schedule (patience 0, factor 0.5) and early stop (patience 2): the run stops on
    the epoch the rule names from its own val AUROC history, for that reason, and both ranks saw the
    same lr every epoch (which did drop) and stopped on the same epoch."""
    epochs, patience = 10, 2
    out, done = run_fit(tmp_path, "ddp", train_shards, f"train.epochs={epochs}", f"train.early_stop_patience={patience}",
                        "data.max_train_batches=3", "optim.lr=0.05", "sched.name=plateau", "sched.patience=0",
                        "sched.factor=0.5", "train.keep_checkpoints=1", nproc=2)
    ranks = [rank_report(out, r) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aucs = [r["val_auc_mean"] for r in logged]
    stop = expected_stop(aucs, patience)
    assert stop < epochs, f"no early stop in {epochs} epochs: {aucs}"
    assert len(logged) == stop and all(r["epochs"] == stop and r["stopped_early"] for r in ranks)
    assert f"early stop: val mean AUC did not improve for {patience} epoch(s)" in done.stdout
    assert ranks[0]["auc"] == ranks[1]["auc"] == aucs
    assert ranks[0]["lr"] == ranks[1]["lr"] == [r["lr"] for r in logged]
    assert min(ranks[0]["lr"]) < 0.05, "the plateau schedule never stepped"
