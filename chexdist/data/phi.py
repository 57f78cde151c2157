"""Keep protected health information (PHI) out of everything chexdist writes.

Two halves of one job: keyed pseudonyms for what training needs to keep apart (patients, source
paths), and a scanner that `chexdist shards verify` runs over a shard folder to report values that
look like PHI a pseudonym should have replaced.

- Pseudonyms are HMAC-SHA256 of the value under a user key, truncated to 16 hex digits (64 bits: a
  collision among a million patients has odds of about 1 in 36 million). Without the key nobody can
  test a guessed MRN against a pseudonym, unlike a plain hash of a short MRN.
- The key comes from `--id-key-file`, else the `CHEXDIST_ID_KEY` environment variable, else a new
  random key is written to `<shards>.id-key` beside the shard folder, never inside it (the key must
  not travel with the shards), and reused by later packs into the same folder.
- The scanner flags DICOM UIDs, person names in DICOM form (FAMILY^GIVEN), 8-digit dates (as whole
  tokens: hash-like file names are not dates), and
  sample fields named after PHI. It reports where and what kind, never the value itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tarfile
from pathlib import Path

from chexdist.errors import ChexdistError

KEY_ENV = "CHEXDIST_ID_KEY"
KEY_SUFFIX = ".id-key"
MIN_KEY_BYTES = 16
DIGITS = 16
KEPT_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")  # any other "suffix" may be part of a name ("DOE.JOHN")

_PATTERNS = {
    "DICOM UID": re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){4,}(?![\w.])"),
    "DICOM person name": re.compile(r"[A-Za-z][A-Za-z'\- ]*\^[A-Za-z'\- ^]*[A-Za-z]"),
}
DATE = "date (YYYYMMDD)"
_DATE = re.compile(r"(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")
_DATE_ANYWHERE = re.compile(r"(?<![0-9A-Za-z])" + _DATE.pattern + r"(?![0-9A-Za-z])")
# A date counts as one when it is a whole token: MIMIC's dicom_id hex groups ("02aa804e-20110815-...")
# and other hash-like names then never look like birth dates.
_TOKENS = re.compile(r"[\s/\\_.,;:]+")
_PHI_FIELDS = re.compile(r"name|birth|accession|institution|address|phone|mrn|physician|operator|uid|study|series", re.I)


def pseudonym(key: bytes, value: str) -> str:
    """The keyed pseudonym of `value` (16 hex digits); same key and value, same pseudonym."""
    return hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:DIGITS]


def patient_number(key: bytes, value: str) -> int:
    """The keyed pseudonym of a patient ID as a non-negative 60-bit integer (shards, like NIH's,
    hold integer patient IDs): the first 15 hex digits of the HMAC."""
    return int(hmac.new(key, f"patient:{value}".encode("utf-8"), hashlib.sha256).hexdigest()[:15], 16)


def pseudonymous_path(key: bytes, relative: str | os.PathLike) -> str:
    """A source path with every folder and the file name pseudonymised, an image suffix kept."""
    parts = Path(relative).parts
    if not parts:
        return ""
    *folders, name = parts
    suffix = Path(name).suffix if Path(name).suffix.lower() in KEPT_SUFFIXES else ""
    return "/".join([pseudonym(key, f"dir:{'/'.join(parts[: i + 1])}") for i in range(len(folders))] + [pseudonym(key, f"file:{relative}") + suffix])


def _checked(key: bytes, where: str) -> bytes:
    key = key.strip()
    if len(key) < MIN_KEY_BYTES:
        raise ChexdistError(f"{where}: the pseudonymisation key has {len(key)} bytes; use at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32 > FILE`)")
    return key


def key_file_beside(out: str | os.PathLike) -> Path:
    out = Path(out).resolve()
    return out.parent / f"{out.name}{KEY_SUFFIX}"


def key_source(key_file: str | os.PathLike | None, out: str | os.PathLike) -> tuple[str | None, str]:
    """(the key file to use, or None for $CHEXDIST_ID_KEY; where the key is, in words). Without
    either, a new random key file is written beside the shard folder `out`; a key file inside
    `out` is refused."""
    out_dir = Path(out).resolve()
    if key_file is not None:
        path = Path(key_file).resolve()
        if out_dir == path.parent or out_dir in path.parents:
            raise ChexdistError(f"--id-key-file {key_file}: is inside the shard folder {out}; keep the key outside it, or anyone with the shards can test guessed IDs")
        read_key(str(path))
        return str(path), f"--id-key-file {path}"
    if os.environ.get(KEY_ENV):
        read_key(None)
        return None, f"${KEY_ENV}"
    path = key_file_beside(out_dir)
    if path.is_file():
        read_key(str(path))
        return str(path), f"{path} (written by an earlier pack)"
    if _create_key(path):
        return str(path), f"{path} (new: keep it, outside the shards, to pseudonymise later exports the same way)"
    return str(path), f"{path} (written by a concurrent pack task)"


def _create_key(path: Path) -> bool:
    """Write a random key to `path` unless it exists; complete or absent, never half-written (pack
    array tasks may race here: the first link wins, the others read its key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink()


def read_key(key_file: str | os.PathLike | None) -> bytes:
    """The key in `key_file`, or in $CHEXDIST_ID_KEY when None; refused when absent or short."""
    if key_file is None:
        if not os.environ.get(KEY_ENV):
            raise ChexdistError(f"no pseudonymisation key: pass --id-key-file FILE or set ${KEY_ENV}")
        return _checked(os.environ[KEY_ENV].encode("utf-8"), f"${KEY_ENV}")
    if not os.path.isfile(key_file):
        raise ChexdistError(f"--id-key-file {key_file}: file not found")
    return _checked(Path(key_file).read_bytes(), f"--id-key-file {key_file}")


def key_check(key: bytes) -> str:
    """A fingerprint of the key (the pseudonym of a fixed text): tells keys apart, reveals nothing."""
    return pseudonym(key, "chexdist key check")


def find(text: str) -> list[str]:
    """The kinds of PHI-looking values in `text` (empty when none)."""
    kinds = [kind for kind, pattern in _PATTERNS.items() if pattern.search(text)]
    return kinds + [DATE] if any(_DATE.fullmatch(token) for token in _TOKENS.split(text)) else kinds


def redact(text: str) -> str:
    """`text` with every PHI-looking value replaced by its kind in brackets."""
    for kind, pattern in [*_PATTERNS.items(), (DATE, _DATE_ANYWHERE)]:
        text = pattern.sub(f"[{kind}]", text)
    return text


def _walk(value, path: str):
    """(field path, string) for every key and string value in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}", str(k)
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def _json_problems(where: str, obj, sample: bool) -> list[str]:
    out = []
    if sample and isinstance(obj, dict):
        out += [f"{where}: field {k!r} is named after PHI" for k in obj if _PHI_FIELDS.search(str(k))]
    for field, text in _walk(obj, ""):
        out += [f"{where}{field}: looks like a {kind}" for kind in find(text)]
    return out


def _text_file_problems(path: Path) -> list[str]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            out += _json_problems(f"{path.name}:{number}", json.loads(line), sample=False)
        except json.JSONDecodeError:
            out += [f"{path.name}:{number}: looks like a {kind}" for kind in find(line)]
    return out


def _tar_problems(path: Path) -> list[str]:
    out = []
    try:
        with tarfile.open(path) as tar:
            for number, member in enumerate(tar, 1):
                out += [f"{path.name} member {number}: its name looks like a {kind}" for kind in find(member.name)]
                if member.isfile() and member.name.endswith(".json"):
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    try:
                        out += _json_problems(f"{path.name} member {number}", json.loads(data), sample=True)
                    except json.JSONDecodeError:
                        continue  # verify's own sample check reports unparsable json
    except (tarfile.TarError, OSError):
        return []  # verify's shard check reports unreadable tars
    return out


def phi_problems(shard_dir: str | os.PathLike) -> list[str]:
    """One line per PHI-looking value in a shard folder's manifest, errors list and sample json."""
    shard_dir = Path(shard_dir)
    out: list[str] = []
    for path in sorted(p for p in shard_dir.iterdir() if p.is_file()):
        if path.suffix == ".tar":
            out += _tar_problems(path)
        elif path.suffix in (".json", ".jsonl"):
            out += _text_file_problems(path)
    return [f"PHI? {line}" for line in out]
