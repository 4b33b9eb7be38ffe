"""Build ``balloonist-agent.pyz``: the agent as one file a user copies into a guest.

The archive holds only what the agent imports, all stdlib-only and Python 3.9:

    __main__.py               runs balloonist.agent.main.main()
    balloonist/__init__.py    a minimal one (just __version__), so the guest never
                              depends on what the full package's __init__ imports
    balloonist/{errors,rate,driver}.py
    balloonist/agent/*.py     except this builder

It runs with any ``python3`` >= 3.9: ``python3 balloonist-agent.pyz --help``, or
directly (the shebang is ``/usr/bin/env python3``). Build it with
``python -m balloonist.agent.pyz OUT``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

import balloonist

PACKAGE_DIR = Path(balloonist.__file__).resolve().parent
#: Modules of ``balloonist`` outside ``agent/`` that the agent imports.
SHARED_MODULES = ("errors.py", "rate.py", "driver.py")
#: Host-side tooling in ``agent/`` that the guest does not need.
HOST_ONLY_MODULES = frozenset({"pyz.py"})
INTERPRETER = "/usr/bin/env python3"

_MAIN = '''\
"""balloonist-agent, packed as a zipapp by balloonist.agent.pyz."""

import sys

from balloonist.agent.main import main

sys.exit(main())
'''


def pyz_sources() -> list[tuple[Path, str]]:
    """(source file, name inside the archive) for every module that goes into the pyz."""
    sources = [(PACKAGE_DIR / name, f"balloonist/{name}") for name in SHARED_MODULES]
    for path in sorted((PACKAGE_DIR / "agent").glob("*.py")):
        if path.name not in HOST_ONLY_MODULES:
            sources.append((path, f"balloonist/agent/{path.name}"))
    return sources


def build_pyz(out_path: Path) -> Path:
    """Write the zipapp to ``out_path`` (replacing it) and return the path."""
    with tempfile.TemporaryDirectory(prefix="balloonist-pyz-") as staging:
        root = Path(staging)
        for source, name in pyz_sources():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        (root / "balloonist/__init__.py").write_text(
            '"""balloonist, the subset the guest agent needs."""\n\n'
            f"__version__ = {balloonist.__version__!r}\n",
            encoding="utf-8",
        )
        (root / "__main__.py").write_text(_MAIN, encoding="utf-8")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(root, out_path, interpreter=INTERPRETER, compressed=True)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m balloonist.agent.pyz", description="Build balloonist-agent.pyz."
    )
    parser.add_argument("out", type=Path, help="where to write the .pyz")
    args = parser.parse_args(argv)
    try:
        path = build_pyz(args.out)
    except OSError as exc:
        print(f"balloonist-agent.pyz: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
