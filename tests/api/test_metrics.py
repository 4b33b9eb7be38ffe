"""/metrics: the series of the newest status, with its values, in Prometheus text."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from balloonist.api import create_app
from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.ksm_control import KsmMode, KsmStatus
from balloonist.daemon.mechanisms import Freed, Mechanism
from balloonist.ksm import KsmKnobs, KsmTotals
from balloonist.model import HostTruth
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES
from tests.api.fake import FakeController, make_guest, make_status


def scrape(fake: FakeController) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = TestClient(create_app(fake, token=None)).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_host_series() -> None:
    samples = scrape(FakeController(make_status(7)))
    assert samples[("balloonist_status_version", ())] == 7
    assert samples[("balloonist_host_memory_bytes", ())] == 6 * GIB
    assert samples[("balloonist_host_free_bytes", ())] == 3 * GIB
    assert samples[("balloonist_host_swap_bytes", ())] == 1 * GIB
    assert samples[("balloonist_period_seconds", ())] == 1.0
    states = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "balloonist_host_state"
    }
    assert states == {"high": 0, "soft": 1, "hard": 0, "low": 0}
    assert samples[("balloonist_policy_tax_rate", (("policy", "shares"),))] == 0.75


def test_guest_series() -> None:
    samples = scrape(FakeController(make_status()))

    def web(name: str) -> float:
        return samples[(f"balloonist_guest_{name}", (("guest", "web"),))]

    assert web("allocation_target_bytes") == 1536 * MIB
    assert web("allocated_bytes") == 1 * GIB
    assert web("balloon_bytes") == 1 * GIB
    assert web("balloon_target_bytes") == 512 * MIB
    assert web("working_set_bytes") == 700 * MIB
    assert web("reclaimed_bytes") == 1 * GIB
    assert web("cooperative") == 1
    assert web("free_bytes") == 300 * MIB
    assert web("major_faults_total") == 12
    assert samples[("balloonist_guest_cooperative", (("guest", "db"),))] == 0
    assert web("inflate_rate_bytes_per_second") == 48 * MIB
    assert samples[("balloonist_host_cpus", ())] == 8
    assert (web("vcpus"), web("online_vcpus"), web("cpu_balloon_vcpus")) == (4, 2, 2)
    assert (web("allocation_target_cpus"), web("cpu_balloon_target_vcpus")) == (3, 1)
    assert (web("cpu_demand_vcpus"), web("min_cpus"), web("max_cpus"), web("cpu_shares")) == (
        2.5,
        1,
        4,
        1000,
    )
    assert ("balloonist_guest_vcpus", (("guest", "db"),)) not in samples  # not shared
    assert (web("host_held_bytes"), web("host_guest_ram_bytes")) == (900 * MIB, 800 * MIB)
    assert web("host_overhead_bytes") == 100 * MIB
    assert samples[("balloonist_guest_host_held_bytes", (("guest", "db"),))] == GIB
    assert ("balloonist_guest_host_overhead_bytes", (("guest", "db"),)) not in samples
    # Host paging: db is capped and partly in host swap; web is not paged at all.
    assert samples[("balloonist_guest_host_cap_bytes", (("guest", "db"),))] == GIB
    assert samples[("balloonist_guest_host_swapped_bytes", (("guest", "db"),))] == 256 * MIB
    assert ("balloonist_guest_host_cap_bytes", (("guest", "web"),)) not in samples
    # db does not report free memory or a rate: no sample rather than a made-up value.
    assert ("balloonist_guest_free_bytes", (("guest", "db"),)) not in samples
    assert ("balloonist_guest_inflate_rate_bytes_per_second", (("guest", "db"),)) not in samples


def test_the_host_s_own_count_and_ksm_series() -> None:
    truth = HostTruth(6 * GIB, 5 * GIB, 20 * GIB, 1 * GIB)
    ksm = KsmStatus(KsmMode.MANAGING, KsmKnobs(1, 550, 20), KsmTotals(10, 200, 4, None))
    freed = (
        Freed()
        .then({Mechanism.BALLOONING: 9 * MIB})
        .then({Mechanism.SHARING: MIB, Mechanism.HOST_PAGING: 3 * MIB})
    )
    status = make_status()
    status = replace(status, host=replace(status.host, truth=truth), ksm=ksm, freed=freed)
    samples = scrape(FakeController(status))
    got_back = {
        labels[0][1]: v for (n, labels), v in samples.items() if n == "balloonist_freed_bytes_total"
    }
    assert got_back == {
        "sharing": MIB,
        "free_page_reporting": 0,
        "ballooning": 9 * MIB,
        "host_paging": 3 * MIB,
    }
    assert samples[("balloonist_host_vms_held_bytes", ())] == 5 * GIB
    assert samples[("balloonist_host_available_bytes", ())] == 20 * GIB
    assert samples[("balloonist_host_vms_free_bytes", ())] == 1 * GIB
    modes = {labels[0][1]: v for (n, labels), v in samples.items() if n == "balloonist_ksm_mode"}
    assert modes["managing"] == 1 and sum(modes.values()) == 1
    assert samples[("balloonist_ksm_running", ())] == 1
    assert samples[("balloonist_ksm_pages_to_scan", ())] == 550
    assert samples[("balloonist_ksm_pages_sharing", ())] == 200
    assert samples[("balloonist_ksm_saved_bytes", ())] == 200 * PAGE_SIZE_BYTES
    web = (("guest", "web"),)
    assert samples[("balloonist_guest_host_ksm_merged_bytes", web)] == 30 * MIB
    assert samples[("balloonist_guest_host_ksm_saved_bytes", web)] == 20 * MIB
    # A simulated host has neither: no series rather than made-up ones.
    plain = scrape(FakeController(make_status()))
    assert not any(
        n.startswith(("balloonist_ksm_", "balloonist_host_vms_", "balloonist_freed_"))
        for n, _ in plain
    )


def test_failure_counters() -> None:
    samples = scrape(FakeController(make_status()))
    assert samples[("balloonist_backend_errors_transient_total", ())] == 4
    assert samples[("balloonist_stalls_total", ())] == 2
    assert samples[("balloonist_uncooperative_total", ())] == 1
    assert samples[("balloonist_agent_rejected_total", ())] == 0
    assert samples[("balloonist_guest_stalls_total", (("guest", "web"),))] == 1
    assert samples[("balloonist_guest_stalls_total", (("guest", "db"),))] == 3
    assert samples[("balloonist_guest_backend_errors_transient_total", (("guest", "db"),))] == 2


def test_before_the_first_period_only_the_version() -> None:
    samples = scrape(FakeController(None))
    assert samples == {("balloonist_status_version", ()): 0}


def test_every_failure_counter_is_a_valid_metric_with_its_meaning_as_help() -> None:
    every = dict.fromkeys(FailureCounter, 1)
    status = replace(make_status(guests=(make_guest("a-b", counters=every),)), counters=every)
    text = TestClient(create_app(FakeController(status), token=None)).get("/metrics").text
    samples = scrape(FakeController(status))
    for counter in FailureCounter:
        assert samples[(f"balloonist_{counter}_total", ())] == 1
        assert samples[(f"balloonist_guest_{counter}_total", (("guest", "a-b"),))] == 1
        assert f"# HELP balloonist_{counter}_total {counter.meaning}" in text


def test_each_app_has_its_own_registry() -> None:
    one = TestClient(create_app(FakeController(make_status(1)), token=None))
    two = TestClient(create_app(FakeController(make_status(2)), token=None))
    assert "balloonist_status_version 1.0" in one.get("/metrics").text
    assert "balloonist_status_version 2.0" in two.get("/metrics").text


def test_openmetrics_when_asked() -> None:
    client = TestClient(create_app(FakeController(make_status()), token=None))
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert "balloonist_backend_errors_transient_total 4.0" in response.text
    assert response.text.endswith("# EOF\n")
