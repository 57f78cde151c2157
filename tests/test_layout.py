"""The package layout's rules, read from the source with `ast` (nothing is imported):

- the library (data, models, training, evaluation, utils and the shared top-level modules) never imports
  chexdist.cli, chexdist.bench, chexdist.tuning or chexdist.app, not even inside a function; tuning never
  imports cli;
- no module imports another module's `_private` name;
- no import circles among chexdist modules (top-level imports);
- no module over 700 lines and no function over 100 lines (the style goal is about 80).

Each check takes the repository root, so it can be pointed at a scratch copy.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("chexdist.data", "chexdist.models", "chexdist.training", "chexdist.evaluation", "chexdist.utils",
           "chexdist.config", "chexdist.labels", "chexdist.errors", "chexdist.runs")
APPS = ("chexdist.cli", "chexdist.bench", "chexdist.tuning", "chexdist.app")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, tops: tuple[str, ...] = ("chexdist",)) -> dict[str, Path]:
    files = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            files[module_name(root, path)] = path
    return files


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import` (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, nodes, known: set[str]) -> list[tuple[str, int]]:
    """(chexdist module, line) for every import among `nodes`; `from pkg import sub` counts as pkg.sub
    when that is a module, else as pkg."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "chexdist"]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, path, node)
            if base.split(".")[0] != "chexdist":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def top_level_imports(tree: ast.Module):
    """Import statements that run at import time: the module body and its top-level if/try blocks,
    except `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") and \
                    not (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            stack += node.body


def parsed(files: dict[str, Path]) -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}


def wrong_direction_imports(root: Path = ROOT) -> list[str]:
    files = source_files(root)
    trees = parsed(files)
    problems = []
    for name, tree in trees.items():
        if within(name, LIBRARY):
            banned = APPS
        elif within(name, ("chexdist.tuning",)):
            banned = ("chexdist.cli",)
        else:
            continue
        for target, line in imported_modules(name, files[name], ast.walk(tree), set(files)):
            if within(target, banned):
                problems.append(f"{files[name].relative_to(root)}:{line}: {name} imports {target}")
    return problems


def dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_imports(root: Path = ROOT, attributes: bool = True) -> list[str]:
    """`from x import _y` (x a chexdist module, or a relative import), `import chexdist._m`, and, with
    `attributes`, `m._y` where m is a chexdist module bound by an import."""
    files = source_files(root, ("chexdist", "tune", "tests"))
    known = set(files)
    problems = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(root)
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = absolute(name, path, node)
                if base.split(".")[0] != "chexdist" and not node.level:
                    continue
                if any(is_private(p) for p in base.split(".")):
                    problems.append(f"{where}:{node.lineno}: imports private module {base}")
                for alias in node.names:
                    if is_private(alias.name):
                        problems.append(f"{where}:{node.lineno}: from {base} import {alias.name}")
                    elif f"{base}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "chexdist":
                        continue
                    if any(is_private(p) for p in alias.name.split(".")):
                        problems.append(f"{where}:{node.lineno}: imports private module {alias.name}")
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["chexdist"] = "chexdist"
        if not attributes:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                chain = dotted(node.value)
                if chain and chain[0] in aliases:
                    target = ".".join([aliases[chain[0]], *chain[1:]])
                    if target in known and target != name:
                        problems.append(f"{where}:{node.lineno}: uses {target}.{node.attr}")
    return problems


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = source_files(root)
    known = set(files)
    graph = {}
    for name, tree in parsed(files).items():
        targets = {t for t, _ in imported_modules(name, files[name], top_level_imports(tree), known)}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def oversized(root: Path = ROOT) -> list[str]:
    problems = []
    for name, path in source_files(root).items():
        text = path.read_text()
        lines = len(text.splitlines())
        where = path.relative_to(root)
        if lines > MAX_MODULE_LINES:
            problems.append(f"{where}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{where}:{node.lineno}: {node.name} is {length} lines "
                                    f"(at most {MAX_FUNCTION_LINES})")
    return problems


def test_library_never_imports_the_apps():
    problems = wrong_direction_imports()
    assert not problems, "\n".join(problems)


def test_no_private_imports_across_modules():
    problems = private_imports()
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_module_and_function_size():
    problems = oversized()
    assert not problems, "\n".join(problems)


def test_the_checks_see_the_package():
    graph = import_graph()
    assert "chexdist.training.engine" in graph and "chexdist.config" in graph["chexdist.training.engine"]


def test_the_trainer_script_hides_its_own_folder(tmp_path):
    """`accelerate launch chexdist/train.py` runs the file as a script, so Python puts chexdist/ first on
    sys.path; train.py drops it, or `data`, `models`, `utils`... would import as top-level packages."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, importlib.util, sys\n"
        "def _report():\n"
        "    names = ('data', 'models', 'training', 'evaluation', 'utils', 'cli', 'bench', 'tuning')\n"
        "    print('TOPLEVEL', [n for n in names if importlib.util.find_spec(n) is not None], file=sys.stderr)\n"
        "atexit.register(_report)\n")
    result = subprocess.run([sys.executable, str(ROOT / "chexdist" / "train.py"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TOPLEVEL []" in result.stderr, result.stderr[-2000:]
