"""Speed/memory switches on CPU. The maths is unchanged, so the losses match the default run:
channels_last and gradient checkpointing within rel 1e-5 per step (same kernels in another memory
order / recomputed), torch.compile (backend aot_eager, with both) within rel 1e-5 over two epochs
(val mean AUROC within 1e-3: a rank statistic, near-equal scores may swap).
A compiled run really compiles (Dynamo's counters), resumes, and its checkpoints and best.safetensors
keep plain key names."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from chexdist.config import load_config
from chexdist.errors import ChexdistError
from chexdist.training.switches import apply_switches, check_compiler, check_switches, compile_model
from tests.test_train import metrics


def step_losses(name: str, sets: list[str], steps: int, size: int, batch: int) -> list[float]:
    """Per-step losses of `engine.train_epoch` on fixed batches from the same initial weights."""
    from chexdist.models.factory import create_model
    from chexdist.training.checkpoint import Checkpointer, TrainState
    from chexdist.training.engine import train_epoch
    from chexdist.training.losses import build_loss
    from chexdist.training.optim import build_optimizer
    from chexdist.utils.distributed import make_accelerator
    from chexdist.utils.stopsignals import StopFlag

    accelerator = make_accelerator("no")
    cfg = load_config("tiny", overrides=[f"model.name={name}", f"data.batch_size={batch}", *sets])
    torch.manual_seed(0)
    model = create_model(name)
    gen = torch.Generator().manual_seed(1)
    feed = [(torch.randn(batch, 3, size, size, generator=gen), (torch.rand(batch, 14, generator=gen) < 0.3).float())
            for _ in range(steps)]
    model = apply_switches(copy.deepcopy(model), cfg, 1)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    compile_model(accelerator.unwrap_model(model), cfg)
    losses: list[float] = []
    state = TrainState()
    train_epoch(model, optimizer, build_loss("bce"), accelerator, cfg, feed, len(feed), state, StopFlag(),
                Checkpointer(accelerator, None, state, None, 1), after_step=lambda s, loss: losses.append(float(loss)))
    return losses


def test_channels_last_and_grad_checkpointing_match_the_default_loss():
    from chexdist.models.factory import create_model

    cfg = load_config("tiny", overrides=["train.channels_last=true", "model.grad_checkpointing=true"])
    model = apply_switches(create_model("test_resnet"), cfg, 1)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and model.grad_checkpointing
    default = step_losses("test_resnet", [], 4, 32, 4)
    for sets in (["train.channels_last=true"], ["model.grad_checkpointing=true"]):
        assert step_losses("test_resnet", sets, 4, 32, 4) == pytest.approx(default, rel=1e-5), sets
    assert len(default) == 4 and default[0] != default[-1]


def test_densenet_grad_checkpointing_is_memory_efficient_with_the_same_loss():
    from chexdist.models.factory import create_model

    model = apply_switches(create_model("densenet121"), load_config("tiny", overrides=["model.grad_checkpointing=true"]), 1)
    layers = [m for m in model.modules() if hasattr(m, "memory_efficient")]
    assert len(layers) == 58 and all(m.memory_efficient for m in layers)
    default = step_losses("densenet121", [], 1, 32, 2)
    assert step_losses("densenet121", ["model.grad_checkpointing=true"], 1, 32, 2) == pytest.approx(default, rel=1e-5)


def test_refusals_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-cxx")
    with pytest.raises(ChexdistError, match=r"^config key 'train.compile': torch.compile on CPU needs a C\+\+ compiler"):
        check_compiler(torch.device("cpu"))
    with pytest.raises(ChexdistError, match="'model.sync_bn': SyncBatchNorm runs on GPUs only, not cpu"):
        check_switches(load_config("tiny", overrides=["model.sync_bn=true"]), torch.device("cpu"), 2)
    check_switches(load_config("tiny", overrides=["model.sync_bn=true"]), torch.device("cpu"), 1)  # nothing to sync


@pytest.mark.slow
def test_compiled_run_compiles_matches_default_resumes_and_exports_plain_keys(train_shards, tmp_path):
    """In this process, so Dynamo's counters show what was compiled: nothing by default; with
    train.compile (aot_eager: Dynamo and AOTAutograd trace forward and backward, no code generation)
    at least one graph, in the first run and again in its resumed one."""
    from torch._dynamo.utils import counters

    from chexdist.runs import load_best
    from tests.test_trackers import fit_here

    base = ("data.max_train_batches=3", "train.deterministic=true")
    switches = ("train.compile=true", "train.compile_backend=aot_eager", "train.channels_last=true",
                "model.grad_checkpointing=true")
    default, switched = tmp_path / "default", tmp_path / "switched"
    torch._dynamo.reset()
    counters.clear()
    try:
        fit_here(train_shards, default, *base, "train.epochs=2")
        assert counters["stats"]["unique_graphs"] == 0
        fit_here(train_shards, switched, *base, *switches, "train.epochs=1")
        first = counters["stats"]["unique_graphs"]
        assert first >= 1 and counters["aot_autograd"]["total"] >= 1
        torch._dynamo.reset()
        fit_here(train_shards, switched, *base, *switches, "train.epochs=2", resume="latest")
        assert counters["stats"]["unique_graphs"] > first
    finally:
        torch._dynamo.reset()
    a, b = metrics(default), metrics(switched)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
        assert rb["val_auc_mean"] == pytest.approx(ra["val_auc_mean"], abs=1e-3)  # ranks: near-equal scores may swap
    plain = set(load_file(default / "best.safetensors"))
    assert set(load_file(switched / "best.safetensors")) == plain and not any("_orig_mod" in k for k in plain)
    for checkpoint in (switched / "checkpoints").iterdir():
        assert set(load_file(checkpoint / "model.safetensors")) == plain
    model, info = load_best(switched)
    assert info["epoch"] in (1, 2) and model(torch.zeros(1, 3, 64, 64)).shape == (1, 14)


def test_compile_defaults_to_inductor_and_an_unknown_backend_is_refused(monkeypatch):
    """The default path without paying Inductor's code generation here (minutes on a cold cache):
    Module.compile gets backend='inductor' by default, and the key's value otherwise."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    cfg = load_config("tiny", overrides=["train.compile=true"])
    compile_model(torch.nn.Linear(2, 2), cfg)
    compile_model(torch.nn.Linear(2, 2), load_config("tiny", overrides=["train.compile=true", "train.compile_backend=eager"]))
    compile_model(torch.nn.Linear(2, 2), load_config("tiny"))
    assert calls == [{"backend": "inductor"}, {"backend": "eager"}]
    with pytest.raises(ChexdistError, match=r"^config key 'train.compile_backend': 'no_such' is not a torch.compile backend"):
        check_switches(load_config("tiny", overrides=["train.compile=true", "train.compile_backend=no_such"]),
                       torch.device("cpu"), 1)
