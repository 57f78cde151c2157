"""The commands, flags, config keys, paths, links and module names in README.md and docs/*.md are real.

Commands are taken from ```bash blocks; each `chexdist SUBCOMMAND` is checked against that subcommand's
own `--help` (run once per subcommand), `accelerate launch chexdist/train.py` against the trainer's,
`python tune/search.py` against `chexdist tune`'s. Nothing is trained: the help texts are the contract.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from chexdist.config import config_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("chexdist", "slurm", "tune", "tests", "docs", ".ci", "shards")
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", re.M | re.S)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def code_blocks(text: str, langs: tuple[str, ...] = ("bash", "sh", "shell")) -> list[str]:
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(2) in langs:
            indent = len(m.group(1))
            blocks.append("\n".join(line[indent:] for line in m.group(3).splitlines()))
    return blocks


def shell_commands(block: str) -> list[list[str]]:
    """Simple commands of a bash block: continuations joined, comments dropped, split at && || ; | $(."""
    text = block.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            tokens = line.split()
        current: list[str] = []
        for tok in tokens:
            parts = re.split(r"(&&|\|\||;|\||\$\(|\))", tok)
            for part in parts:
                if part in ("&&", "||", ";", "|", "$(", ")"):
                    if current:
                        commands.append(current)
                    current = []
                elif part:
                    current.append(part)
        if current:
            commands.append(current)
    return commands


def all_commands(root: Path = ROOT) -> list[tuple[str, list[str]]]:
    out = []
    for doc in doc_files(root):
        for block in code_blocks(doc.read_text()):
            out += [(doc.name, cmd) for cmd in shell_commands(block)]
    return out


@lru_cache(maxsize=None)
def help_text(*argv: str) -> tuple[int, str]:
    """`--help` of a chexdist (sub)command (in this process: the CLI's parsers, no interpreter start
    per command), or of the trainer script for ("TRAIN",); run once each."""
    if argv == ("TRAIN",):
        proc = subprocess.run([sys.executable, "chexdist/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        return proc.returncode, proc.stdout + proc.stderr
    from chexdist.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main([*argv, "--help"])
        except SystemExit as done:
            code = done.code
    return int(code or 0), out.getvalue()


def resolve_chexdist(args: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Split `chexdist` arguments into the (sub)command path and the rest, descending while the help
    says the command has subcommands (`{a,b} ...` in its usage)."""
    path: list[str] = []
    rest = list(args)
    while rest and not rest[0].startswith("-"):
        candidate = (*path, rest[0])
        if path:
            rc, text = help_text(*path)
            if not re.search(r"\{[\w,-]+\} \.\.\.", text.split("\n\n")[0]):
                break
        rc, text = help_text(*candidate)
        assert rc == 0, f"`chexdist {' '.join(candidate)}` is not a command:\n{text[-500:]}"
        path.append(rest.pop(0))
    return tuple(path), rest


def invocation(cmd: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(help key, arguments) of a chexdist-family command, else None."""
    words = [w for w in cmd if not re.fullmatch(r"[A-Z_]+=.*", w)]  # env assignments
    if not words:
        return None
    if words[0] == "chexdist":
        return resolve_chexdist(words[1:])
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "chexdist"]:
        return resolve_chexdist(words[3:])
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "chexdist.train"]:
        return ("TRAIN",), words[3:]
    if words[0] in ("python", "python3") and len(words) > 1 and words[1] == "tune/search.py":
        return ("tune",), words[2:]
    if words[:2] == ["accelerate", "launch"]:
        if "chexdist/train.py" in words:
            return ("TRAIN",), words[words.index("chexdist/train.py") + 1:]
        if "-m" in words:
            module = words[words.index("-m") + 1]
            if module in ("chexdist", "chexdist.cli", "chexdist.cli.main"):
                return resolve_chexdist(words[words.index("-m") + 2:])
            raise AssertionError(f"accelerate launch -m {module}: not a chexdist entry point")
    return None


def flag_problems(key: tuple[str, ...], args: list[str]) -> list[str]:
    rc, text = help_text(*key)
    assert rc == 0, f"--help failed for {key}: {text[-500:]}"
    problems = []
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{' '.join(key)}: {flag} is not in its --help")
    return problems


def set_keys(args: list[str]) -> list[str]:
    keys = []
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            keys.append(args[i + 1].split("=", 1)[0])
        elif arg.startswith("--set="):
            keys.append(arg[len("--set="):].split("=", 1)[0])
    return keys


def test_docs_have_commands():
    commands = [c for _, c in all_commands() if invocation(c)]
    assert len(commands) > 30, "the command extraction found too few chexdist commands"


def test_every_command_and_flag_exists():
    problems = []
    for doc, cmd in all_commands():
        found = invocation(cmd)
        if found:
            problems += [f"{doc}: {p}" for p in flag_problems(*found)]
    assert not problems, "\n".join(problems)


def test_every_set_key_is_a_config_key():
    known = set(config_keys())
    unknown = [f"{doc}: --set {key}" for doc, cmd in all_commands() if invocation(cmd)
               for key in set_keys(invocation(cmd)[1]) if key not in known]
    assert not unknown, "\n".join(unknown)


def repo_paths(text: str) -> set[str]:
    """Paths into the repository: command words and `backticked` words under a tracked top folder."""
    words = set(re.findall(r"`([^`\s]+)`", text))
    for block in code_blocks(text):
        for cmd in shell_commands(block):
            words.update(cmd)
    paths = set()
    for word in words:
        word = word.rstrip(".,:;)")
        top = word.split("/", 1)[0]
        if "/" not in word or top not in REPO_DIRS or re.search(r"[{}<>*$]|NAME|[A-Z]{3,}", word):
            continue
        if top == "shards" and not word.endswith("README.md"):
            continue  # shards/NAME are outputs of the commands
        paths.add(word)
    return paths


def missing_paths(root: Path = ROOT) -> list[str]:
    return [f"{doc.name}: {p}" for doc in doc_files(root) for p in sorted(repo_paths(doc.read_text()))
            if not (root / p).exists()]


def test_repo_paths_exist():
    missing = missing_paths()
    assert not missing, "\n".join(missing)


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(root: Path = ROOT) -> list[str]:
    broken = []
    for doc in doc_files(root):
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"\w+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md":
                prose = FENCE.sub("", path.read_text())
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
                if anchor not in anchors:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


def test_links_resolve():
    broken = broken_links()
    assert not broken, "\n".join(broken)


def module_defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def unknown_names(root: Path = ROOT) -> list[str]:
    """`chexdist.module.name` references (prose and python blocks) that name no module or no top-level name."""
    bad = []
    for doc in doc_files(root):
        text = doc.read_text()
        refs = set(re.findall(r"`(chexdist(?:\.\w+)+)", text))
        for block in code_blocks(text, ("python",)):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chexdist"):
                    refs.update(f"{node.module}.{a.name}" for a in node.names)
        for ref in sorted(refs):
            parts = ref.split(".")
            for n in range(len(parts), 0, -1):
                base = root.joinpath(*parts[:n])
                module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                if module.exists():
                    break
            else:
                bad.append(f"{doc.name}: {ref} (no module)")
                continue
            if n < len(parts) and not module_defines(module, parts[n]):
                bad.append(f"{doc.name}: {ref} ({'.'.join(parts[:n])} has no {parts[n]})")
    return bad


def test_module_names_exist():
    bad = unknown_names()
    assert not bad, "\n".join(bad)


def test_ci_runs_the_readme_test_command():
    blocks = code_blocks((ROOT / "README.md").read_text())
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_is_an_overview():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", ["README.md", "data.md", "training.md", "evaluation.md", "search.md",
                                  "clusters.md", "benchmarks.md", "python-api.md"])
def test_docs_page_exists(page):
    assert (ROOT / "docs" / page).is_file()
