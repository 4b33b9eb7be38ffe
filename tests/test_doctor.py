"""``balloonist doctor``: each check's verdict from a fake host, and the command on this
one."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from balloonist import cli
from balloonist.doctor import Finding, Verdict, diagnose, qemu_version, render

BALLOON_HELP = "  deflate-on-oom=<bool>\n  free-page-reporting=<bool> - on/off\n"


@dataclass
class FakeHost:
    """A host as the probe reads it; by default one that has everything but libvirt."""

    files: dict[str, str] = field(
        default_factory=lambda: {
            "/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
            "/sys/kernel/mm/ksm/run": "1\n",
            "/sys/kernel/mm/ksm/pages_sharing": "1234\n",
            "/proc/pressure/memory": "some avg10=0.00\n",
            "/proc/meminfo": "MemTotal: 8000000 kB\nSwapTotal: 2097152 kB\n",
        }
    )
    paths: set[str] = field(default_factory=lambda: {"/dev/kvm"})
    writable: set[str] = field(default_factory=lambda: {"/dev/kvm"})
    commands: dict[str, tuple[int, str]] = field(
        default_factory=lambda: {
            "--version": (0, "QEMU emulator version 7.2.22 (Debian)\n"),
            "virtio-balloon-pci,help": (0, BALLOON_HELP),
            "help": (0, 'name "virtio-mem-pci", bus PCI\n'),
        }
    )
    shm_bytes: int | None = 4 << 30
    modules: set[str] = field(default_factory=set)
    libvirt: str | OSError = "9.0.0"
    libvirt_refusal: str | None = None
    kvm_runs: bool = True

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)

    def exists(self, path: str) -> bool:
        return path in self.paths or path in self.files

    def opens_read_write(self, path: str) -> bool:
        return path in self.writable

    def run(self, argv: Sequence[str]) -> tuple[int, str] | None:
        return self.commands.get(argv[-1])

    def free_bytes(self, path: str) -> int | None:
        return self.shm_bytes

    def imports(self, module: str) -> bool:
        return module in self.modules

    def libvirt_version(self, uri: str) -> str:
        if isinstance(self.libvirt, OSError):
            raise self.libvirt
        return self.libvirt

    def libvirt_writable(self, uri: str) -> str | None:
        return self.libvirt_refusal

    def kvm_boots(self) -> bool:
        return self.kvm_runs


def verdicts(host: FakeHost) -> dict[str, Verdict]:
    return {f.check: f.verdict for f in diagnose(host)}


def finding(host: FakeHost, check: str) -> Finding:
    return next(f for f in diagnose(host) if f.check == check)


def test_a_host_with_everything_is_ok_and_libvirt_is_only_a_note() -> None:
    found = verdicts(FakeHost())
    assert found.pop("libvirt") is Verdict.NOTE
    assert set(found.values()) == {Verdict.OK}
    assert list(found) == ["kvm", "qemu", "balloon", "cgroup", "swap", "ksm", "psi", "shm"]
    assert finding(FakeHost(), "swap").detail == "2GiB of swap for host paging"
    assert "1234 pages sharing" in finding(FakeHost(), "ksm").detail


def test_no_qemu_is_a_problem_and_the_exit_code_says_so() -> None:
    host = FakeHost(commands={})
    assert verdicts(host)["qemu"] is Verdict.PROBLEM
    assert verdicts(host)["balloon"] is Verdict.PROBLEM
    out = io.StringIO()
    assert render(diagnose(host), out) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 9 and all(re.match(r"(ok|note|problem) +\w+ {2,}\S", x) for x in lines)
    assert render(diagnose(FakeHost()), io.StringIO()) == 0


@pytest.mark.parametrize(
    ("version", "verdict"),
    [("QEMU emulator version 4.2.1", Verdict.PROBLEM), ("version 5.1.0", Verdict.OK)],
)
def test_an_old_qemu_is_a_problem(version: str, verdict: Verdict) -> None:
    host = FakeHost()
    host.commands["--version"] = (0, version)
    assert verdicts(host)["qemu"] is verdict
    assert qemu_version("garbage") is None


def test_a_balloon_without_free_page_reporting_or_virtio_mem_is_noted() -> None:
    host = FakeHost()
    host.commands["virtio-balloon-pci,help"] = (0, "  deflate-on-oom=<bool>\n")
    del host.commands["help"]
    seen = finding(host, "balloon")
    assert seen.verdict is Verdict.NOTE
    assert "without free-page-reporting" in seen.detail and "no virtio-mem-pci" in seen.detail


def test_kvm_missing_or_closed_to_this_user_is_a_note() -> None:
    assert verdicts(FakeHost(paths=set(), writable=set()))["kvm"] is Verdict.NOTE
    closed = finding(FakeHost(writable=set()), "kvm")
    assert closed.verdict is Verdict.NOTE and "not open" in closed.detail
    hangs = finding(FakeHost(kvm_runs=False), "kvm")
    assert hangs.verdict is Verdict.NOTE and "did not run a boot sector" in hangs.detail


def test_cgroup_versions() -> None:
    v2 = FakeHost()
    assert finding(v2, "cgroup").detail == "cgroup v2 with the memory controller"
    v2.files["/sys/fs/cgroup/cgroup.controllers"] = "cpu io\n"
    assert verdicts(v2)["cgroup"] is Verdict.NOTE
    v1 = FakeHost(files={}, paths={"/sys/fs/cgroup/memory"})
    assert finding(v1, "cgroup").detail == "cgroup v1 memory controller"
    assert verdicts(FakeHost(files={}, paths=set()))["cgroup"] is Verdict.NOTE


def test_missing_ksm_psi_shm_and_swap_are_notes() -> None:
    host = FakeHost(files={}, shm_bytes=None)
    found = verdicts(host)
    assert (found["ksm"], found["psi"], found["shm"], found["swap"]) == (Verdict.NOTE,) * 4
    no_swap = FakeHost()
    no_swap.files["/proc/meminfo"] = "MemTotal: 8000000 kB\nSwapTotal: 0 kB\n"
    assert verdicts(no_swap)["swap"] is Verdict.NOTE


def test_libvirt_version_or_the_reason_it_cannot_connect() -> None:
    host = FakeHost(modules={"libvirt"})
    assert finding(host, "libvirt") == Finding(
        "libvirt", Verdict.OK, "qemu:///system: libvirt 9.0.0, read-write"
    )
    host.libvirt_refusal = "authentication unavailable: no polkit agent"
    read_only = finding(host, "libvirt")
    assert read_only.verdict is Verdict.NOTE
    assert "read-only for this user (authentication unavailable" in read_only.detail
    host.libvirt = OSError("Failed to connect socket to '/run/libvirt/libvirt-sock'\nmore")
    refused = finding(host, "libvirt")
    assert refused.verdict is Verdict.NOTE
    assert (
        refused.detail == "qemu:///system: Failed to connect socket to '/run/libvirt/libvirt-sock'"
    )


def test_the_command_checks_this_host_and_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["doctor", "--libvirt-uri", "test:///default"])
    lines = capsys.readouterr().out.splitlines()
    assert code in (0, 1)
    assert [x.split()[1] for x in lines] == [
        "kvm", "qemu", "balloon", "libvirt", "cgroup", "swap", "ksm", "psi", "shm",
    ]  # fmt: skip
    assert code == int(any(x.startswith("problem") for x in lines))


def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--nope"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
