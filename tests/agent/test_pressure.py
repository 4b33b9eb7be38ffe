"""Reading guest pressure from /proc text: real formats, older kernels, missing and
hostile content, and the reader over fake files."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonist.agent.pressure import (
    MAX_PROC_FILE_BYTES,
    NO_PSI,
    NO_PSI_TOTAL,
    ProcPressure,
    parse_meminfo,
    parse_psi,
    parse_vmstat,
    read_bounded,
)
from balloonist.errors import FatalBackendError, TransientBackendError

MEMINFO = """\
MemTotal:        4028440 kB
MemFree:         3721056 kB
MemAvailable:    3057888 kB
Buffers:            3992 kB
"""
VMSTAT = """\
nr_free_pages 930264
workingset_refault_anon 12
workingset_refault_file 2075604
pswpin 3
pswpout 40
"""
PSI = """\
some avg10=12.50 avg60=3.00 avg300=0.70 total=123456
full avg10=1.25 avg60=0.00 avg300=0.00 total=1000
"""


def test_meminfo_gives_total_available_and_swap_in_use_in_bytes() -> None:
    with_swap = MEMINFO + "SwapTotal: 1048572 kB\nSwapFree: 1000000 kB\n"
    assert parse_meminfo(with_swap) == (4028440 * 1024, 3057888 * 1024, 48572 * 1024)


def test_meminfo_without_swap_uses_none() -> None:
    assert parse_meminfo(MEMINFO)[2] == 0


@pytest.mark.parametrize(
    "text",
    [
        "MemTotal: 100 kB\n",  # a kernel before 3.14 has no MemAvailable
        "MemTotal: 100 kB\nMemAvailable: lots kB\n",
        "MemTotal: 100 MB\nMemAvailable: 50 kB\n",
        "MemTotal: 1" + "0" * 30 + " kB\nMemAvailable: 50 kB\n",
    ],
)
def test_meminfo_without_usable_fields_is_refused(text: str) -> None:
    with pytest.raises(FatalBackendError):
        parse_meminfo(text)


def test_vmstat_sums_anon_and_file_refaults() -> None:
    assert parse_vmstat(VMSTAT) == (12 + 2075604, 3, 40)


def test_vmstat_before_linux_5_9_has_one_refault_counter() -> None:
    assert parse_vmstat("workingset_refault 77\npswpin 1\n") == (77, 1, 0)


def test_vmstat_ignores_what_it_cannot_read() -> None:
    text = "pswpin -4\npswpout 1" + "9" * 40 + "\nworkingset_refault_file x\nodd line here\n"
    assert parse_vmstat(text) == (0, 0, 0)


def test_psi_gives_some_and_full_avg10_and_the_some_total() -> None:
    assert parse_psi(PSI) == (12.5, 1.25, 123456)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (NO_PSI, NO_PSI, NO_PSI_TOTAL)),
        ("some avg10=4.00 avg60=0.00 avg300=0.00 total=1\n", (4.0, NO_PSI, 1)),  # no "full"
        ("some avg10=nan\nfull avg10=inf\n", (NO_PSI, NO_PSI, NO_PSI_TOTAL)),
        ("some avg10=250.0\nfull avg10=" + "1" * 100 + "\n", (NO_PSI, NO_PSI, NO_PSI_TOTAL)),
        ("some avg10=x total=-3\n", (NO_PSI, NO_PSI, NO_PSI_TOTAL)),
        ("some avg10=1.00 total=" + "9" * 30 + "\n", (1.0, NO_PSI, NO_PSI_TOTAL)),
    ],
)
def test_psi_odd_or_missing_values_read_as_no_psi(
    text: str, expected: tuple[float, float, int]
) -> None:
    assert parse_psi(text) == expected


def test_reads_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"a" * (MAX_PROC_FILE_BYTES * 2))
    assert len(read_bounded(path)) == MAX_PROC_FILE_BYTES


def write_proc(tmp_path: Path, psi: str | None = PSI) -> ProcPressure:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "vmstat").write_text(VMSTAT)
    if psi is not None:
        (tmp_path / "psi").write_text(psi)
    return ProcPressure(tmp_path / "meminfo", tmp_path / "vmstat", tmp_path / "psi")


def test_reader_combines_the_three_files(tmp_path: Path) -> None:
    sample = write_proc(tmp_path).read()
    assert sample.mem_available_bytes == 3057888 * 1024
    assert (sample.psi_some_avg10, sample.psi_full_avg10) == (12.5, 1.25)
    assert (sample.refaults, sample.swap_in_pages, sample.swap_out_pages) == (2075616, 3, 40)


def test_reader_without_psi_reports_no_psi(tmp_path: Path) -> None:
    sample = write_proc(tmp_path, psi=None).read()
    assert (sample.psi_some_avg10, sample.psi_full_avg10) == (NO_PSI, NO_PSI)


def test_reader_fails_transiently_when_meminfo_cannot_be_read(tmp_path: Path) -> None:
    reader = write_proc(tmp_path)
    (tmp_path / "meminfo").unlink()
    with pytest.raises(TransientBackendError):
        reader.read()


def test_reader_reads_this_machine() -> None:
    sample = ProcPressure().read()
    assert 0 < sample.mem_available_bytes <= sample.mem_total_bytes
