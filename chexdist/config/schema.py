"""The config schema: one dataclass per section, each field's type, default and limits.

The section/key names are a public contract (DESIGN.md, "Names that other tools rely on"): add
keys, never rename them. Parsing, overrides and loading live in `chexdist.config.parse`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

LossName = Literal["bce", "wbce", "focal"]
OptimName = Literal["adam", "adamw", "sgd"]
SchedName = Literal["plateau", "cosine", "step", "none"]
AugPreset = Literal["none", "flip", "dannynet", "strong"]
AugWhere = Literal["auto", "workers", "device"]
HeadName = Literal["linear", "dense_bn"]
Precision = Literal["no", "bf16", "fp16", "auto"]
LrScaling = Literal["none", "linear", "sqrt"]
ThresholdMetric = Literal["f1"]
TrackerName = Literal["tensorboard", "mlflow", "wandb", "aim"]
DecodeDevice = Literal["cpu", "cuda"]


def _f(default: Any, **limits: Any) -> Any:
    """A dataclass field whose metadata carries its limits: ge/gt/le/lt, length (lists), nonempty."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=limits)
    return field(default=default, metadata=limits)


def eval_resize_for(image_size: int, crop_pct: float) -> int:
    """timm's eval resize: the shorter side becomes floor(image_size / crop_pct) before the centre crop."""
    return math.floor(image_size / crop_pct)


@dataclass
class DataConfig:
    """Input pipeline. Eval images are Resize(resolved_eval_resize) then CenterCrop(image_size).

    The resize follows timm's convention: floor(image_size / crop_pct) (224 -> 256 at 0.875), so
    changing image_size alone keeps the same share of the image. eval_resize > 0 overrides it;
    0 (or null) means derived. config.yaml and best.json hold the resolved number.
    """

    shards: str | list[str] = _f("", doc="a shard folder or URL, or a list of them: a mixture (docs/loader.md)")
    shard_weights: list[float] = _f([], gt=0, doc="one sampling weight per data.shards entry; [] = every sample once an epoch")
    decode_device: DecodeDevice = _f("cpu", doc="cuda: JPEG train shards are decoded in batches by nvJPEG on the GPU "
                                     "(falls back to cpu without CUDA; PNG stays on the CPU); docs/loader.md")
    image_size: int = _f(224, ge=16)
    crop_pct: float = _f(0.875, gt=0, le=1)
    eval_resize: int | None = _f(0, ge=0, doc="0 or null = floor(image_size / crop_pct)")
    batch_size: int = _f(16, ge=1, doc="per process; with global_batch_size > 0, the most per process")
    global_batch_size: int = _f(0, ge=0, doc="0 = batch_size x processes x grad_accum; see resolve_batch")
    eval_batch_size: int = _f(0, ge=0, doc="0 = 2 * batch_size")
    num_workers: int = _f(2, ge=0)
    shuffle_buffer: int = _f(1000, ge=0)
    max_train_batches: int = _f(0, ge=0, doc="0 = full epoch; >0 caps an epoch (smoke tests, benchmarks)")

    @property
    def resolved_eval_resize(self) -> int:
        """The eval resize actually used: eval_resize when set, else derived from crop_pct."""
        return self.eval_resize or eval_resize_for(self.image_size, self.crop_pct)

    @property
    def eval_resize_is_derived(self) -> bool:
        return not self.eval_resize


@dataclass
class ModelConfig:
    """Backbone (timm name or densenet121) and classifier head; pretrained is a local file, never a download."""

    name: str = _f("densenet121", nonempty=True)
    pretrained: str | None = _f(None, doc="a local weights file; never downloaded")
    drop_rate: float = _f(0.0, ge=0, lt=1)
    head: HeadName = "linear"
    grad_checkpointing: bool = _f(False, doc="recompute activations in backward (timm set_grad_checkpointing; "
                                  "torchvision DenseNet memory_efficient): less memory, more compute")
    sync_bn: bool = _f(False, doc="BatchNorm statistics over all processes (SyncBatchNorm) with more than one process")


@dataclass
class LossConfig:
    """gamma and alpha are used by focal loss only."""

    name: LossName = "bce"
    gamma: float = _f(2.0, ge=0)
    alpha: float | None = _f(None, ge=0)


@dataclass
class OptimConfig:
    """momentum/nesterov apply to sgd, betas to adam/adamw."""

    name: OptimName = "adam"
    lr: float = _f(1e-3, gt=0)
    weight_decay: float = _f(0.0, ge=0)
    momentum: float = _f(0.9, ge=0, lt=1)
    betas: list[float] = _f([0.9, 0.999], ge=0, lt=1, length=2)
    nesterov: bool = False
    lr_scaling: LrScaling = "none"  # lr x (global batch / lr_reference_batch) (linear) or its sqrt
    lr_reference_batch: int = _f(0, ge=0)  # the global batch optim.lr was tuned at


@dataclass
class SchedConfig:
    """plateau steps on val loss (patience/factor); step uses step_size (epochs) and factor."""

    name: SchedName = "plateau"
    patience: int = _f(1, ge=0)
    factor: float = _f(0.1, gt=0, lt=1)
    step_size: int = _f(10, ge=1)
    min_lr: float = _f(0.0, ge=0)
    warmup_epochs: int = _f(0, ge=0)
    per_step: bool = _f(False, doc="cosine/none as a function of the optimizer step (stepped every step, not every epoch)")
    warmup_steps: int = _f(0, ge=0, doc="with per_step: linear warmup over this many optimizer steps")


@dataclass
class AugConfig:
    """Named presets; the numbers parametrize dannynet (jitter, crop) and strong (all of them).

    scale_min is RandomResizedCrop's lower area bound. The default 0.5 keeps at least half the
    image, because findings such as cardiomegaly need the whole chest; torchvision's 0.08 (an
    ImageNet choice) is used only where a paper used RandomResizedCrop with its defaults.
    """

    preset: AugPreset = "flip"
    brightness: float = _f(0.1, ge=0)
    contrast: float = _f(0.1, ge=0)
    scale_min: float = _f(0.5, gt=0, le=1)
    degrees: float = _f(10.0, ge=0, le=180)
    translate: float = _f(0.05, ge=0, lt=1)
    where: AugWhere = _f("auto", doc="train augmentation in the loader workers per image, or per batch on the training "
                         "device; auto = device when it is CUDA (docs/loader.md)")


@dataclass
class TrainConfig:
    """Loop control. early_stop_patience counts epochs without a better val mean AUC (0 = off).

    precision no|bf16|fp16 is passed to Accelerate as is (the launcher's --mixed_precision, env and
    accelerate config are ignored); auto takes the launcher's.
    """

    epochs: int = _f(3, ge=1)
    precision: Precision = "no"
    grad_accum: int = _f(1, ge=1)
    grad_clip: float = _f(0.0, ge=0, doc="max grad norm; 0 = off")
    early_stop_patience: int = _f(0, ge=0, doc="epochs without a better val mean AUROC; 0 = off")
    seed: int = _f(0, ge=0)
    checkpoint_every: int = _f(0, ge=0, doc="optimizer steps; 0 = end of each epoch only")
    keep_checkpoints: int = _f(3, ge=1)
    deterministic: bool = False
    log_every_s: float = _f(30.0, gt=0, doc="seconds between progress lines (and tracker step logs) when output is not a terminal")
    log_every_steps: int = _f(0, ge=0, doc="tracker step logs every N optimizer steps; 0 = at most every log_every_s")
    log_with: list[TrackerName] = _f([], doc="experiment trackers through Accelerate (tensorboard, mlflow, wandb, aim); [] = none")
    ema_decay: float = _f(0.0, ge=0, lt=1, doc="EMA of the weights (timm ModelEmaV3), validated beside them; 0 = off")
    ema_warmup: bool = _f(False, doc="EMA decay ramps up over the first steps (timm's warmup) instead of starting at ema_decay")
    channels_last: bool = _f(False, doc="model and batches in channels_last memory format")
    compile: bool = _f(False, doc="torch.compile the model's forward (Module.compile: checkpoint keys unchanged)")
    compile_backend: str = _f("inductor", doc="torch.compile backend (torch._dynamo.list_backends()); aot_eager traces "
                                              "forward and backward but generates no code (quick, for debugging and tests)")
    tf32: bool = _f(False, doc="TF32 matmul/convolutions for fp32 on NVIDIA GPUs (no effect on CPU)")


@dataclass
class EvalConfig:
    """Per-class thresholds are tuned on val by threshold_metric; CIs resample patients (bootstrap 0 = off)."""

    threshold_metric: ThresholdMetric = "f1"
    bootstrap: int = _f(1000, ge=0, doc="patient bootstrap resamples for CIs; 0 = off")
    ci_level: float = _f(0.95, gt=0, lt=1)


@dataclass
class Config:
    """The whole run. `recipe` records which recipe the run started from (a label, not re-applied)."""

    recipe: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "recipe")
SECTION_TYPES: dict[str, type] = {name: get_type_hints(Config)[name] for name in SECTIONS}
FIELD_TYPES: dict[str, dict[str, Any]] = {s: get_type_hints(cls) for s, cls in SECTION_TYPES.items()}


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    """The dataclass fields of one section, by key."""
    return {f.name: f for f in dataclasses.fields(SECTION_TYPES[section])}


def config_keys() -> list[str]:
    """Every settable 'section.key', in declaration order (for docs, tune spaces and checks)."""
    return [f"{s}.{k}" for s in SECTIONS for k in section_fields(s)]
