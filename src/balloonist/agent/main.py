"""balloonist-agent: the user-level balloon driver inside a Linux guest (patent claim 9).

The agent runs the shared :class:`~balloonist.driver.BalloonDriver` with
:class:`~balloonist.agent.linux.LinuxKernel` as its ``GuestKernel`` and the host, over a
virtio-serial port (``docs/agent-protocol.md``), as its ``BalloonChannel``.
:class:`Agent` is the loop, written so tests drive it one step at a time
(``run_once``) with a fake port, kernel, pressure and clock; :func:`main` is the
command line around it. The link and what goes out on it are
:class:`~balloonist.agent.hostlink.HostLink`'s, the CPU balloon is
:class:`~balloonist.agent.cpuside.CpuSide`'s, and the pressure guard is
:class:`~balloonist.agent.guard.PressureGuard`'s; the agent keeps the memory balloon.

The link to the host has three states; each change is logged once:

    DOWN        no port open; try to open it every ``retry_s``
    HELLO_SENT  ``hello`` sent (on opening the port, and again on every ``reset``);
                wait up to ``welcome_timeout_s`` for the ``welcome`` that answers it
    UP          a session: ``target`` sets the balloon; ``locked``, ``unlocked``,
                ``stats`` and ``error`` go out

While not UP the balloon is held where it is (the host may have freed the memory
behind it, so giving it back could overcommit the host, and growing it would report
to no one), and ``unlocked`` reports are dropped: no host knows those pages. The token
is the agent's for its whole life, so a new session can adopt the old balloon: after
``welcome`` the agent reports every page it still holds as ``locked`` (the protocol's
rule 4), and the balloon stays where it was until the host sets a target.

The host cuts off a guest that sends more than 100 messages a second on average or
500 at once; the agent keeps to half of each with a token bucket. Each step may send
only as many ``locked``/``unlocked`` ranges as the bucket holds messages for, and the
target the driver sees is limited to match (at worst one page per range).

Each step: read what the host sent (without blocking; a bad line is logged and
dropped), read the guest's pressure, compute the target the driver sees, adopt old
pages if a new session still has some to report, step the driver, send stats when
due, flush. The **pressure guard** keeps the guest's own processes safe from the
balloon: the driver's target never leaves less than the floor of ``MemAvailable``
(below it, the balloon gives the shortfall back), and while PSI "some" avg10 is above
its limit the balloon does not grow. Either condition also cuts the inflation rate.
The guard only ever lowers the host's target.

The **CPU balloon** (patent claims 11 and 19) runs beside the memory balloon, through
:class:`~balloonist.agent.cpus.CpuBalloon`: ``cpu_target`` sets how many vCPUs it should
hold offline. A target that would leave no vCPU online (or needs more vCPUs than can go
offline) is refused with an ``error`` of code ``cpu-refused`` and the vCPUs stay as they
are. Inflation is paced by the shared adaptive rate, counting vCPUs; deflation is not
paced (a guest given its processors back loses nothing), and both are bounded per step
(``CPU_MAX_PER_STEP``). A ``cpus`` report follows every ``cpu_target`` and every change.
The host *claims* the CPU balloon by sending ``cpu_target`` in a session; the agent
reports only then, so a host without the CPU balloon never sees a CPU message. Held vCPUs
nobody claims for ``cpu_unclaimed_s`` go back online: after a session reset the host
must set the CPU target again (``AgentPort`` sends it with its ``welcome``), else the
guest gets its processors back. Unlike memory, which is held across resets because the
host may have lent it out, an offline vCPU is only a loss to the guest: a host that has
forgotten it would never ask for it back, while a vCPU brought back too early costs at
most some contention on the host processors its threads may still use. vCPUs an
earlier agent held when it died are adopted at start from the balloon's state file
(``CpuBalloon.adopt``), unclaimed like any others.

On SIGTERM or SIGINT the agent brings every reserved vCPU back online, releases every
page (reporting both while UP) and exits 0. Stdlib only, Python 3.9.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable

import balloonist
from balloonist.agent import protocol as proto
from balloonist.agent.adoption import Adoption
from balloonist.agent.cpus import STATE_PATH as CPU_STATE_PATH
from balloonist.agent.cpus import CpuBalloon, CpuHotplug
from balloonist.agent.cpuside import CpuSide
from balloonist.agent.guard import PressureGuard
from balloonist.agent.hostlink import HostLink, Link, LinkSettings, Quiet
from balloonist.agent.port import open_port
from balloonist.agent.pressure import PressureSample, PressureSource
from balloonist.driver import BalloonDriver, GuestKernel, StepResult, UnitRange, count_units
from balloonist.errors import BackendError, BalloonistError, ConfigError
from balloonist.rate import AdaptiveRate, RateLimits, TokenBucket

log = logging.getLogger("balloonist.agent")

PROG = "balloonist-agent"
AGENT_NAME = f"{PROG}/{balloonist.__version__}"
MIB = 1 << 20

#: The default floor of MemAvailable: the larger of these two. 64 MiB keeps a small
#: guest's daemons alive; 5 % is about what Linux's own watermarks and a working page
#: cache need on a large one.
FLOOR_MIN_BYTES = 64 * MIB
FLOOR_FRACTION = 0.05
#: How long shutdown waits for the final ``unlocked`` reports to leave.
SHUTDOWN_FLUSH_S = 2.0
#: The host takes an agent silent (no stats) for 5 s as gone.
MAX_STATS_S = 4.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def rate_limits_for(config: AgentConfig) -> RateLimits:
    """The agent's rate limits, given per second, in pages per step of ``config.step_s``."""
    per_step = config.step_s * MIB / config.page_size_bytes
    start = max(1, round(config.rate_start_mib_s * per_step))
    return RateLimits(
        min_units=start,
        max_units=max(start, round(config.rate_max_mib_s * per_step)),
        increase_units=round(config.rate_increase_mib_s * per_step),
        divisor=RateLimits().divisor,
    )


@dataclass(frozen=True)
class AgentConfig:
    step_s: float = 0.2
    stats_s: float = 1.0
    #: Keep at least this much MemAvailable; None: FLOOR_MIN_BYTES or FLOOR_FRACTION.
    floor_bytes: int | None = None
    #: PSI memory "some" avg10, percent, above which the balloon stops growing.
    psi_limit_percent: float = 10.0
    welcome_timeout_s: float = 10.0
    retry_s: float = 3.0
    #: At most one ``error`` message (and one warning line) per code in this interval.
    error_interval_s: float = 10.0
    page_size_bytes: int = mmap.PAGESIZE
    #: Inflation rate: where it starts (and never falls below), how much each step
    #: that got all it asked for adds, and its ceiling; MiB per second. The defaults
    #: are the shared controller's (balloonist.rate.RateLimits).
    rate_start_mib_s: float = 4.0
    rate_increase_mib_s: float = 16.0
    rate_max_mib_s: float = 1024.0
    #: Reserved vCPUs no host has claimed (sent ``cpu_target`` in a session) for this
    #: long go back online. Long enough for a daemon to reconnect and say what it wants,
    #: short enough that a guest whose daemon has gone does not stay small for long.
    cpu_unclaimed_s: float = 10.0

    def floor_for(self, mem_total_bytes: int) -> int:
        if self.floor_bytes is not None:
            return self.floor_bytes
        return max(FLOOR_MIN_BYTES, int(mem_total_bytes * FLOOR_FRACTION))


class _HostChannel:
    """The driver's ``BalloonChannel``: the guarded target in, reports out through the agent."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def read_target_units(self) -> int:
        return self._agent.driver_target_pages

    def report_locked(self, ranges: Sequence[UnitRange]) -> None:
        self._agent._report_locked(ranges)

    def report_unlocked(self, ranges: Sequence[UnitRange]) -> None:
        self._agent._report_unlocked(ranges)


class Agent:
    """The agent loop; see the module docstring. ``run_once`` is one step.

    ``token`` (16 hex digits) must be the one ``kernel`` writes into its pages.
    """

    def __init__(
        self,
        open_port: Callable[[], int],
        kernel: GuestKernel,
        pressure: PressureSource,
        clock: Callable[[], float],
        token: str,
        config: AgentConfig | None = None,
        *,
        rate: AdaptiveRate | None = None,
        cpus: CpuBalloon | None = None,
    ) -> None:
        """``cpus`` is the CPU balloon; without one every CPU target is refused."""
        self.config = config or AgentConfig()
        self.token = token
        self._pressure = pressure
        self._clock = clock
        rate = rate or AdaptiveRate(rate_limits_for(self.config))
        self.driver = BalloonDriver(kernel, _HostChannel(self), rate)
        self.host_target_pages = 0
        #: What the driver sees this step: the host's target after the guard and budget.
        self.driver_target_pages = 0
        self.guard = PressureGuard(
            self.config.floor_for, self.config.psi_limit_percent, self.config.page_size_bytes
        )
        self.last_sample: PressureSample | None = None
        #: Diagnostics: disconnects, resets, bad_lines, unexpected, sent (messages),
        #: freed_pages (as the host acked them), unreported_pages (given back with no
        #: session), unadopted_pages (given back before a new session heard of them),
        #: cpu_refused, cpu_failures, cpus_taken_back.
        self.counters: Counter[str] = Counter()
        self._quiet = Quiet(self.config.error_interval_s)
        now = clock()
        self.host = HostLink(
            open_port,
            LinkSettings(
                token,
                self.config.page_size_bytes,
                self.config.welcome_timeout_s,
                self.config.retry_s,
            ),
            quiet=self._quiet,
            counters=self.counters,
            on_session_up=self._session_up,
            on_message=self._handle,
            holding=lambda: f"holding the balloon at {self.driver.size_units} pages",
            now=now,
        )
        self.cpu = CpuSide(
            cpus,
            self.host,
            quiet=self._quiet,
            counters=self.counters,
            unclaimed_s=self.config.cpu_unclaimed_s,
            check_s=self.config.stats_s,
        )
        self.adoption = Adoption()  # what the balloon held before the session
        self._next_stats_at = 0.0
        self._closing = False

    @property
    def link(self) -> Link:
        return self.host.state

    @property
    def message_budget(self) -> TokenBucket:
        """What the host's limit on messages leaves this agent (see the module doc)."""
        return self.host.budget

    @property
    def guarded(self) -> bool:
        return self.guard.on

    # -- the step ----------------------------------------------------------------------

    def run_once(self) -> StepResult:
        now = self._clock()
        self.host.service(now)
        sample = self._read_pressure(now)
        self.driver_target_pages = self._limited_target(sample, now)
        self._adopt_old_pages()
        result = self.driver.step()
        if result.failed:
            self.host.send_error(
                "alloc-failed", f"got {result.moved_units} of {result.requested_units} pages", now
            )
        if not self._closing:
            self.cpu.step(now)
        if self.host.up and now >= self._next_stats_at and self.last_sample is not None:
            self._send_stats(self.last_sample)
            self._next_stats_at = now + self.config.stats_s
        self.host.flush(now)
        return result

    def run(self, should_stop: Callable[[], bool], sleep: Callable[[float], None]) -> None:
        """Step every ``step_s`` until ``should_stop()``; the caller then calls ``close``."""
        while not should_stop():
            started = self._clock()
            self.run_once()
            delay_s = started + self.config.step_s - self._clock()
            if delay_s > 0 and not should_stop():
                sleep(delay_s)

    def close(self) -> None:
        """Release the whole balloon (reported if a session is up), then close the port.

        The report stays within the message budget: what does not fit goes back to
        the guest unreported, as when no session is up. The host keeps counting only
        what is still a hole in the guest's RAM, so it learns the truth as the guest
        writes to those pages; and it never sees more than its rate limit allows.
        """
        now = self._clock()
        self.host.budget.refill(now)
        self._closing = True
        self.cpu.release_all(now)
        self.driver.release_all()
        self.host.close(SHUTDOWN_FLUSH_S)

    def report_fatal(self, code: str, message: str) -> None:
        """Tell the host why the agent stops (best effort; it may not be listening)."""
        now = self._clock()
        self._quiet.forget(code)
        self.host.send_error(code, message, now)
        self.host.flush(now)

    # -- what the host says ------------------------------------------------------------

    def _handle(self, message: proto.HostMessage, now: float) -> None:
        if isinstance(message, proto.Target):
            if message.balloon_pages != self.host_target_pages:
                log.debug("target %d pages", message.balloon_pages)
            self.host_target_pages = message.balloon_pages
        elif isinstance(message, proto.CpuTarget):
            self.cpu.set_target(message.reserved_vcpus, now)
        elif isinstance(message, proto.Ack):
            self.counters["freed_pages"] += message.freed_pages

    def _session_up(self, now: float) -> None:
        # The host forgot any earlier balloon at hello; adopt ours into the session, and
        # hold it where it is until the host says otherwise.
        self.adoption.begin(self.driver.size_units)
        self.host_target_pages = self.driver.size_units
        self.cpu.session_started()  # the host's to claim again (see the module docstring)
        self._next_stats_at = now
        log.info("session up (adopting a balloon of %d pages)", self.driver.size_units)

    # -- page reports ------------------------------------------------------------------

    def _report_locked(self, ranges: Sequence[UnitRange]) -> None:
        if self.host.up:  # the guarded target never grows the balloon otherwise
            self.host.send_ranges(proto.Locked, ranges)

    def _report_unlocked(self, ranges: Sequence[UnitRange]) -> None:
        if not self.host.up:
            self.counters["unreported_pages"] += count_units(ranges)
            return
        known = self._known_part(ranges)
        if self._closing:
            budget = self.host.report_budget_ranges()
            self.counters["unreported_pages"] += count_units(known[budget:])
            known = known[:budget]
        if known:
            self.host.send_ranges(proto.Unlocked, known)
            # The driver frees the pages right after this returns: get the report out
            # first where the port allows (the protocol's rule 3). If it must wait, the
            # full-page mark still keeps the host from freeing a page the guest has
            # reused and written.
            self.host.flush(self._clock())

    def _known_part(self, released: Sequence[UnitRange]) -> list[UnitRange]:
        """The part of pages just popped off the driver's stack that the host knows."""
        known, unknown_pages = self.adoption.known_part(released, self.driver.size_units)
        self.counters["unadopted_pages"] += unknown_pages
        return known

    def _adopt_old_pages(self) -> None:
        """Report, as locked, held pages the session does not know yet, within budget."""
        if self.host.up:
            batch = self.adoption.next_batch(self.driver.held, self.host.report_budget_ranges())
            if batch:
                self.host.send_ranges(proto.Locked, batch)

    def _send_stats(self, sample: PressureSample) -> None:
        self.host.send(
            proto.Stats(
                seq=self.host.next_seq(),
                balloon_pages=self.driver.size_units,
                rate_pages=self.driver.rate.step_units,
                mem_total_bytes=min(sample.mem_total_bytes, _MAX_BYTES),
                mem_available_bytes=min(sample.mem_available_bytes, _MAX_BYTES),
                psi_some_avg10=sample.psi_some_avg10,
                psi_full_avg10=sample.psi_full_avg10,
                refaults=min(sample.refaults, proto.MAX_COUNTER),
                swap_in_pages=min(sample.swap_in_pages, proto.MAX_COUNTER),
                swap_out_pages=min(sample.swap_out_pages, proto.MAX_COUNTER),
                psi_some_total_us=min(sample.psi_some_total_us, proto.MAX_COUNTER),
                swap_used_bytes=min(sample.swap_used_bytes, _MAX_BYTES),
            )
        )

    # -- the target the driver sees ------------------------------------------------------

    def _read_pressure(self, now: float) -> PressureSample | None:
        try:
            sample = self._pressure.read()
        except BackendError as exc:
            if self._quiet.due("pressure-read", now):
                log.warning("%s; the balloon will not grow until it can be read", exc)
            return None
        self.last_sample = sample
        return sample

    def _limited_target(self, sample: PressureSample | None, now: float) -> int:
        """The host's target, lowered by the pressure guard, paced by the message budget."""
        size = self.driver.size_units
        # Without a session, hold: the host may have freed the memory behind the balloon.
        target = self.host_target_pages if self.host.up else size
        target = min(target, self._guard_limit(sample, now))
        budget = self.host.report_budget_ranges()
        if target > size:  # at worst each new page is its own range
            return min(target, size + budget)
        if target < size:  # the newest ranges go first; at least one message's worth
            newest = self.driver.held[-max(budget, proto.MAX_RANGES_PER_MESSAGE) :]
            return max(target, size - count_units(newest))
        return target

    def _guard_limit(self, sample: PressureSample | None, now: float) -> int:
        """The largest balloon the guest's pressure allows now."""
        size = self.driver.size_units
        if sample is None:
            return size  # blind: never grow
        verdict = self.guard.judge(sample, size)
        if verdict.on:
            self.driver.rate.on_failure()
        if verdict.changed:
            log.info("pressure guard %s: %s", "on" if verdict.on else "off", verdict.what)
            if verdict.on:
                self.host.send_error("pressure", f"guard on: {verdict.what}", now)
        return verdict.limit_pages


_MAX_BYTES = proto.MAX_PFN * 4096


# -- the command line ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "The balloonist balloon agent: run as root inside a Linux guest. It pins guest"
            " pages the host asks for, over the virtio-serial port "
            f"{proto.PORT_NAME}, and gives them back when the guest runs short."
        ),
    )
    parser.add_argument(
        "--port",
        type=Path,
        help=f"the port device (default /dev/virtio-ports/{proto.PORT_NAME}, or the vport"
        " of that name)",
    )
    parser.add_argument("--step-s", type=float, default=0.2, help="seconds per step (0.2)")
    parser.add_argument(
        "--stats-s",
        type=float,
        default=1.0,
        help=f"seconds between stats (1, at most {MAX_STATS_S:g})",
    )
    parser.add_argument(
        "--floor-mib",
        type=int,
        help="keep at least this many MiB of MemAvailable (default: 64, or 5%% of MemTotal"
        " if that is more)",
    )
    parser.add_argument(
        "--psi-limit",
        type=float,
        default=10.0,
        help="PSI memory 'some' avg10 (percent) above which the balloon stops growing (10)",
    )
    parser.add_argument(
        "--rate-start",
        type=float,
        default=AgentConfig.rate_start_mib_s,
        metavar="MIB_S",
        help="inflation rate to start from and never fall below, MiB/s (4)",
    )
    parser.add_argument(
        "--rate-increase",
        type=float,
        default=AgentConfig.rate_increase_mib_s,
        metavar="MIB_S",
        help="added to the rate by every step that got all it asked for, MiB/s (16)",
    )
    parser.add_argument(
        "--rate-max",
        type=float,
        default=AgentConfig.rate_max_mib_s,
        metavar="MIB_S",
        help="the highest inflation rate, MiB/s (1024)",
    )
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="leave oom_score_adj and vm.compact_unevictable_allowed alone",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every target")
    parser.add_argument("--version", action="version", version=AGENT_NAME)
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
    if not 0.01 <= args.step_s <= 60:
        raise ConfigError("must be between 0.01 and 60 seconds", where="--step-s")
    if not 0.01 <= args.stats_s <= MAX_STATS_S:
        # stats are the heartbeat: the host takes an agent silent for 5 s as gone
        raise ConfigError(f"must be between 0.01 and {MAX_STATS_S:g} seconds", where="--stats-s")
    if not 0.0 <= args.psi_limit <= 100.0:
        raise ConfigError("must be a percentage, 0 to 100", where="--psi-limit")
    if args.floor_mib is not None and not 0 <= args.floor_mib <= 1 << 30:
        raise ConfigError("must be a number of MiB, 0 to 2**30", where="--floor-mib")
    for flag, value in (
        ("--rate-start", args.rate_start),
        ("--rate-increase", args.rate_increase),
        ("--rate-max", args.rate_max),
    ):
        if not 0.0 <= value <= 1 << 20:
            raise ConfigError("must be MiB/s, 0 to 2**20", where=flag)
    if args.rate_start <= 0:
        raise ConfigError("must be above 0", where="--rate-start")
    if args.rate_max < args.rate_start:
        raise ConfigError("must not be below --rate-start", where="--rate-max")
    return AgentConfig(
        rate_start_mib_s=args.rate_start,
        rate_increase_mib_s=args.rate_increase,
        rate_max_mib_s=args.rate_max,
        step_s=args.step_s,
        stats_s=args.stats_s,
        floor_bytes=None if args.floor_mib is None else args.floor_mib * MIB,
        psi_limit_percent=args.psi_limit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"{PROG}: %(message)s",
    )
    try:
        return _run(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BalloonistError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except OSError as exc:  # /proc or the port refused in a way we did not foresee
        _error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return EXIT_FAILURE


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.splitlines())}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    # Imported here: Linux-only, and --help should work anywhere.
    from balloonist.agent.linux import prepare_host
    from balloonist.agent.pressure import ProcPressure

    config = _config(args)
    pressure = ProcPressure()
    pressure.read()  # fails now, in one line, if /proc lacks what the guard needs
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tuning = None if args.no_tune else prepare_host()
    try:
        _serve(args.port, config, pressure, lambda: stopping)
    finally:
        if tuning is not None:
            tuning.restore()
    log.info("stopped; balloon released")
    return EXIT_OK


def _serve(
    port_path: Path | None,
    config: AgentConfig,
    pressure: PressureSource,
    should_stop: Callable[[], bool],
) -> None:
    from balloonist.agent.linux import LinuxKernel, PagemapError

    # One token for the agent's life: a new session adopts the balloon with it.
    token = secrets.token_hex(8)
    kernel = LinuxKernel(token)
    cpus = CpuBalloon(CpuHotplug(), CPU_STATE_PATH)
    try:
        adopted = cpus.adopt()
    except BackendError as exc:
        log.warning("cannot look for vCPUs an earlier agent held: %s", exc)
    else:
        if adopted:
            # Claimed again by a host within cpu_unclaimed_s, or given back.
            log.info("adopted vCPU(s) %s, held offline by an earlier agent", adopted)
    try:
        kernel.probe()
        agent = Agent(
            lambda: open_port(port_path),
            kernel,
            pressure,
            time.monotonic,
            token,
            config,
            cpus=cpus,
        )
        log.info("started (%s); waiting for the host", AGENT_NAME)
        try:
            agent.run(should_stop, time.sleep)
        except BalloonistError as exc:
            agent.report_fatal("pagemap" if isinstance(exc, PagemapError) else "internal", str(exc))
            raise
        finally:
            try:
                agent.close()
            except (BalloonistError, RuntimeError) as exc:
                log.warning("releasing the balloon: %s", exc)
    finally:
        kernel.close()
