"""The host's half of the CPU balloon without QEMU: the vCPU list QMP gives (checked as
strictly as guest input), and the affinity of threads, tried on this test's own
threads, with every refusal made before any thread is touched."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.errors import ConfigError, FatalBackendError, TransientBackendError
from balloonist.qemu.affinity import narrow_vcpu_affinity, set_vcpu_affinity, vcpu_affinity
from balloonist.qemu.qmp import MAX_THREAD_ID, MAX_VCPUS, parse_vcpu_threads

#: What QEMU 7.2 answers to query-cpus-fast for a 2-vCPU pc guest under TCG.
QUERY_CPUS_FAST = [
    {
        "thread-id": 14323,
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0},
        "qom-path": "/machine/unattached/device[0]",
        "cpu-index": 0,
        "target": "x86_64",
    },
    {
        "thread-id": 14324,
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 1},
        "qom-path": "/machine/unattached/device[2]",
        "cpu-index": 1,
        "target": "x86_64",
    },
]


def test_the_vcpu_list_maps_cpu_index_to_thread_id() -> None:
    assert parse_vcpu_threads(list(reversed(QUERY_CPUS_FAST))) == {0: 14323, 1: 14324}


def test_vcpus_may_share_a_thread_as_under_single_threaded_tcg() -> None:
    shared = [{"cpu-index": i, "thread-id": 77} for i in range(3)]
    assert parse_vcpu_threads(shared) == {0: 77, 1: 77, 2: 77}


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"return": []}, "expected 1 to"),
        ([], "a list of 0"),
        ([{"cpu-index": 0, "thread-id": 1}] * 2, "twice"),
        ([{"cpu-index": 0, "thread-id": 0}], "unusable"),
        ([{"cpu-index": 0, "thread-id": MAX_THREAD_ID + 1}], "unusable"),
        ([{"cpu-index": -1, "thread-id": 7}], "unusable"),
        ([{"cpu-index": MAX_VCPUS, "thread-id": 7}], "unusable"),
        ([{"cpu-index": True, "thread-id": 7}], "unusable"),
        ([{"cpu-index": 0, "thread-id": "7"}], "unusable"),
        ([{"cpu-index": 0}], "unusable"),
        (["x"], "unusable"),
        ([{"cpu-index": i, "thread-id": i + 1} for i in range(MAX_VCPUS + 1)], "expected 1 to"),
    ],
)
def test_an_unusable_vcpu_list_is_refused_whole(reply: Any, why: str) -> None:
    with pytest.raises(FatalBackendError, match=why):
        parse_vcpu_threads(reply)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)


@given(st.lists(st.dictionaries(st.sampled_from(["cpu-index", "thread-id", "x"]), json_values)))
def test_any_reply_gives_a_checked_map_or_a_backend_error(reply: list[dict[str, Any]]) -> None:
    try:
        threads = parse_vcpu_threads(reply)
    except FatalBackendError:
        return
    assert all(0 <= i < MAX_VCPUS and 1 <= t <= MAX_THREAD_ID for i, t in threads.items())
    assert len(threads) == len(reply)  # every vCPU once


# -- affinity, on threads of this process ---------------------------------------------


class Idler:
    """A thread of this process standing in for a vCPU thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._started = threading.Event()
        self.tid = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(5.0)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._started.set()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


@pytest.fixture
def vcpus() -> Iterator[dict[int, int]]:
    idlers = [Idler(), Idler()]
    yield {index: idler.tid for index, idler in enumerate(idlers)}
    for idler in idlers:
        idler.stop()


HOST_CPUS = frozenset(os.sched_getaffinity(0))


def test_narrowing_moves_only_the_vcpu_threads_and_restoring_puts_them_back(
    vcpus: dict[int, int],
) -> None:
    pid = os.getpid()
    before = vcpu_affinity(pid, vcpus)
    assert before == {0: HOST_CPUS, 1: HOST_CPUS}
    grant = frozenset({min(HOST_CPUS)})
    assert narrow_vcpu_affinity(pid, vcpus, grant) == {0: grant, 1: grant}
    assert vcpu_affinity(pid, vcpus) == {0: grant, 1: grant}
    assert os.sched_getaffinity(0) == HOST_CPUS  # the test's own thread is not a vCPU
    assert set_vcpu_affinity(pid, vcpus, before) == before
    assert vcpu_affinity(pid, vcpus) == before


def test_a_thread_of_another_process_is_never_touched(vcpus: dict[int, int]) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(FatalBackendError, match="not a thread of QEMU process"):
            narrow_vcpu_affinity(other.pid, vcpus, {min(HOST_CPUS)})
        assert vcpu_affinity(os.getpid(), vcpus) == {0: HOST_CPUS, 1: HOST_CPUS}
        with pytest.raises(FatalBackendError, match="not a thread of QEMU process"):
            vcpu_affinity(other.pid, vcpus)
    finally:
        other.kill()
        other.wait()
    with pytest.raises(FatalBackendError, match="is not running"):
        vcpu_affinity(other.pid, vcpus)


@pytest.mark.parametrize(
    ("masks", "why"),
    [
        ({0: set()}, "an empty set"),
        ({0: {-1}}, "not host processor numbers"),
        ({0: {1 << 20}}, "not host processor numbers"),
        ({7: {0}}, "no vCPU 7"),
    ],
)
def test_a_bad_grant_is_refused_before_anything_changes(
    vcpus: dict[int, int], masks: dict[int, set[int]], why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        set_vcpu_affinity(os.getpid(), vcpus, masks)
    assert vcpu_affinity(os.getpid(), vcpus) == {0: HOST_CPUS, 1: HOST_CPUS}


def test_a_grant_of_processors_the_host_lacks_is_a_fatal_backend_error(
    vcpus: dict[int, int],
) -> None:
    absent = 8191  # far above any processor this machine has
    assert absent not in HOST_CPUS
    with pytest.raises(FatalBackendError, match="setting vCPU 0's affinity"):
        narrow_vcpu_affinity(os.getpid(), vcpus, {absent})


def test_a_thread_gone_after_the_check_is_a_transient_backend_error(tmp_path: Path) -> None:
    # A thread id no thread can have (above pid_max): an exited thread's id may be
    # reused at once by another thread, which must not be what this test moves.
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    # A /proc that still lists the thread, as the real one did a moment before.
    (tmp_path / "1234" / "task" / str(gone)).mkdir(parents=True)
    with pytest.raises(TransientBackendError, match="went away"):
        narrow_vcpu_affinity(1234, {0: gone}, {min(HOST_CPUS)}, proc_root=tmp_path)
