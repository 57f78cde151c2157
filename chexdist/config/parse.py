"""Parse, override and load configs: defaults < recipe YAML < --config file < --set overrides.

Every value is coerced to its field's type and range-checked when it is set, so an impossible run
is refused before any data is read.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union, get_args, get_origin

import yaml

from chexdist import __version__
from chexdist.errors import ChexdistError
from chexdist.models.arch import check_input_size
from chexdist.utils.fileio import atomic_write_text
from chexdist.config.schema import (
    Config,
    FIELD_TYPES,
    SECTIONS,
    SECTION_TYPES,
    eval_resize_for,
    section_fields,
)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def describe_config(cfg: Config) -> list[tuple[str, str, str]]:
    """(key, resolved value, allowed values or range) for every key, for `chexdist config show`."""
    rows = []
    for section in SECTIONS:
        for key, f in section_fields(section).items():
            value = getattr(getattr(cfg, section), key)
            shown = _show(value)
            if (section, key) == ("data", "eval_resize"):
                resolved = cfg.data.resolved_eval_resize
                shown = f"{resolved} (derived)" if cfg.data.eval_resize_is_derived else str(resolved)
            allowed = _describe_type(FIELD_TYPES[section][key], f.metadata)
            doc = f.metadata.get("doc")
            rows.append((f"{section}.{key}", shown, f"{allowed}; {doc}" if doc else allowed))
    return rows


def _describe_type(tp: Any, limits: Mapping[str, Any]) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_describe_type(inner[0], limits)}, or null"
    if origin is Literal:
        return " | ".join(get_args(tp))
    if origin is list:
        (item_tp,) = get_args(tp)
        count = f"{limits['length']} " if limits.get("length") else ""
        return f"list of {count}values, each {_describe_type(item_tp, limits)}"
    if tp is bool:
        return "true | false"
    rule = " and ".join(f"{sym} {limits[name]}" for name, (sym, _) in _OPS.items() if limits.get(name) is not None)
    name = {int: "integer", float: "number", str: "non-empty text" if limits.get("nonempty") else "text"}[tp]
    return f"{name} {rule}" if rule else name


# YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`precision: no` stays "no") and 1e-4 is a float."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with short lists such as betas kept on one line."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def parse_yaml(text: str) -> Any:
    """Parse YAML the way config files are parsed (use it for tune spaces too: `no` stays a string)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Read and parse a YAML file; errors are one line naming the file (and line when known)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChexdistError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChexdistError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ChexdistError(f"{what} {path}{where}: {problem}") from None


# Coercion and validation



def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lookup(section: Any, key: Any) -> dataclasses.Field:
    """The field for section.key, or a ChexdistError listing what exists."""
    dotted = f"{section}.{key}"
    if section not in SECTION_TYPES:
        close = difflib.get_close_matches(str(section), SECTIONS, n=1)
        hint = f" (did you mean '{close[0]}.{key}'?)" if close else ""
        raise ChexdistError(f"unknown config key {dotted!r}{hint}; sections: {', '.join(SECTIONS)}")
    fields = section_fields(section)
    if key not in fields:
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
        raise ChexdistError(f"unknown config key {dotted!r}{hint}; {section} keys: {', '.join(fields)}")
    return fields[key]


_NULL_WORDS = {"", "null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, tp: Any, limits: Mapping[str, Any]) -> Any:
    """Return value as type tp within limits, or raise a one-line error naming key."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(inner) < len(get_args(tp))
        if nullable and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS)):
            return None
        listed = [a for a in inner if get_origin(a) is list]
        return _coerce(key, value, listed[0] if listed and isinstance(value, (list, tuple)) else inner[0], limits)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):
            raise ChexdistError(
                f"config key {key!r}: got boolean {_show(value)}, expected one of {', '.join(choices)}"
                " (a YAML 1.1 reader turns bare no/off into false; quote it)"
            )
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ChexdistError(f"config key {key!r}: {_show(value)} is not one of {', '.join(choices)}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and get_origin(item_tp) is Literal:  # train.log_with=tensorboard,mlflow
            value = [v for v in value.split(",") if v.strip() and v.strip().lower() != "none"]
        if not isinstance(value, (list, tuple)):
            raise ChexdistError(f"config key {key!r}: expected a list like [0.9, 0.999], got {_show(value)}")
        length = limits.get("length")
        if length is not None and len(value) != length:
            raise ChexdistError(f"config key {key!r}: expected {length} values, got {len(value)}")
        return [_coerce(key, v, item_tp, limits) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ChexdistError(f"config key {key!r}: expected true or false, got {_show(value)}")
    if tp is int:
        number = _number(key, value, "an integer")
        if isinstance(number, float):
            if not number.is_integer():
                raise ChexdistError(f"config key {key!r}: expected an integer, got {_show(value)}")
            number = int(number)
        return _check_range(key, number, limits)
    if tp is float:
        return _check_range(key, float(_number(key, value, "a number")), limits)
    if tp is str:
        if not isinstance(value, str):
            raise ChexdistError(f"config key {key!r}: expected a string, got {_show(value)}")
        if limits.get("nonempty") and not value.strip():
            raise ChexdistError(f"config key {key!r}: must not be empty")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _number(key: str, value: Any, expected: str) -> int | float:
    if isinstance(value, bool):
        raise ChexdistError(f"config key {key!r}: expected {expected}, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ChexdistError(f"config key {key!r}: expected {expected}, got {_show(value)}") from None
    if not isinstance(value, (int, float)):
        raise ChexdistError(f"config key {key!r}: expected {expected}, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ChexdistError(f"config key {key!r}: expected a finite number, got {_show(value)}")
    return value


_OPS = {
    "ge": (">=", lambda a, b: a >= b),
    "gt": (">", lambda a, b: a > b),
    "le": ("<=", lambda a, b: a <= b),
    "lt": ("<", lambda a, b: a < b),
}


def _check_range(key: str, value: int | float, limits: Mapping[str, Any]) -> int | float:
    bounds = [(sym, bound, ok) for name, (sym, ok) in _OPS.items() if (bound := limits.get(name)) is not None]
    if not all(ok(value, bound) for _, bound, ok in bounds):
        rule = " and ".join(f"{sym} {bound}" for sym, bound, _ in bounds)
        raise ChexdistError(f"config key {key!r}: {_show(value)} is out of range (must be {rule})")
    return value


def _set(cfg: Config, section: Any, key: Any, value: Any) -> None:
    f = _lookup(section, key)
    tp = FIELD_TYPES[section][key]
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, tp, f.metadata))


def _check_cross(cfg: Config) -> None:
    """Rules that involve two keys; each names the key to change."""
    check_input_size(cfg.model.name, cfg.data.image_size)
    if cfg.data.eval_resize and cfg.data.eval_resize < cfg.data.image_size:
        raise ChexdistError(
            f"config key 'data.eval_resize': {cfg.data.eval_resize} is smaller than data.image_size "
            f"{cfg.data.image_size} (eval center-crops image_size from it); set data.eval_resize >= "
            f"{cfg.data.image_size}, or 0 to derive it from data.crop_pct"
        )
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ChexdistError("config key 'optim.nesterov': true needs optim.momentum > 0 with sgd")
    if cfg.sched.name == "plateau" and cfg.sched.warmup_epochs:
        raise ChexdistError(
            "config key 'sched.warmup_epochs': warmup is not supported with sched.name=plateau; use cosine or step"
        )
    _check_step_schedule(cfg)
    if cfg.optim.lr_scaling != "none" and not cfg.optim.lr_reference_batch:
        raise ChexdistError(
            f"config key 'optim.lr_reference_batch': must be > 0 with optim.lr_scaling={cfg.optim.lr_scaling}; "
            "set it to the global batch optim.lr was tuned at"
        )
    if cfg.sched.min_lr > cfg.optim.lr:
        raise ChexdistError(
            f"config key 'sched.min_lr': {_show(cfg.sched.min_lr)} is larger than optim.lr {_show(cfg.optim.lr)}"
        )


def _check_step_schedule(cfg: Config) -> None:
    sched = cfg.sched
    if sched.warmup_steps and not sched.per_step:
        raise ChexdistError("config key 'sched.warmup_steps': needs sched.per_step=true (use sched.warmup_epochs per epoch)")
    if sched.per_step and sched.name not in ("cosine", "none"):
        raise ChexdistError(f"config key 'sched.per_step': works with sched.name=cosine or none, not {sched.name}")
    if sched.per_step and sched.warmup_epochs:
        raise ChexdistError("config key 'sched.warmup_epochs': with sched.per_step=true use sched.warmup_steps")


def eval_crop_warning(cfg: Config) -> str | None:
    """A one-line warning when the eval centre crop keeps less than half of the resized image's area
    (scores, best-epoch choice and thresholds would then judge only the middle of the X-ray)."""
    data = cfg.data
    kept = (data.image_size / data.resolved_eval_resize) ** 2
    if kept >= 0.5:
        return None
    source = "data.eval_resize" if data.eval_resize else "data.crop_pct"
    return (
        f"evaluation keeps only {kept:.0%} of the image area (Resize {data.resolved_eval_resize} + CenterCrop "
        f"{data.image_size}, from {source}); set data.eval_resize=0 and data.crop_pct=0.875 to keep most of it"
    )


@dataclass(frozen=True)
class BatchPlan:
    """What one world size makes of the config: per-process batch, accumulation, the global batch
    (per process x processes x accumulation) and the lr after optim.lr_scaling."""

    batch_size: int
    grad_accum: int
    global_batch: int
    lr: float
    world_size: int


def resolve_batch(cfg: Config, world_size: int) -> BatchPlan:
    """The batch plan on `world_size` processes.

    data.global_batch_size = 0: data.batch_size per process and train.grad_accum as given.
    Otherwise the global batch is fixed whatever the process count: the smallest accumulation
    a >= train.grad_accum with global % (world_size * a) == 0 and global / (world_size * a) <=
    data.batch_size (the per-process ceiling) is used; a size that cannot be split is refused.
    """
    if world_size < 1:
        raise ChexdistError(f"world size must be >= 1, got {world_size}")
    wanted, cap, accum = cfg.data.global_batch_size, cfg.data.batch_size, cfg.train.grad_accum
    if not wanted:
        per = cap
    else:
        for accum in range(accum, wanted // world_size + 1):
            if wanted % (world_size * accum) == 0 and wanted // (world_size * accum) <= cap:
                break
        else:
            unit = world_size * cfg.train.grad_accum
            near = max(unit, round(wanted / unit) * unit)
            raise ChexdistError(
                f"config key 'data.global_batch_size': {wanted} does not split over {world_size} process(es) x "
                f"train.grad_accum >= {cfg.train.grad_accum} with at most data.batch_size={cap} per process; "
                f"set data.global_batch_size to a multiple of {unit} (e.g. {near}) or 0, or use a process count that divides {wanted}"
            )
        per = wanted // (world_size * accum)
    global_batch = per * world_size * accum
    lr = cfg.optim.lr
    if cfg.optim.lr_scaling != "none":
        ratio = global_batch / cfg.optim.lr_reference_batch
        lr *= ratio if cfg.optim.lr_scaling == "linear" else math.sqrt(ratio)
    return BatchPlan(batch_size=per, grad_accum=accum, global_batch=global_batch, lr=lr, world_size=world_size)


def validate_config(cfg: Config) -> Config:
    """Re-check every field and cross-key rule in place (for configs edited in code); returns cfg."""
    if not isinstance(cfg.recipe, str):
        raise ChexdistError(f"config key 'recipe': expected a string, got {_show(cfg.recipe)}")
    for section in SECTIONS:
        for key in section_fields(section):
            _set(cfg, section, key, getattr(getattr(cfg, section), key))
    _check_cross(cfg)
    return cfg


def _apply_mapping(cfg: Config, data: Any, source: str | None) -> str | None:
    """Apply {section: {key: value}} onto cfg; return the mapping's `recipe` label if any."""
    try:
        if not isinstance(data, Mapping):
            raise ChexdistError(
                f"expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}"
            )
        label = data.get("recipe")
        if label is not None and not isinstance(label, str):
            raise ChexdistError(f"config key 'recipe': expected a string, got {_show(label)}")
        for section, values in data.items():
            if section == "recipe":
                continue
            if section not in SECTION_TYPES:
                hint = _suggest(str(section), SECTIONS)
                raise ChexdistError(f"unknown config section {section!r}{hint}; sections: {', '.join(SECTIONS)}")
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise ChexdistError(f"config section {section!r} must be a mapping of keys, got {_show(values)}")
            for key, value in values.items():
                _set(cfg, section, key, value)
        _unfreeze_eval_resize(cfg, data.get("data"))
        return label
    except ChexdistError as e:
        if source is None:
            raise
        raise ChexdistError(f"{source}: {e}") from None


def _unfreeze_eval_resize(cfg: Config, data_section: Any) -> None:
    """A file's eval_resize that equals the value its image_size and crop_pct derive is a resolved
    value written by save_config (or a recipe stating the convention), not an override: keep it
    derived, so `--config runs/x/config.yaml --set data.image_size=96` re-derives the resize
    instead of freezing the old one."""
    stated = isinstance(data_section, Mapping) and data_section.get("eval_resize")
    if stated and cfg.data.eval_resize == eval_resize_for(cfg.data.image_size, cfg.data.crop_pct):
        cfg.data.eval_resize = 0


# Overrides


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split 'section.key=value' and parse value as YAML (so 1e-4, true, null and [0.9, 0.99] work)."""
    form = "use --set section.key=value, e.g. --set optim.lr=1e-4"
    if not isinstance(text, str) or "=" not in text:
        raise ChexdistError(f"malformed override {text!r}; {form}")
    dotted, raw = text.split("=", 1)
    section, dot, key = dotted.strip().partition(".")
    if not dot or not section or not key or "." in key:
        if dotted.strip() == "recipe":
            raise ChexdistError("the recipe is chosen with --recipe NAME, not --set")
        raise ChexdistError(f"malformed override {text!r}; {form}")
    _lookup(section, key)
    plain = _plain_types(FIELD_TYPES[section][key])
    text = raw.strip()
    try:
        value = parse_yaml(text) if text else None
    except yaml.YAMLError:
        value = text
    listed = isinstance(value, list) and any(get_origin(t) is list for t in plain)
    if str in plain and not isinstance(value, str) and not (value is None and type(None) in plain) and not listed:
        value = text
    return section, key, value


def _plain_types(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """A validated copy of cfg with overrides applied.

    overrides is either 'section.key=value' strings (CLI --set) or a mapping {'section.key': value}
    with Python values (Ray Tune trial parameters).
    """
    out = copy.deepcopy(cfg)
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for dotted, value in overrides.items():
            section, dot, key = str(dotted).partition(".")
            if not dot:
                raise ChexdistError(f"malformed override key {dotted!r}; use 'section.key', e.g. 'optim.lr'")
            _set(out, section, key, value)
    else:
        for item in overrides:
            _set(out, *parse_override(item))
    _check_cross(out)
    return out


# Recipes and loading


def available_recipes() -> list[str]:
    """Names of the recipes shipped in chexdist/recipes/."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """A shipped recipe's file, or recipe itself when it is a path to a YAML file."""
    if recipe in available_recipes():
        return RECIPES_DIR / f"{recipe}.yaml"
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or os.sep in recipe or "/" in recipe:
        if path.is_file():
            return path
        raise ChexdistError(f"recipe file not found: {recipe}")
    raise ChexdistError(
        f"unknown recipe {recipe!r}{_suggest(recipe, available_recipes())}; "
        f"available: {', '.join(available_recipes())}, or a path to a .yaml recipe"
    )


def load_config(
    recipe: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Build the run's config: dataclass defaults < recipe < config_file < overrides, all validated.

    A `recipe:` entry inside a file is only a label (used when no recipe is given); it is never
    applied, so a saved run config.yaml reloads to exactly the same values.
    """
    cfg = Config()
    if recipe:
        path = recipe_path(recipe)
        name = recipe if recipe in available_recipes() else path.stem
        _apply_mapping(cfg, load_yaml(path, "recipe") or {}, f"recipe {name!r} ({path})")
        cfg.recipe = name
    if config_file is not None:
        label = _apply_mapping(cfg, load_yaml(config_file, "config file") or {}, f"config file {config_file}")
        if not recipe and label:
            cfg.recipe = label
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict (JSON/YAML-safe) with `recipe` first, then the sections; data.eval_resize is the
    resolved number (tools read it), which config_from_dict/load_config read back as derived."""
    d = dataclasses.asdict(cfg)
    d["data"]["eval_resize"] = cfg.data.resolved_eval_resize
    return d


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Restore a validated Config from config_to_dict output (config.yaml, best.json["config"]).

    Keys missing from d keep their defaults, so runs saved before a key was added still load.
    """
    cfg = Config()
    label = _apply_mapping(cfg, d, None)
    cfg.recipe = label or ""
    _check_cross(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the config, for logs and config.yaml."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write config.yaml atomically; `load_config(config_file=path)` gives back an equal Config."""
    header = f"# chexdist {__version__} run config; reload with --config {Path(path).name}\n"
    atomic_write_text(path, header + dump_config(cfg))


def add_set_argument(parser: Any, help: str = "override one config key (repeatable)") -> None:
    """`--set SECTION.KEY=VALUE` (repeatable) into `overrides`, as every command that resolves a config takes it."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)
