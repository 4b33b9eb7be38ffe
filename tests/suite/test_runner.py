"""Running the suite: the same records whatever ran them and in whatever order."""

from __future__ import annotations

import dataclasses

import pytest

from balloonist.suite.executors import ProcessPoolAdapter, SerialExecutor, ray_available
from balloonist.suite.generator import GeneratedScenario, generate_one
from balloonist.suite.records import RunRecord
from balloonist.suite.runner import make_tasks, run_suite, run_task
from tests.suite.tiny import TINY

POLICIES = ("static", "oracle")


@pytest.fixture(scope="module")
def scenarios() -> list[GeneratedScenario]:
    return [generate_one(3, i, TINY) for i in range(2)]


@pytest.fixture(scope="module")
def serial(scenarios: list[GeneratedScenario]) -> list[RunRecord]:
    done: list[tuple[int, int]] = []
    records = run_suite(scenarios, POLICIES, SerialExecutor(), lambda d, t: done.append((d, t)))
    assert done == [(k, 4) for k in range(1, 5)]
    return records


def test_records_in_scenario_then_policy_order(serial: list[RunRecord]) -> None:
    assert [(r.scenario, r.policy) for r in serial] == [
        ("suite-3-0", "static"),
        ("suite-3-0", "oracle"),
        ("suite-3-1", "static"),
        ("suite-3-1", "oracle"),
    ]
    for r in serial:
        assert r.throughput_refs_per_s == pytest.approx(sum(r.guest_throughput_refs_per_s))
        assert r.cpu_s > 0


def test_most_expensive_first(scenarios: list[GeneratedScenario]) -> None:
    costs = [t.cost for t in make_tasks(scenarios, POLICIES)]
    assert costs == sorted(costs, reverse=True)


def test_a_scenarios_bounds_run_in_one_task_measuring_each_curve_once(
    scenarios: list[GeneratedScenario], monkeypatch: pytest.MonkeyPatch
) -> None:
    from balloonist.sim import curves

    # suite-3-1 has workloads whose curves are measured
    tasks = make_tasks(scenarios[1:], ("oracle", "static", "oracle-fair"))
    assert sorted(t.policies for t in tasks) == [("oracle", "oracle-fair"), ("static",)]
    measured: list[tuple[object, ...]] = []
    real = curves.measure_curve

    def counted(*args: object) -> object:
        measured.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(curves, "measure_curve", counted)
    bounds = next(t for t in tasks if len(t.policies) == 2)
    together = run_task(bounds)
    assert len(measured) == len({(a[0], a[1], a[2]) for a in measured}) > 0
    alone = [run_task(dataclasses.replace(bounds, policies=(p,)))[0] for p in bounds.policies]
    # the same records, but for the CPU time each took
    assert [dataclasses.replace(r, cpu_s=0.0) for r in together] == [
        dataclasses.replace(r, cpu_s=0.0) for r in alone
    ]


def test_serial_equals_parallel(
    scenarios: list[GeneratedScenario], serial: list[RunRecord]
) -> None:
    done: list[int] = []
    parallel = run_suite(scenarios, POLICIES, ProcessPoolAdapter(2), lambda d, t: done.append(d))
    assert parallel == serial
    assert sorted(done) == [1, 2, 3, 4]


def test_a_failing_task_fails_the_map() -> None:
    with pytest.raises(ZeroDivisionError):
        ProcessPoolAdapter(2).map(_fails_on_zero, [1, 0, 2], lambda i: None)


def _fails_on_zero(x: int) -> float:
    return 1 / x


@pytest.mark.skipif(not ray_available(), reason="ray is not installed")
def test_ray_equals_process_pool(
    scenarios: list[GeneratedScenario], serial: list[RunRecord]
) -> None:
    import ray

    from balloonist.suite.executors import RayAdapter

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        done: list[int] = []
        records = run_suite(scenarios, POLICIES, RayAdapter(None, 1), lambda d, t: done.append(d))
    finally:
        ray.shutdown()
    assert records == serial
    assert done[-1] == 4
