"""Prometheus metrics, read from the daemon's newest :class:`Status` at scrape time.

Nothing is counted here: the collector turns the status the loop last published into
metric families on every scrape, so metrics and the REST API always agree. Each app
has its own :class:`~prometheus_client.CollectorRegistry` (never the global one), so
two servers in one process, or tests, do not see each other's series.

======================================== ====== ======== ==================================
metric                                   type   labels   meaning
======================================== ====== ======== ==================================
balloonist_status_version                gauge           newest status version; 0 before
                                                         the first period (then nothing
                                                         else is exported)
balloonist_status_time_seconds           gauge           daemon clock at that period's end
balloonist_period_seconds                gauge           length of one period
balloonist_host_memory_bytes             gauge           memory the guests share
balloonist_host_free_bytes               gauge           host_memory less what guests hold
balloonist_host_swap_bytes               gauge           host swap size
balloonist_host_swap_used_bytes          gauge           host swap in use
balloonist_host_cpus                     gauge           host processors the guests share
                                                         (when they are shared)
balloonist_host_state                    gauge  state    1 for the current state (high,
                                                         soft, hard, low), 0 for the others
balloonist_host_vms_held_bytes,          gauge           the host's own count (real VMs):
_host_available_bytes,                                   what the VMs' QEMU processes hold,
_host_vms_free_bytes                                     MemAvailable, and what the VMs
                                                         could still take
balloonist_ksm_mode                      gauge  mode     1 for who manages KSM (managing,
                                                         left alone, off, unavailable)
balloonist_ksm_running, _pages_to_scan,  gauge           KSM's knobs and what it merged
_pages_shared, _pages_sharing,                           (real VMs; where they were read)
_saved_bytes
balloonist_freed_bytes_total             counter mechanism memory the host got back since the
                                                         daemon started, by mechanism
                                                         (sharing, free_page_reporting,
                                                         ballooning, host_paging; real
                                                         VMs)
balloonist_policy_tax_rate               gauge  policy   idle memory tax rate
balloonist_guest_memory_bytes            gauge  guest    configured size
balloonist_guest_min_bytes               gauge  guest    reservation
balloonist_guest_max_bytes               gauge  guest    limit
balloonist_guest_shares                  gauge  guest    shares
balloonist_guest_allocation_target_bytes gauge  guest    what the policy wants it to have
balloonist_guest_allocated_bytes         gauge  guest    what it has now
balloonist_guest_balloon_bytes           gauge  guest    balloon size
balloonist_guest_balloon_target_bytes    gauge  guest    balloon target sent
balloonist_guest_working_set_bytes       gauge  guest    the policy's working-set estimate
balloonist_guest_reclaimed_bytes         gauge  guest    memory - allocated
balloonist_guest_free_bytes              gauge  guest    free memory the guest reports
                                                         (guests that report it)
balloonist_guest_major_faults_total      counter guest   major faults the guest reports
balloonist_guest_inflate_rate_bytes_per_second
                                         gauge  guest    how fast the adaptive rate
                                                         controller lets the balloon
                                                         inflate now (guests that have one)
balloonist_guest_cooperative             gauge  guest    1 cooperative, 0 uncooperative
balloonist_guest_vcpus, _online_vcpus,   gauge  guest    processors, for guests whose
_cpu_balloon_vcpus,                                      processors are shared: vCPUs,
_cpu_balloon_target_vcpus,                               online, held by the CPU balloon,
_allocation_target_cpus, _cpu_demand_vcpus,              its target, the policy's grant
_min_cpus, _max_cpus, _cpu_shares                        and demand estimate, the spec
balloonist_guest_host_held_bytes,        gauge  guest    what the host counts the guest's
_host_guest_ram_bytes,                                   QEMU process holds (Pss of its
_host_overhead_bytes,                                    smaps), its RAM and QEMU's own;
_host_ksm_merged_bytes,                                  of its pages, those KSM merged and
_host_ksm_saved_bytes,                                   what that saved, the cap on its
_host_cap_bytes, _host_swapped_bytes                     cgroup while the host pages it
                                                         and what is in host swap (guests
                                                         where it can be read)
balloonist_<counter>_total               counter         each daemon failure counter of
                                                         ``Status.counters``
                                                         (cycles_skipped, uncooperative,
                                                         backend_errors_transient,
                                                         backend_errors_fatal, stalls,
                                                         agent_rejected,
                                                         balloon_alloc_failures,
                                                         ksm_errors)
balloonist_guest_<counter>_total         counter guest   each per-guest failure counter of
                                                         ``GuestStatus.counters``
======================================== ====== ======== ==================================

Counter names are ``FailureCounter``'s (``daemon/counters.py``), their meanings the help.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.ksm_control import KsmMode
from balloonist.daemon.status import GuestCpuStatus, GuestStatus, Status
from balloonist.model import HostHeld, HostState

PREFIX = "balloonist"

Part = TypeVar("Part")

#: Per-guest gauges: (metric name after ``balloonist_guest_``, help, value).
_GUEST_GAUGES: tuple[tuple[str, str, Callable[[GuestStatus], float]], ...] = (
    ("memory_bytes", "Configured guest memory.", lambda g: g.memory_bytes),
    ("min_bytes", "Guest reservation (min).", lambda g: g.min_bytes),
    ("max_bytes", "Guest limit (max).", lambda g: g.max_bytes),
    ("shares", "Guest shares.", lambda g: g.shares),
    (
        "allocation_target_bytes",
        "What the policy wants the guest to have.",
        lambda g: g.allocation_target_bytes,
    ),
    ("allocated_bytes", "What the guest has now.", lambda g: g.allocated_bytes),
    ("balloon_bytes", "Balloon size.", lambda g: g.balloon_bytes),
    ("balloon_target_bytes", "Balloon target sent.", lambda g: g.balloon_target_bytes),
    ("working_set_bytes", "The policy's working-set estimate.", lambda g: g.working_set_bytes),
    (
        "reclaimed_bytes",
        "Memory taken from the guest (memory - allocated).",
        lambda g: g.memory_bytes - g.allocated_bytes,
    ),
    ("cooperative", "1 if the guest's balloon follows its target.", lambda g: int(g.cooperative)),
)

#: Per-guest gauges of what the host counts a guest holds, for guests where it can be
#: read: (name after ``balloonist_guest_``, help, value; None leaves the guest out).
_GUEST_HOST_GAUGES: tuple[tuple[str, str, Callable[[HostHeld], float | None]], ...] = (
    (
        "host_held_bytes",
        "What its QEMU process holds of host memory (Pss).",
        lambda h: h.held_bytes,
    ),
    ("host_guest_ram_bytes", "Of that, the guest's RAM.", lambda h: h.guest_ram_bytes),
    ("host_overhead_bytes", "Of that, QEMU's own memory.", lambda h: h.overhead_bytes),
    (
        "host_ksm_merged_bytes",
        "Of its pages, those KSM merged.",
        lambda h: h.ksm_merged_bytes,
    ),
    (
        "host_ksm_saved_bytes",
        "What KSM saved for it, less bookkeeping.",
        lambda h: h.ksm_saved_bytes,
    ),
    (
        "host_cap_bytes",
        "The cap on its memory cgroup while the host pages it.",
        lambda h: h.cap_bytes,
    ),
    (
        "host_swapped_bytes",
        "Of its memory, what is in the host's swap.",
        lambda h: h.swapped_bytes,
    ),
)

#: Per-guest processor gauges, for guests whose processors are shared: (name after
#: ``balloonist_guest_``, help, value).
_GUEST_CPU_GAUGES: tuple[tuple[str, str, Callable[[GuestCpuStatus], float]], ...] = (
    ("vcpus", "The guest's vCPUs.", lambda c: c.vcpus),
    ("min_cpus", "Processor reservation: processors always granted.", lambda c: c.min_cpus),
    ("max_cpus", "Processor limit: the most processors granted.", lambda c: c.max_cpus),
    ("cpu_shares", "Processor shares.", lambda c: c.shares),
    (
        "allocation_target_cpus",
        "Processors the policy wants the guest to have.",
        lambda c: c.allocation_target_cpus,
    ),
    ("online_vcpus", "vCPUs online: the processors it has.", lambda c: c.online_vcpus),
    ("cpu_balloon_vcpus", "vCPUs the CPU balloon holds offline.", lambda c: c.balloon_vcpus),
    (
        "cpu_balloon_target_vcpus",
        "CPU balloon target sent.",
        lambda c: c.balloon_target_vcpus,
    ),
    ("cpu_demand_vcpus", "The policy's estimate of its CPU demand.", lambda c: c.demand_vcpus),
)

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    """``balloonist_`` + the parts, with characters Prometheus refuses replaced."""
    return _INVALID_NAME_CHARS.sub("_", "_".join((PREFIX, *parts)))


class StatusCollector:
    """A prometheus_client collector over ``status()``, called at every scrape."""

    def __init__(self, status: Callable[[], Status | None]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        # The metric set depends on the status (guests, counter names): nothing to
        # declare up front, and collect() must not run at registration.
        return []

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        yield GaugeMetricFamily(
            metric_name("status_version"),
            "Newest status version; 0 before the first period.",
            value=0 if status is None else status.version,
        )
        if status is None:
            return
        seen = {metric_name("status_version")}
        for family in (*_daemon_metrics(status), *_guest_metrics(status.guests)):
            # Counter names come from the daemon; one that happens to map onto a name
            # already exported would make the whole scrape invalid, so it is dropped.
            if family.name not in seen:
                seen.add(family.name)
                yield family


def _daemon_metrics(status: Status) -> Iterable[Metric]:
    host = status.host
    yield GaugeMetricFamily(
        metric_name("status_time_seconds"), "Daemon clock at the period's end.", status.time_s
    )
    yield GaugeMetricFamily(metric_name("period_seconds"), "Length of a period.", status.period_s)
    yield GaugeMetricFamily(
        metric_name("host_memory_bytes"), "Memory the guests share.", host.memory_bytes
    )
    yield GaugeMetricFamily(
        metric_name("host_free_bytes"), "Host memory less what guests hold.", host.free_bytes
    )
    yield GaugeMetricFamily(metric_name("host_swap_bytes"), "Host swap size.", host.swap_bytes)
    yield GaugeMetricFamily(
        metric_name("host_swap_used_bytes"), "Host swap in use.", host.swap_used_bytes
    )
    if host.cpus is not None:
        yield GaugeMetricFamily(
            metric_name("host_cpus"), "Host processors the guests' vCPUs share.", host.cpus
        )
    state = GaugeMetricFamily(
        metric_name("host_state"), "1 for the current host state.", labels=["state"]
    )
    for known in HostState:
        state.add_metric([known.value], 1 if known.value == host.state else 0)
    if host.state not in {s.value for s in HostState}:
        state.add_metric([host.state], 1)
    yield state
    yield from _host_truth_metrics(status)
    tax = GaugeMetricFamily(
        metric_name("policy_tax_rate"), "Idle memory tax rate.", labels=["policy"]
    )
    tax.add_metric([status.policy.name], status.policy.tax_rate)
    yield tax
    for name in sorted(status.counters):
        yield CounterMetricFamily(metric_name(name), name.meaning, value=status.counters[name])


def _host_truth_metrics(status: Status) -> Iterable[Metric]:
    """The host's own count and its page sharing, where the daemon reads them."""
    truth, ksm = status.host.truth, status.ksm
    if truth is not None:
        for suffix, help_text, value in (
            ("host_vms_held_bytes", "What the VMs' QEMU processes hold (Pss).", truth.held_bytes),
            ("host_available_bytes", "The host's MemAvailable.", truth.available_bytes),
            ("host_vms_free_bytes", "What the VMs could still take.", truth.free_bytes),
        ):
            yield GaugeMetricFamily(metric_name(suffix), help_text, value)
    if status.freed is not None:
        freed = CounterMetricFamily(
            metric_name("freed_bytes"),
            "Memory the host got back, by mechanism.",
            labels=["mechanism"],
        )
        for mechanism, amount in status.freed.total_bytes.items():
            freed.add_metric([str(mechanism)], amount)
        yield freed
    if ksm is None:
        return
    mode = GaugeMetricFamily(metric_name("ksm_mode"), "1 for who manages KSM.", labels=["mode"])
    for known in KsmMode:
        mode.add_metric([known.value], 1 if known is ksm.mode else 0)
    yield mode
    if ksm.knobs is not None:
        knobs = ksm.knobs
        yield GaugeMetricFamily(metric_name("ksm_running"), "1 while ksmd scans.", knobs.running)
        yield GaugeMetricFamily(
            metric_name("ksm_pages_to_scan"), "Pages ksmd scans per wake-up.", knobs.pages_to_scan
        )
    if ksm.totals is not None:
        totals = ksm.totals
        yield GaugeMetricFamily(
            metric_name("ksm_pages_shared"), "Merged pages the host keeps.", totals.pages_shared
        )
        yield GaugeMetricFamily(
            metric_name("ksm_pages_sharing"), "Pages mapping them.", totals.pages_sharing
        )
        yield GaugeMetricFamily(
            metric_name("ksm_saved_bytes"),
            "What merging saves, less bookkeeping.",
            totals.saved_bytes,
        )


def _guest_metrics(guests: Iterable[GuestStatus]) -> Iterable[Metric]:
    guests = tuple(guests)
    for suffix, help_text, value in _GUEST_GAUGES:
        family = GaugeMetricFamily(metric_name("guest", suffix), help_text, labels=["guest"])
        for guest in guests:
            family.add_metric([guest.name], value(guest))
        yield family
    free = GaugeMetricFamily(
        metric_name("guest", "free_bytes"), "Free memory the guest reports.", labels=["guest"]
    )
    faults = CounterMetricFamily(
        metric_name("guest", "major_faults"), "Major faults the guest reports.", labels=["guest"]
    )
    rate = GaugeMetricFamily(
        metric_name("guest", "inflate_rate_bytes_per_second"),
        "How fast the adaptive rate controller lets the balloon inflate now.",
        labels=["guest"],
    )
    for guest in guests:
        if guest.free_bytes is not None:
            free.add_metric([guest.name], guest.free_bytes)
        faults.add_metric([guest.name], guest.major_faults)
        if guest.inflate_rate_bytes_per_s is not None:
            rate.add_metric([guest.name], guest.inflate_rate_bytes_per_s)
    yield free
    yield faults
    yield rate
    yield from _part_gauges([(g.name, g.host) for g in guests if g.host], _GUEST_HOST_GAUGES)
    yield from _part_gauges([(g.name, g.cpu) for g in guests if g.cpu], _GUEST_CPU_GAUGES)
    # One family per counter name, with a sample for each guest that has it.
    by_name: dict[FailureCounter, dict[str, int]] = {}
    for guest in guests:
        for name, count in guest.counters.items():
            by_name.setdefault(name, {})[guest.name] = count
    for name in sorted(by_name):
        counter = CounterMetricFamily(metric_name("guest", name), name.meaning, labels=["guest"])
        for guest_name, count in by_name[name].items():
            counter.add_metric([guest_name], count)
        yield counter


def _part_gauges(
    present: Sequence[tuple[str, Part]],
    table: Sequence[tuple[str, str, Callable[[Part], float | None]]],
) -> Iterable[Metric]:
    """Per-guest gauges of a part only some guests have (processors, the host's count);
    no family at all when no guest has it."""
    if not present:
        return
    for suffix, help_text, value_of in table:
        family = GaugeMetricFamily(metric_name("guest", suffix), help_text, labels=["guest"])
        for name, part in present:
            if (value := value_of(part)) is not None:
                family.add_metric([name], value)
        yield family


def make_registry(status: Callable[[], Status | None]) -> CollectorRegistry:
    """A fresh registry holding only the status collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return registry
