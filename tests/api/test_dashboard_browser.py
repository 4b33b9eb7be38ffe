"""The dashboard in a real headless Chromium (Debian's), driven by Playwright, against
the daemon over a simulated host, served on loopback TCP with a token as an operator
would run it. The screenshot of the page is kept in test-artifacts/dashboard.png.

When the CI environment variable is set, a missing Chromium is a failure, never a
skip (``make test`` installs it as root).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from balloonist.api import serve
from balloonist.daemon.service import DaemonLoop
from balloonist.daemon.sim_backend import sim_daemon
from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB
from tests.daemon.small_host import GUESTS, SMALL

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "dashboard-test-token-0123456789"
#: Simulated seconds per wall second: a period every 0.1 s, so changes show quickly.
SPEED = 10.0
#: Waits on the page, in ms. Loading plotly.js (4.8 MB) and the first charts takes
#: about 2 s here; a loaded 2-core CI host gets ten times that.
DEADLINE_MS = 30_000
#: As the machine notes say: without the background-networking flags Chromium keeps
#: trying to reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def small_with_cpus() -> Scenario:
    """The daemon tests' small host, with 4 processors shared by its guests' 2 vCPUs each."""
    data = tomllib.loads(SMALL)
    data["host"]["cpus"] = 4
    workloads = [
        {"kind": "parallel", "threads": 2, "work_per_round_cpu_s": 0.005},
        {"kind": "idle"},
        {"kind": "cpu-bound", "threads": 2},
    ]
    for guest, workload in zip(data["guests"], workloads, strict=True):
        guest["cpus"] = 2
        guest["cpu_workload"] = workload
    return scenario_from_dict(data, where="small", default_name="small")


def _chromium() -> str:
    found = os.environ.get("BALLOONIST_CHROMIUM") or shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing, and CI must run the dashboard tests")
        pytest.skip("chromium is missing (run 'make test' as root to install it)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonLoop, str]]:
    """The daemon's loop over the small simulated host, and the URL of its API."""
    loop = sim_daemon(small_with_cpus(), state_dir=tmp_path, speed=SPEED)
    server = serve(loop, tcp=("127.0.0.1", 0), token=TOKEN)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="daemon")
    thread.start()
    address = server.tcp_address
    assert address is not None
    try:
        yield loop, f"http://{address[0]}:{address[1]}"
    finally:
        stop.set()
        thread.join()
        server.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    opened = context.new_page()
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == [], errors  # no script error on the way


def api(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=DEADLINE_MS / 1000
    )


def open_dashboard(page: Page, url: str, token: str = TOKEN) -> None:
    page.goto(f"{url}/dashboard/#token={token}")


def last_value(page: Page, guest: str, trace: str) -> float | None:
    value = page.evaluate(
        """([guest, trace]) => {
            const chart = document.querySelector(`[data-guest="${guest}"] .guest-chart`);
            const found = (chart.data || []).find((t) => t.name === trace);
            return found ? found.y[found.y.length - 1] : null;
        }""",
        [guest, trace],
    )
    assert value is None or isinstance(value, int | float)
    return value


def test_the_page_shows_every_guest_and_a_chart_follows_a_target_change(
    daemon: tuple[DaemonLoop, str], page: Page
) -> None:
    loop, url = daemon
    open_dashboard(page, url)
    for name in GUESTS:
        expect(page.locator(f'[data-guest="{name}"] .name')).to_have_text(name, timeout=DEADLINE_MS)
    assert "token" not in page.url  # the fragment is dropped once read
    expect(page.locator("#host-state")).to_have_text(
        re.compile(r"^(high|soft|hard|low)$"), timeout=DEADLINE_MS
    )
    page.wait_for_function(
        "names => names.every(n => (document.getElementById('host-chart').data || [])"
        ".some(t => t.name === n))",
        arg=list(GUESTS),
        timeout=DEADLINE_MS,
    )

    # "small" uses 60 MiB; a reservation of 200 MiB must lift its target to at least that
    card = page.locator('[data-guest="small"]')
    card.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => (document.querySelector('[data-guest=\"small\"] .guest-chart').data || [])"
        ".length > 0",
        timeout=DEADLINE_MS,
    )
    before = last_value(page, "small", "target")
    assert before is not None and before < 200
    with api(url) as client:
        assert client.patch("/v1/guests/small", json={"min": "200MiB"}).status_code == 202
    page.wait_for_function(
        """() => {
            const chart = document.querySelector('[data-guest="small"] .guest-chart');
            const target = chart.data.find((t) => t.name === "target");
            return target.y[target.y.length - 1] >= 200;
        }""",
        timeout=DEADLINE_MS,
    )
    status = loop.status()
    assert status is not None
    guest = status.guest("small")
    assert guest is not None and guest.allocation_target_bytes >= 200 * MIB
    expect(card.locator(".min")).to_have_text("200 MiB", timeout=DEADLINE_MS)

    # processors next to memory: the host's chart, and each card's vCPUs
    expect(page.locator("#cpu-panel")).to_be_visible()
    expect(page.locator("#host-summary")).to_contain_text("4 processors")
    page.wait_for_function(
        "names => names.every(n => (document.getElementById('cpu-chart').data || [])"
        ".some(t => t.name === n))",
        arg=list(GUESTS),
        timeout=DEADLINE_MS,
    )
    # the chart follows the period as the memory charts do (its arrays grow in place)
    page.wait_for_function(
        """() => {
            const cpus = document.getElementById('cpu-chart');
            const times = cpus.data[0].x;
            return times.length > 20 && cpus.layout.xaxis.range[1] >= times[times.length - 1];
        }""",
        timeout=DEADLINE_MS,
    )
    expect(card.locator(".vcpus")).to_have_text(re.compile(r"^[12] of 2 \(target [12]\)$"))
    online = last_value(page, "small", "vCPUs online")
    assert online in (1, 2)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_the_form_changes_shares_and_shows_a_refusal(
    daemon: tuple[DaemonLoop, str], page: Page
) -> None:
    loop, url = daemon
    open_dashboard(page, url)
    card = page.locator('[data-guest="idle"]')
    expect(card.locator(".shares")).to_have_text("1000", timeout=DEADLINE_MS)
    card.locator('input[name="shares"]').fill("3000")
    card.locator('button[type="submit"]').click()
    expect(card.locator(".result")).to_have_text(
        "accepted: applies at the next period", timeout=DEADLINE_MS
    )
    expect(card.locator(".shares")).to_have_text("3000", timeout=DEADLINE_MS)
    status = loop.status()
    assert status is not None
    guest = status.guest("idle")
    assert guest is not None and guest.shares == 3000

    # the processors' shares, through the same form
    card.locator('input[name="cpu_shares"]').fill("4000")
    card.locator('button[type="submit"]').click()
    expect(card.locator(".cpu-shares")).to_have_text("4000", timeout=DEADLINE_MS)

    # a refused change: the daemon's one-line reason, and nothing changes
    card.locator('input[name="min"]').fill("300MiB")
    card.locator('button[type="submit"]').click()
    expect(card.locator(".result")).to_contain_text("min 300MiB", timeout=DEADLINE_MS)
    expect(card.locator(".result")).to_have_class("result error")
    expect(card.locator(".min")).to_have_text("0 B")


def test_a_wrong_token_gets_the_login_form_and_the_right_one_gets_in(
    daemon: tuple[DaemonLoop, str], page: Page
) -> None:
    _, url = daemon
    open_dashboard(page, url, token="wrong-token-0123456789abcdef")
    expect(page.locator("#login")).to_be_visible(timeout=DEADLINE_MS)
    expect(page.locator("#login-error")).to_have_text("the token was refused")
    expect(page.locator("#main")).to_be_hidden()
    page.locator("#login-token").fill(TOKEN)
    page.locator("#login-form button").click()
    expect(page.locator('[data-guest="busy"]')).to_be_visible(timeout=DEADLINE_MS)
    expect(page.locator("#login")).to_be_hidden()
