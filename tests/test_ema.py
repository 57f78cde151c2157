"""EMA of the weights against a hand computation: the engine's EMA after each optimizer step is
decay * previous + (1 - decay) * the raw weights of that step (read back from step checkpoints).
The mid-epoch resume of the EMA is in test_trackers.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import run

DECAY = 0.5


@pytest.mark.slow
def test_engine_ema_follows_the_hand_formula_step_by_step(train_shards, tmp_path):
    out = tmp_path / "ema"
    script = f"""
from chexdist.config import load_config
from chexdist.training.engine import fit
cfg = load_config("tiny", overrides=["data.shards={train_shards}", "train.epochs=1", "data.max_train_batches=3",
                                     "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.ema_decay={DECAY}"])
fit(cfg, r"{out}", progress=False)
"""
    done = run([sys.executable, "-c", script], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from accelerate.utils import set_seed

    from chexdist.models.factory import create_model

    set_seed(0)  # train.seed: the engine's initial weights
    ema = {k: v.clone() for k, v in create_model("test_resnet").state_dict().items()}
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name[:13] for c in checkpoints] == ["step000000001", "step000000002", "step000000003"]
    for checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        for k, v in weights.items():
            ema[k] = DECAY * ema[k] + (1 - DECAY) * v if v.is_floating_point() else v
        saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["ema"]
        assert saved.keys() == ema.keys()
        for k, v in saved.items():
            assert torch.allclose(v, ema[k], atol=1e-6), (checkpoint.name, k)
        assert not all(torch.equal(saved[k], weights[k]) for k in weights if weights[k].is_floating_point())
    info = json.loads((out / "best.json").read_text())
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert info["weights"] == record["better_weights"] in ("raw", "ema")
    assert set(record["val_ema"]["val_auc"]) == set(record["val_auc"])


def test_ema_warmup_is_timms_ramp():
    from chexdist.training.ema import WeightEma

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightEma(model, decay=0.99, warmup=True)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)  # timm: decay 0 at the first step, the EMA starts at the weights
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    decay = min(0.99, 1 - (1 + 1) ** (-2 / 3))
    ema.update(model, step=2)
    assert torch.allclose(ema.module.weight, decay * (start + 1) + (1 - decay) * model.weight, atol=1e-6)
