"""The 14 ChestX-ray14 findings in the canonical NIH/CheXNet order, and parsing of 'A|B' strings."""

from __future__ import annotations

from collections.abc import Sequence

from chexdist.errors import ChexdistError

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_LABELS = len(LABELS)
# An unknown label (a finding a dataset lacks, a blank, an ignored uncertain) is `null` in a shard's
# json and NaN in label tensors; it is never 0. Losses and metrics use known labels only.
UNKNOWN = float("nan")
NO_FINDING = "No Finding"

# Spellings used by other NIH files (BBox_List_2017.csv writes "Infiltrate").
ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}

_INDEX = {name: i for i, name in enumerate(LABELS)}


def canonical_name(name: str, where: str = "") -> str:
    """Return the canonical spelling of one finding name, or raise naming `where`."""
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in _INDEX:
        at = f"{where}: " if where else ""
        raise ChexdistError(
            f"{at}unknown finding {name!r}; expected one of {', '.join(LABELS)} or {NO_FINDING!r}"
        )
    return name


def label_index(name: str, where: str = "") -> int:
    return _INDEX[canonical_name(name, where)]


def parse_findings(text: str, where: str = "") -> list[int]:
    """Turn NIH's 'Effusion|Mass' (or 'No Finding') into a 14-long 0/1 vector in canonical order."""
    vector = [0] * NUM_LABELS
    text = (text or "").strip()
    if not text:
        raise ChexdistError(f"{where}: empty 'Finding Labels'; use {NO_FINDING!r} for none")
    for part in text.split("|"):
        if part.strip() == NO_FINDING:
            continue
        vector[label_index(part, where)] = 1
    return vector


def check_labels(found: Sequence[str], source: str, expected: Sequence[str] = LABELS) -> None:
    """Refuse an artifact whose label names or order differ from ours (never remap silently)."""
    found, expected = list(found), list(expected)
    if found == expected:
        return
    if sorted(found) == sorted(expected):
        first = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        raise ChexdistError(
            f"{source}: label order differs from chexdist's at position {first} "
            f"({found[first]!r} vs {expected[first]!r}); re-export it in the canonical order"
        )
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    raise ChexdistError(f"{source}: labels do not match chexdist's 14 findings (missing {missing}, unexpected {extra})")
