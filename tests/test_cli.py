"""The `chexdist` command as a new user meets it: one module per stage registers its commands, a
missing optional extra is one line naming it, and inputs that are not there are named as such."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chexdist.cli import evaluation, main as cli
from chexdist.bench.suites import SUITES
from tests.conftest import REPO

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Refuse())
"""


def chexdist_without(tmp_path: Path, blocked: set[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m chexdist ARGS` in a process where importing any of `blocked` fails as if not installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=sorted(blocked))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "chexdist", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_every_command_comes_from_its_stage_module():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == ["synth", "pack", "shards", "train", "config", "bench", "tune", "demo", "predict", "cam",
                                 "evaluate", "import-checkpoint", "app", "export"]
    owners = {name: p.get_default("func").__module__ for name, p in sub.choices.items() if p.get_default("func")}
    assert owners == {"synth": "chexdist.cli.prepare", "pack": "chexdist.cli.prepare", "train": "chexdist.cli.training",
                      "bench": "chexdist.cli.bench", "tune": "chexdist.cli.tuning", "demo": "chexdist.cli.training",
                      "predict": "chexdist.cli.evaluation", "cam": "chexdist.cli.evaluation",
                      "evaluate": "chexdist.cli.evaluation", "import-checkpoint": "chexdist.cli.evaluation",
                      "app": "chexdist.cli.app", "export": "chexdist.cli.export"}


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    def needs_ray(**options):
        raise ModuleNotFoundError("No module named 'ray'", name="ray.tune")

    monkeypatch.setitem(SUITES, "tune", needs_ray)
    assert cli.main(["bench", "tune"]) == 2
    assert capsys.readouterr().err.splitlines() == ["chexdist: error: bench tune needs ray: pip install 'chexdist[tune]'"]

    def needs_scipy(args):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy.stats")

    monkeypatch.setattr(evaluation, "cmd_evaluate", needs_scipy)
    assert cli.main(["evaluate", "--run", "r", "--ci", "bca"]) == 2
    assert capsys.readouterr().err.splitlines() == ["chexdist: error: evaluate needs scipy: pip install 'chexdist[bca]'"]

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'chexdist.nowhere'", name="chexdist.nowhere")

    monkeypatch.setattr(evaluation, "cmd_evaluate", needs_something_else)
    with pytest.raises(ModuleNotFoundError):  # a bug, not a missing extra: the traceback stays
        cli.main(["evaluate", "--run", "r"])


@pytest.mark.slow
def test_cam_without_grad_cam_says_which_extra(trained_run, tmp_path):
    from tests.conftest import REAL_IMAGES

    image = sorted(REAL_IMAGES.glob("*.png"))[0]
    done = chexdist_without(tmp_path, {"pytorch_grad_cam"}, "cam", "--run", str(trained_run), str(image),
                            "--out", str(tmp_path / "cams"), "--quiet")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chexdist: error: ") and "pip install 'chexdist[cam]'" in lines[0], lines


def test_a_refused_pack_leaves_no_out_folder(synth_root, tmp_path, capsys):
    for n, flags in enumerate((["--fractions", "0.5", "0.5", "0.5"], ["--split", "official", "--val-fraction", "2"])):
        out = tmp_path / f"out-{n}" / "shards"
        assert cli.main(["pack", "--nih-root", str(synth_root), "--out", str(out), "--quiet", *flags]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
        assert not out.exists() and not out.parent.exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cam", "predict"])
def test_a_missing_file_is_named_and_nothing_else_claimed(command, trained_run, tmp_path, capsys):
    missing = tmp_path / "x.png"
    out = ["--out", str(tmp_path / "cams")] if command == "cam" else []  # predict: JSON on stdout
    assert cli.main([command, "--run", str(trained_run), str(missing), *out, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"chexdist: error: {missing}: file not found"]
    assert "overlay" not in captured.out and "others" not in captured.err
    other = tmp_path / "y.png"
    assert cli.main([command, "--run", str(trained_run), str(missing), str(other), *out, "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"chexdist: error: {missing}: file not found", f"chexdist: error: {other}: file not found",
        "chexdist: none of the 2 inputs could be read (listed above)",
    ]
