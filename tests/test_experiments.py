"""The experiments behind docs/experiments: every claim holds, and the pages are current.

These rerun the shipped scenarios (a few minutes in all). Each claim in a page is a
``Check`` the experiment computes; the committed ``<name>.json`` must hold the figures
the code produces now, so a page can never quote numbers the code no longer gives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from balloonist.experiments import EXPERIMENTS, Experiment, figures_json, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"
PAGES = ROOT / "docs" / "experiments"

#: Same seed, same code, same result; the slack only absorbs floating-point differences
#: between CPUs, far below any change of behaviour worth a new page.
FIGURE_RELATIVE_TOLERANCE = 0.005


@pytest.fixture(scope="module", params=list(EXPERIMENTS))
def experiment(request: pytest.FixtureRequest) -> Experiment:
    name: str = request.param
    return run_experiment(name, SCENARIOS)


@pytest.mark.slow
def test_every_claim_holds(experiment: Experiment) -> None:
    failed = [c for c in experiment.checks if not c.passed]
    assert not failed, [f"{c.claim}: {c.value} not {c.op} {c.goal}" for c in failed]


@pytest.mark.slow
def test_the_page_quotes_what_the_code_produces(experiment: Experiment) -> None:
    page = PAGES / f"{experiment.name}.md"
    committed = json.loads((PAGES / f"{experiment.name}.json").read_text(encoding="utf-8"))
    assert page.exists() and (PAGES / f"{experiment.name}.png").exists()
    now = figures_json(experiment)
    assert committed["figures"].keys() == now["figures"].keys()
    for key, value in now["figures"].items():
        assert math.isclose(
            committed["figures"][key], value, rel_tol=FIGURE_RELATIVE_TOLERANCE, abs_tol=1e-9
        ), f"{experiment.name}: {key} is {value}, the page says {committed['figures'][key]}"
    # every figure in the page's table comes from these runs
    text = page.read_text(encoding="utf-8")
    for check in experiment.checks:
        assert check.claim in text
