"""The search-space YAML: one line per config key, a fixed value or a Ray sampler with an optional
`when` condition (format: tune/README.md). `load_space` checks every key, sampler, bound and
condition against the config before Ray starts; errors are one line naming the file and the key.

The shipped spaces (`--space default`, `--space tiny`) are package data: their one home is tune/spaces/
of the checkout, linked as chexdist/tuning/spaces and installed with the package.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chexdist.config import Config, apply_overrides, config_keys, load_yaml
from chexdist.errors import ChexdistError

OWNED_KEYS = {"data.shards": "--shards", "train.epochs": "--max-epochs"}

# sampler name -> (argument form shown in errors, number of arguments or None for a list of values)
SAMPLERS: dict[str, tuple[str, int | None]] = {
    "choice": ("[a, b, ...]", None),
    "grid": ("[a, b, ...]", None),
    "uniform": ("[low, high]", 2),
    "quniform": ("[low, high, q]", 3),
    "loguniform": ("[low, high]", 2),
    "qloguniform": ("[low, high, q]", 3),
    "randint": ("[low, high)", 2),
    "qrandint": ("[low, high, q]", 3),
    "lograndint": ("[low, high)", 2),
}


@dataclass
class Param:
    """One searched config key: a Ray sampler and the condition under which it applies."""

    key: str
    sampler: str
    args: list[Any]
    when: dict[str, list[Any]] = field(default_factory=dict)

    def domain(self):
        from ray import tune

        if self.sampler in ("choice", "grid"):
            return (tune.grid_search if self.sampler == "grid" else tune.choice)(list(self.args))
        return getattr(tune, self.sampler)(*self.args)

    @property
    def values(self) -> list[Any] | None:
        return list(self.args) if self.sampler in ("choice", "grid") else None


@dataclass
class SearchSpace:
    path: str
    params: dict[str, Param]
    fixed: dict[str, Any]

    def ray_space(self) -> dict[str, Any]:
        return {key: p.domain() for key, p in self.params.items()}

    def active(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides of one trial: fixed values plus sampled values whose `when` holds."""
        chosen = dict(self.fixed)
        for key, p in self.params.items():
            if key in sampled and all(sampled.get(k) in allowed for k, allowed in p.when.items()):
                chosen[key] = sampled[key]
        return chosen


def spaces_dir() -> Path:
    """The folder of the shipped spaces, inside the installed (or checked-out) package."""
    return Path(str(resources.files("chexdist.tuning").joinpath("spaces")))


def shipped_spaces() -> list[str]:
    folder = spaces_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def space_path(space: str) -> Path:
    """A space YAML path, or the name of a shipped space (default, tiny)."""
    if Path(space).is_file() or space.endswith((".yaml", ".yml")) or "/" in space:
        return Path(space)
    if (spaces_dir() / f"{space}.yaml").is_file():
        return spaces_dir() / f"{space}.yaml"
    raise ChexdistError(f"--space {space}: no such file or shipped space; shipped: {', '.join(shipped_spaces()) or 'none found'}")


def load_space(path: str | os.PathLike, base: Config) -> SearchSpace:
    """Read a space YAML and check every key, sampler, bound and condition against `base` (the
    config every trial starts from); errors are one line naming the file and the key."""
    where = str(path)
    data = load_yaml(path, "search space")
    if not isinstance(data, Mapping) or not data:
        raise ChexdistError(f"search space {where}: expected a mapping of config keys (e.g. 'optim.lr: {{loguniform: [1.0e-5, 1.0e-2]}}')")
    known = config_keys()
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for key, spec in data.items():
        key = str(key)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ChexdistError(f"search space {where}: unknown config key {key!r}{hint}; see `chexdist tune --help` and the README")
        if key in OWNED_KEYS:
            raise ChexdistError(f"search space {where}: {key!r} is set by {OWNED_KEYS[key]}, not searched")
        if not isinstance(spec, Mapping):
            _check_value(where, base, key, spec)
            fixed[key] = spec
            continue
        params[key] = _parse_param(where, base, key, spec)
    for p in params.values():
        for other, allowed in p.when.items():
            cond = params.get(other)
            if cond is None or cond.values is None:
                raise ChexdistError(
                    f"search space {where}: {p.key}: 'when' names {other!r}, which must be a searched key with choice/grid values"
                )
            bad = [v for v in allowed if v not in cond.values]
            if bad:
                raise ChexdistError(f"search space {where}: {p.key}: when {other} = {bad[0]!r}, but {other} is one of {cond.values}")
    if not params:
        raise ChexdistError(f"search space {where}: nothing is searched; give at least one key a sampler such as {{choice: [...]}}")
    return SearchSpace(where, params, fixed)


def _parse_param(where: str, base: Config, key: str, spec: Mapping) -> Param:
    when = spec.get("when") or {}
    samplers = [k for k in spec if k != "when"]
    if len(samplers) != 1 or samplers[0] not in SAMPLERS:
        name = samplers[0] if samplers else "nothing"
        close = difflib.get_close_matches(str(name), list(SAMPLERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ChexdistError(
            f"search space {where}: {key}: expected one sampler ({', '.join(SAMPLERS)}) and optionally 'when', got {name!r}{hint}"
        )
    sampler = samplers[0]
    form, count = SAMPLERS[sampler]
    args = spec[sampler]
    if not isinstance(args, list) or (count is None and not args) or (count is not None and len(args) != count):
        raise ChexdistError(f"search space {where}: {key}: {sampler} takes {form}, got {args!r}")
    if count is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) or not args[0] < args[1]:
            raise ChexdistError(f"search space {where}: {key}: {sampler} takes numbers {form} with low < high, got {args!r}")
        if sampler.startswith(("log", "qlog")) and args[0] <= 0:
            raise ChexdistError(f"search space {where}: {key}: {sampler} needs low > 0, got {args[0]!r}")
        if "randint" in sampler and not all(isinstance(a, int) for a in args):
            raise ChexdistError(f"search space {where}: {key}: {sampler} takes integers {form}, got {args!r}")
        probes = args[:2]
    else:
        probes = args
    for value in probes:
        _check_value(where, base, key, value)
    if not isinstance(when, Mapping):
        raise ChexdistError(f"search space {where}: {key}: 'when' must map a key to its value(s), e.g. {{loss.name: focal}}")
    return Param(key, sampler, list(args), {str(k): list(v) if isinstance(v, list) else [v] for k, v in when.items()})


def _check_value(where: str, base: Config, key: str, value: Any) -> None:
    try:
        apply_overrides(base, {key: value})
    except ChexdistError as exc:
        raise ChexdistError(f"search space {where}: {exc}") from None
