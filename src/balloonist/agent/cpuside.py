"""The agent's CPU balloon duty (patent claims 11 and 19): the host's ``cpu_target``
in, bounded steps of :class:`~balloonist.agent.cpus.CpuBalloon`, ``cpus`` reports out.

The rules (refusals, pacing, claiming, unclaimed vCPUs going back online) are in
:mod:`balloonist.agent.main`'s docstring. Stdlib only, Python 3.9.
"""

from __future__ import annotations

import logging
from collections import Counter

from balloonist.agent import protocol as proto
from balloonist.agent.cpus import CpuBalloon, CpuTargetError, CpuView, format_cpu_list
from balloonist.agent.hostlink import HostLink, Quiet
from balloonist.errors import BackendError, BalloonistError
from balloonist.rate import AdaptiveRate, RateLimits

log = logging.getLogger("balloonist.agent")

#: At most this many vCPUs go offline or come back in one step: each hotplug write took
#: 30-110 ms in a TCG guest here (less under KVM), so a step stays well under a second
#: and the stats heartbeat (the host waits 5 s) keeps going.
CPU_MAX_PER_STEP = 8


class CpuSide:
    """The CPU balloon as the host sees it through the agent.

    ``balloon`` None: every CPU target is refused. ``unclaimed_s``: how long held vCPUs
    wait for a host to claim them before going back online; ``check_s``: how often the
    guest's vCPUs are looked at again (someone else may change them).
    """

    def __init__(
        self,
        balloon: CpuBalloon | None,
        link: HostLink,
        *,
        quiet: Quiet,
        counters: Counter[str],
        unclaimed_s: float,
        check_s: float,
    ) -> None:
        self.balloon = balloon
        self._link = link
        self._quiet = quiet
        self._counters = counters
        self._unclaimed_s = unclaimed_s
        self._check_s = check_s
        #: The CPU balloon register; None until a host sets it in this session.
        self.host_target: int | None = None
        self._rate: AdaptiveRate | None = None
        self._unclaimed_since: float | None = None
        self._report_due = False
        self._changed = False
        self._last_view: CpuView | None = None
        self._next_check_at = 0.0

    @property
    def claimed(self) -> bool:
        """A host has set the CPU target in this session: it hears about the CPU balloon."""
        return self._link.up and self.host_target is not None

    def session_started(self) -> None:
        """A new session: the CPU balloon is the host's to claim again."""
        self.host_target = None
        self._last_view = None

    def set_target(self, target: int, now: float) -> None:
        """The host's ``cpu_target``: accept it, or refuse it and keep the vCPUs as they are."""
        held = len(self.balloon.held) if self.balloon is not None else 0
        previous = self.host_target
        self.host_target = held  # claimed from now on; stays here if refused
        self._report_due = True
        try:
            if self.balloon is None:
                raise CpuTargetError("this agent has no CPU balloon")
            self.balloon.check_target(target)
            if max(self.balloon.hotplug.possible(), default=0) >= proto.MAX_VCPUS:
                raise CpuTargetError(f"vCPU numbers reach {proto.MAX_VCPUS} or more")
        except CpuTargetError as exc:
            self._counters["cpu_refused"] += 1
            log.info("CPU target %d refused: %s", target, exc)
            # Every refusal answers a host's request; one per distinct target per interval
            # keeps a host that repeats itself from running through the message budget.
            if self._quiet.due(f"cpu-refused:{target}", now):
                text = f"cpu_target {target} refused: {exc}"[: proto.MAX_TEXT_CHARS]
                self._link.send(
                    proto.Error(seq=self._link.next_seq(), code="cpu-refused", message=text)
                )
            return
        except BackendError as exc:
            self._failed(f"cannot read the guest's vCPUs: {exc}", now)
            return
        if target != previous:
            log.info("CPU target %d vCPUs (holding %d)", target, held)
        self.host_target = target

    def step(self, now: float) -> None:
        """Move the CPU balloon one bounded step towards its goal; report what changed."""
        balloon = self.balloon
        if balloon is None:
            return
        claimed = self.claimed
        if claimed:
            self._unclaimed_since = None
        elif self._unclaimed_since is None:
            self._unclaimed_since = now
        if not claimed and not balloon.held:
            return  # nothing held, nobody to tell
        try:
            self._notice_taken_back(balloon, now)
            held = len(balloon.held)
            goal = self._goal(held, now)
            if goal > held:
                self._inflate(balloon, goal - held, now)
            elif goal < held:
                released = balloon.release(min(held - goal, CPU_MAX_PER_STEP))
                self._changed = True
                log.info("vCPU(s) %s back online (%d held)", released, len(balloon.held))
        except BackendError as exc:
            self._changed = True  # perhaps part of it happened
            self._failed(str(exc), now)
        self._report(now)

    def _notice_taken_back(self, balloon: CpuBalloon, now: float) -> None:
        taken_back = balloon.forget_taken_back() if now >= self._next_check_at else []
        if taken_back:
            self._counters["cpus_taken_back"] += len(taken_back)
            self._changed = True
            log.info("vCPU(s) %s came back online without the balloon", taken_back)

    def _goal(self, held: int, now: float) -> int:
        """How many vCPUs to hold: the host's target, or all back once unclaimed too long."""
        if self.claimed:
            assert self.host_target is not None
            return self.host_target
        assert self._unclaimed_since is not None
        if now - self._unclaimed_since >= self._unclaimed_s:
            log.info(
                "giving back %d vCPU(s): no host has set a CPU target for %g s",
                held,
                self._unclaimed_s,
            )
            return 0
        return held

    def _rate_for(self, balloon: CpuBalloon) -> AdaptiveRate:
        if self._rate is None:
            vcpus = len(balloon.hotplug.possible())
            # The shared AIMD controller is unit-free; here its "pages" count vCPUs: one
            # to start, one more after every step that took all it asked for, halved
            # after one that did not, never above what one step may do.
            self._rate = AdaptiveRate(
                RateLimits(
                    min_units=1,
                    max_units=max(1, min(vcpus, CPU_MAX_PER_STEP)),
                    increase_units=1,
                    divisor=RateLimits().divisor,
                )
            )
        return self._rate

    def _inflate(self, balloon: CpuBalloon, missing: int, now: float) -> None:
        rate = self._rate_for(balloon)
        wanted = min(missing, rate.step_units, CPU_MAX_PER_STEP)
        before = len(balloon.held)
        try:
            taken = balloon.reserve(wanted)
        except BackendError:
            rate.on_failure()
            raise
        finally:
            if len(balloon.held) != before:
                self._changed = True
                log.info(
                    "vCPU(s) %s offline (%d held)", list(balloon.held[before:]), len(balloon.held)
                )
        rate.record(requested=wanted, obtained=len(taken))
        if len(taken) < wanted:
            self._failed(f"only {len(taken)} of {wanted} vCPU(s) could go offline", now)

    def _failed(self, message: str, now: float) -> None:
        self._counters["cpu_failures"] += 1
        if self._quiet.due("cpu-failed-log", now):
            log.warning("CPU balloon: %s", message)
        if self.claimed:
            self._link.send_error("cpu-failed", message, now)

    def _report(self, now: float) -> None:
        """A ``cpus`` report when the host claims the balloon and something is new."""
        if not self.claimed or self.balloon is None:
            return
        if not (self._report_due or self._changed or now >= self._next_check_at):
            return
        # Someone else may bring vCPUs up or down too: look again now and then.
        self._next_check_at = now + self._check_s
        try:
            view = self.balloon.view()
        except BackendError as exc:
            self._failed(f"cannot read the guest's vCPUs: {exc}", now)
            return
        if view == self._last_view and not self._report_due:
            self._changed = False
            return
        if any(cpu >= proto.MAX_VCPUS for cpu in (*view.online, *view.reserved)):
            self._failed(f"vCPU numbers reach {proto.MAX_VCPUS}: not reported", now)
            return
        self._link.send(
            proto.Cpus(seq=self._link.next_seq(), online=view.online, reserved=view.reserved)
        )
        if view != self._last_view:
            log.info(
                "vCPUs online %s, reserved %s",
                format_cpu_list(view.online),
                format_cpu_list(view.reserved),
            )
        self._last_view = view
        self._report_due = self._changed = False

    def release_all(self, now: float) -> None:
        """At shutdown: every reserved vCPU back online (reported if claimed); never raises."""
        balloon = self.balloon
        if balloon is None or not balloon.held:
            return
        try:
            for _ in range(len(balloon.held)):  # each pass releases at least one or raises
                if not balloon.held:
                    break
                balloon.release(CPU_MAX_PER_STEP)
        except BackendError as exc:
            log.warning("at shutdown, vCPU(s) %s stay offline: %s", list(balloon.held), exc)
        else:
            log.info("every reserved vCPU is back online")
        self._changed = True
        try:
            self._report(now)
        except BalloonistError as exc:  # the report is a courtesy; the vCPUs matter
            log.warning("at shutdown: %s", exc)
