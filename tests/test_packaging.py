"""The built wheel works outside the source tree: profiles ship as package data, the demo model too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_listed_in_pyproject() -> None:
    """pyproject lists packages by hand (profiles/ ships as offload.profiles), so a new one must be added."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("offload", "cli")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert listed == found | {"offload.profiles"}


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as `pip wheel .` builds it and installed into a directory of its own."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked files: setuptools writes build/ into the tree it builds.
    source = work / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work)]
    subprocess.run([*build, str(source)], check=True, cwd=work, capture_output=True)
    (wheel,) = work.glob("offload-*.whl")
    target = work / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    return target


def _offload(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The wheel's directory first on the path: the editable checkout must not be what answers.
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OFFLOAD_HOME": str(cwd / "home"),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    command = [
        sys.executable,
        "-c",
        "import cli.main, offload; print(offload.__file__); cli.main.run()",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_wheel_lists_profiles_outside_the_tree(installed_wheel: Path, tmp_path: Path) -> None:
    done = _offload(installed_wheel, tmp_path, "profiles", "list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(installed_wheel))
    bundled = sorted(path.stem for path in (ROOT / "profiles").glob("*.toml"))
    for name in bundled:
        assert name in done.stdout


@pytest.mark.slow
def test_installed_wheel_generates_outside_the_tree(installed_wheel: Path, tmp_path: Path) -> None:
    done = _offload(installed_wheel, tmp_path, "generate", "--max-new-tokens", "4", "--json", "Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(installed_wheel))
    result = json.loads(done.stdout.splitlines()[-1])
    assert len(result["token_ids"]) == 4
