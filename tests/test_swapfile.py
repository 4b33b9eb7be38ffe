"""The host swap file the VM benches and tests page to: on for the block, off and gone
after; a failed command is an error with its fields, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonist.errors import HostCommandError
from balloonist.swapfile import swap_file
from balloonist.units import MIB

pytestmark = pytest.mark.root(reason="swapon needs root")


def _swaps() -> list[str]:
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    return [line.split()[0] for line in lines]


def test_the_file_is_swap_for_the_block_and_gone_after(tmp_path: Path) -> None:
    with swap_file(tmp_path, 16 * MIB) as path:
        assert str(path) in _swaps()
        assert path.stat().st_size == 16 * MIB
        assert path.stat().st_mode & 0o777 == 0o600
    assert str(path) not in _swaps()
    assert not path.exists()


def test_a_refused_swapon_is_an_error_naming_it_and_leaves_no_file() -> None:
    # tmpfs cannot hold swap: swapon refuses the file
    shm = Path("/dev/shm")
    with pytest.raises(HostCommandError) as caught, swap_file(shm, 1 * MIB):
        pytest.fail("the block ran without swap")
    assert caught.value.command[0] == "swapon"
    assert caught.value.said
    assert not (shm / "host.swap").exists()


@pytest.mark.parametrize("size_bytes", [0, -MIB, MIB + 1])
def test_a_size_that_is_not_whole_mib_is_refused(tmp_path: Path, size_bytes: int) -> None:
    with pytest.raises(ValueError, match="MiB"), swap_file(tmp_path, size_bytes):
        pass
    assert not any(tmp_path.iterdir())
