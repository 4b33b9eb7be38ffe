"""The KSM rule (when to run it, how fast), the kernel's files as read and written."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.errors import BackendError, FatalBackendError
from balloonist.ksm import (
    RUN_RUN,
    RUN_STOP,
    KsmKnobs,
    KsmParams,
    SysKernelKsm,
    ksm_setting,
    parse_ksm_stat,
)
from balloonist.units import PAGE_SIZE_BYTES

P = KsmParams()  # start below 20 % free, stop above 30 %, 100-1000 pages, 20 ms


def test_off_while_memory_is_plentiful_and_on_below_the_start_threshold() -> None:
    assert ksm_setting(0.5, running=False, params=P) == KsmKnobs(RUN_STOP, 100, 20)
    assert ksm_setting(0.5, running=True, params=P).run == RUN_STOP
    assert ksm_setting(0.19, running=False, params=P).run == RUN_RUN


def test_between_the_thresholds_it_stays_as_it_is() -> None:
    # 25 % free: above the start threshold, below the stop one.
    assert ksm_setting(0.25, running=False, params=P).run == RUN_STOP
    assert ksm_setting(0.25, running=True, params=P) == KsmKnobs(RUN_RUN, 100, 20)


def test_the_scan_rate_rises_to_the_maximum_as_free_memory_runs_out() -> None:
    assert ksm_setting(0.20 - 1e-9, running=False, params=P).pages_to_scan == 100
    assert ksm_setting(0.10, running=True, params=P).pages_to_scan == 550
    assert ksm_setting(0.0, running=True, params=P).pages_to_scan == 1000


@given(
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_less_free_memory_never_scans_slower(a: float, b: float, running: bool) -> None:
    low, high = sorted((a, b))
    at_low, at_high = ksm_setting(low, running, P), ksm_setting(high, running, P)
    assert at_low.run >= at_high.run
    for knobs in (at_low, at_high):
        assert P.pages_to_scan_min <= knobs.pages_to_scan <= P.pages_to_scan_max
        assert knobs.sleep_ms == P.sleep_ms
    if at_low.running and at_high.running:
        assert at_low.pages_to_scan >= at_high.pages_to_scan


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"start_below_free": 0.4, "stop_above_free": 0.3}, "start_below_free"),
        ({"start_below_free": 0.0}, "start_below_free"),
        ({"pages_to_scan_min": 2000}, "pages_to_scan_min"),
        ({"sleep_ms": 0}, "sleep_ms"),
    ],
)
def test_parameters_that_do_not_fit_are_refused(kwargs: dict[str, float], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        KsmParams(**kwargs)  # type: ignore[arg-type]


def test_a_process_ksm_stat_as_linux_6_18_writes_it() -> None:
    text = (
        "ksm_rmap_items 512\nksm_zero_pages 3\nksm_merging_pages 300\n"
        "ksm_process_profit 1200000\nksm_merge_any: no\nksm_mergeable: yes\n"
    )
    stat = parse_ksm_stat(text)
    assert stat.merging_pages == 300
    assert stat.profit_bytes == 1_200_000


def test_an_older_kernel_or_a_strange_line_gives_what_is_known() -> None:
    assert parse_ksm_stat("ksm_rmap_items 5\n").merging_pages == 0
    assert parse_ksm_stat("ksm_rmap_items 5\n").profit_bytes is None
    assert parse_ksm_stat("ksm_process_profit -4096\n").profit_bytes == -4096
    odd = parse_ksm_stat("ksm_merging_pages 12x\nksm_process_profit " + "9" * 40 + "\n")
    assert odd.merging_pages == 0 and odd.profit_bytes is None


def _sysfs(root: Path, **values: int) -> SysKernelKsm:
    root.mkdir()
    defaults = {
        "run": 0,
        "pages_to_scan": 100,
        "sleep_millisecs": 20,
        "pages_shared": 7,
        "pages_sharing": 40,
        "full_scans": 2,
    }
    for name, value in {**defaults, **values}.items():
        (root / name).write_text(f"{value}\n")
    return SysKernelKsm(root)


def test_the_kernel_files_are_read_and_written_run_last(tmp_path: Path) -> None:
    ksm = _sysfs(tmp_path / "ksm")
    assert ksm.available()
    assert ksm.knobs() == KsmKnobs(0, 100, 20)
    written: list[str] = []
    real_write = Path.write_text

    def spy(self: Path, data: str, *args: object, **kwargs: object) -> int:
        written.append(self.name)
        return real_write(self, data, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", spy)
        ksm.set_knobs(KsmKnobs(RUN_RUN, 700, 15))
    assert written == ["pages_to_scan", "sleep_millisecs", "run"]
    assert ksm.knobs() == KsmKnobs(RUN_RUN, 700, 15)


def test_the_totals_use_the_kernels_profit_where_it_has_one(tmp_path: Path) -> None:
    old = _sysfs(tmp_path / "old").totals()
    assert (old.pages_shared, old.pages_sharing, old.full_scans) == (7, 40, 2)
    assert old.profit_bytes is None and old.saved_bytes == 40 * PAGE_SIZE_BYTES
    new = _sysfs(tmp_path / "new", general_profit=123456).totals()
    assert new.saved_bytes == 123456


def test_a_kernel_without_ksm_and_files_that_fail(tmp_path: Path) -> None:
    missing = SysKernelKsm(tmp_path / "none")
    assert not missing.available()
    with pytest.raises(BackendError, match="cannot read"):
        missing.knobs()
    with pytest.raises(FatalBackendError, match="cannot write"):
        missing.set_knobs(KsmKnobs(RUN_RUN, 100, 20))
    garbled = _sysfs(tmp_path / "garbled")
    (garbled.root / "run").write_text("on\n")
    with pytest.raises(BackendError, match="not a number"):
        garbled.knobs()
