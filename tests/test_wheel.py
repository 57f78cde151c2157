"""The built wheel works on its own: installed into a fresh venv and run from outside the checkout,
`chexdist --help`, the recipes, published.json and `--space default` resolve from the installed package.

The venv sees the running environment's third-party packages (torch & co.) through a .pth line that names
their site-packages folder as a plain path: that folder's own .pth files (the checkout's editable install)
are not run, and the venv's own site-packages, which holds the wheel, comes first on sys.path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "setup.cfg", "setup.py", "MANIFEST.in", "chexdist", "tune")

pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys
from pathlib import Path
import chexdist, chexdist.config, chexdist.evaluation.evaluate as ev
package = Path(chexdist.__file__).resolve().parent
tuning = [p for p in sorted((package / "tuning").glob("*.py")) if "def space_path(" in p.read_text()]
assert len(tuning) == 1, tuning
name = "chexdist.tuning." + tuning[0].stem
__import__(name)
space_path = sys.modules[name].space_path
print(json.dumps({
    "package": str(package),
    "prefix": sys.prefix,
    "recipe": str(chexdist.config.recipe_path("dannynet").resolve()),
    "recipes": chexdist.config.available_recipes(),
    "published": str(Path(ev.PUBLISHED).resolve()),
    "published_sources": len(ev.load_published()),
    "space": str(Path(space_path("default")).resolve()),
}))
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp: Path, root: Path = ROOT) -> Path:
    """Build from a copy of the sources, so the checkout gets no build/ or egg-info."""
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src], tmp,
        timeout=180)
    wheels = list((tmp / "dist").glob("chexdist-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_running_environment.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp,
        timeout=180)
    return venv


def check_installed(tmp_path: Path, root: Path = ROOT) -> None:
    wheel = build_wheel(tmp_path, root)
    venv = make_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    helped = run([venv / "bin" / "chexdist", "--help"], outside)
    assert "chexdist demo" in helped.stdout

    shown = run([venv / "bin" / "chexdist", "config", "show", "--recipe", "dannynet"], outside)
    assert "loss.name" in shown.stdout and "focal" in shown.stdout

    found = json.loads(run([venv / "bin" / "python", "-I", "-c", PROBE], outside).stdout.strip().splitlines()[-1])
    prefix = Path(found["prefix"]).resolve()
    package = Path(found["package"])
    assert prefix == venv.resolve()
    assert package.is_relative_to(prefix), found
    assert not package.is_relative_to(root), found
    assert set(found["recipes"]) >= {"chexnet", "dannynet", "efficientnet", "vit", "tiny"}
    for key in ("recipe", "published", "space"):
        path = Path(found[key])
        assert path.is_file() and path.is_relative_to(prefix) and not path.is_relative_to(root), (key, found)
    assert Path(found["recipe"]).is_relative_to(package) and Path(found["published"]).is_relative_to(package), found
    assert found["published_sources"] > 0


def test_wheel_resolves_its_data_from_the_installed_package(tmp_path):
    check_installed(tmp_path)
