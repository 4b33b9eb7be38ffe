"""Which Python runs the shipped agent in the tests: a real 3.9 when there is one."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path


@functools.cache
def python_3_9() -> str | None:
    """A working python3.9 (a pyenv shim may exist and still refuse to run)."""
    candidates = [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))]
    found = shutil.which("python3.9")
    if found:
        candidates.append(found)
    for python in candidates:
        result = subprocess.run([python, "--version"], capture_output=True, timeout=30, check=False)
        if result.returncode == 0:
            return python
    return None
