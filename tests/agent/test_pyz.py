"""The shipped agent: one .pyz that runs with nothing but a Python >= 3.9 stdlib.

Three checks, each able to fail on its own: the archive runs in an interpreter that
cannot see site-packages (``-I -S``); every module it loads comes from the archive or
the stdlib; and vermin finds nothing newer than 3.9 in any file that goes in (a check
shown to catch 3.10 features). If a Python 3.9 is installed, the archive also runs on it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from balloonist.agent.pyz import build_pyz, pyz_sources

from .interpreters import python_3_9

#: -I: no PYTHONPATH, no user site, no current directory; -S: no site-packages either,
#: so only the archive and the stdlib can be imported.
STDLIB_ONLY = ["-I", "-S"]
VERMIN_FLAGS = ["--target=3.9-", "--violations", "--no-tips", "--no-parse-comments", "-q"]


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz") / "balloonist-agent.pyz")


def run(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *args], capture_output=True, text=True, timeout=60, cwd="/", check=False
    )


def test_the_archive_holds_the_agent_and_its_shared_modules(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
    assert {
        "__main__.py",
        "balloonist/__init__.py",
        "balloonist/driver.py",
        "balloonist/rate.py",
        "balloonist/errors.py",
        "balloonist/agent/main.py",
        "balloonist/agent/linux.py",
        "balloonist/agent/protocol.py",
    } <= names
    assert not any("test" in name or name.endswith("pyz.py") for name in names)
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_the_archive_runs_without_site_packages(pyz: Path) -> None:
    result = run(sys.executable, *STDLIB_ONLY, str(pyz), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: balloonist-agent")


def test_every_module_it_loads_is_in_the_archive_or_the_stdlib(pyz: Path) -> None:
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(pyz)!r})\n"
        "import balloonist.agent.main, balloonist.agent.linux, balloonist.agent.pressure\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    print(name, getattr(module, '__file__', None) or '-')\n"
    )
    result = run(sys.executable, *STDLIB_ONLY, "-c", script)
    assert result.returncode == 0, result.stderr
    stdlib = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib")}
    outside = []
    for line in result.stdout.splitlines():
        _name, _, file = line.partition(" ")
        if file == "-":
            continue  # built in
        path = Path(file).resolve()
        if not (file.startswith(str(pyz)) or any(root in path.parents for root in stdlib)):
            outside.append(line)
    assert outside == []
    assert f"balloonist.agent.main {pyz}" in result.stdout


def vermin(*paths: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("vermin")
    # vermin has no ``__main__``; run its entry point the way its console script does
    entry = "import sys; from vermin import main; sys.exit(main())"
    return run(sys.executable, "-c", entry, *VERMIN_FLAGS, *map(str, paths))


def test_vermin_catches_3_10_features(tmp_path: Path) -> None:
    samples = {
        "match.py": "def f(x):\n    match x:\n        case 1:\n            return 1\n",
        "zip_strict.py": "pairs = list(zip([1], [2], strict=True))\n",
        "slots.py": (
            "import dataclasses\n\n@dataclasses.dataclass(slots=True)\nclass A:\n    x: int\n"
        ),
        "tomllib.py": "import tomllib\n",
    }
    for name, text in samples.items():
        path = tmp_path / name
        path.write_text("from __future__ import annotations\n\n" + text)
        assert vermin(path).returncode != 0, name


def test_every_file_in_the_archive_is_python_3_9() -> None:
    result = vermin(*(source for source, _ in pyz_sources()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_in_the_archive_defers_annotations() -> None:
    # so ``X | None`` and ``list[int]`` in annotations are never evaluated on 3.9
    for source, _ in pyz_sources():
        text = source.read_text()
        body = ast.parse(text).body
        if body and not (len(body) == 1 and isinstance(body[0], ast.Expr)):  # not a docstring
            assert "from __future__ import annotations" in text, source


@pytest.mark.skipif(python_3_9() is None, reason="no Python 3.9 on this machine")
def test_the_archive_runs_on_python_3_9(pyz: Path) -> None:
    python = python_3_9()
    assert python is not None
    result = run(python, *STDLIB_ONLY, str(pyz), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("balloonist-agent/")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(pyz)!r})\n"
        "import balloonist.agent.main, balloonist.agent.linux, balloonist.agent.pressure\n"
        "print(balloonist.agent.pressure.ProcPressure().read().mem_total_bytes > 0)\n"
    )
    result = run(python, *STDLIB_ONLY, "-c", script)
    assert result.returncode == 0 and result.stdout == "True\n", result.stderr
