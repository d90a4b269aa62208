"""The swarm monitor page in a real headless browser (Debian's chromium, through
chromium-driver and selenium) over a live mesh, served by ``twistd meshnode serve``.

It shows the mesh's workers; its chat box streams an answer from the API; a SIGKILLed
worker stops showing as serving within a bounded time. Screenshots go to the test's
folder (and to ``$MESHNODE_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.serve.serve_helpers import ServeProcess

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: workers of the monitor's mesh: the whole model, and two halves (one gets killed)
SPANS = ("0:6", "0:3", "3:6")
#: seconds the page may take to show a change in the swarm
PAGE_BOUND = 60


@pytest.fixture(scope="module")
def monitor_mesh(chat_checkpoint, tmp_path_factory):
    from meshnode.testing.processes import LocalMesh

    mesh = LocalMesh(str(chat_checkpoint), root=tmp_path_factory.mktemp("monitor-mesh"))
    try:
        mesh.start_bootstrap()
        mesh.start_workers(SPANS)
    except BaseException:
        mesh.stop()
        raise
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def monitor_server(monitor_mesh, chat_checkpoint, tmp_path_factory):
    """The server under ``twistd -n meshnode serve``."""
    server = ServeProcess(tmp_path_factory.mktemp("monitor-serve"), [
        "--bootstrap", str(monitor_mesh.join_address), "--model", str(chat_checkpoint),
        "--model-name", "tiny-chat"], twistd=True)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture()
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test.sh installs "
                    "them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def screenshot(driver, folder: Path, name: str) -> Path:
    path = folder / name
    assert driver.save_screenshot(str(path))
    extra = os.environ.get("MESHNODE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def states(driver) -> dict[str, str]:
    """Worker id -> shown state, read in one script (the page redraws every 2 s, so element
    handles go stale)."""
    return dict(driver.execute_script(
        "return Array.from(document.querySelectorAll('tr.worker'))"
        ".map(r => [r.dataset.id, r.dataset.state]);"))


def text_of(driver, selector: str) -> str:
    return driver.execute_script(f"return document.querySelector('{selector}').textContent;")


def count_of(driver, selector: str) -> int:
    return driver.execute_script(f"return document.querySelectorAll('{selector}').length;")


def node_id_of(node) -> str:
    return str(node.address).split("#")[1]


def test_the_swarm_json_lists_every_worker(monitor_server, monitor_mesh):
    """When the mesh is up, then /api/swarm has the model, full coverage and every worker
    reachable, with its RTT, free cache tokens and open sessions."""
    from tests.serve.serve_helpers import wait_until

    def complete():
        model = monitor_server.get_json("/api/swarm")["models"][0]
        return model if len(model["workers"]) == len(SPANS) and all(
            w["reachable"] for w in model["workers"]) else None

    model = wait_until(complete, PAGE_BOUND, "every worker seen")
    assert model["coverage"] == [2, 2, 2, 2, 2, 2] and model["gaps"] == []
    assert {w["id"] for w in model["workers"]} == {node_id_of(n) for n in monitor_mesh.workers()}
    for worker in model["workers"]:
        assert worker["state"] == "serving" and worker["rtt_ms"] >= 0
        assert worker["cache_tokens"] > 0 and worker["sessions"] == 0


def test_the_page_shows_the_mesh_chats_and_drops_a_killed_worker(
        browser, monitor_server, monitor_mesh, tmp_path):
    """When the page is open, then it shows every worker serving and the coverage; its chat
    box streams an answer; when a worker is SIGKILLed, then within a bounded time the page
    stops showing it as serving, and the blocks others cover stay covered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(monitor_server.url + "/")
    wait = WebDriverWait(browser, PAGE_BOUND, poll_frequency=0.2)
    expected = {node_id_of(n) for n in monitor_mesh.workers()}
    wait.until(lambda d: set(states(d)) == expected
               and set(states(d).values()) == {"serving"})
    assert text_of(browser, ".gaps") == "every block is served"
    assert count_of(browser, ".coverage .block") == 6

    browser.find_element(By.ID, "chat-input").send_keys("Hello")
    browser.find_element(By.ID, "chat-send").click()
    answer = wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    assert "error" not in answer.get_attribute("class"), answer.text
    # the page samples (temperature 1) from a random model, so the answer may be short, or
    # end at once on EOS; what must hold is that the stream ran to its end and that every
    # content piece it streamed is on the page
    assert answer.get_attribute("data-finish") in ("stop", "length")
    pieces = int(answer.get_attribute("data-pieces"))
    shown = answer.get_property("textContent")
    assert (pieces > 0) == (shown != ""), (pieces, shown)
    if answer.get_attribute("data-finish") == "length":
        assert pieces > 0
    screenshot(browser, tmp_path, "monitor-live.png")

    victim = next(n for n in monitor_mesh.workers() if n.args[n.args.index("--blocks") + 1]
                  == "0:3")
    victim.signal(signal.SIGKILL)
    victim.process.wait(30)
    wait.until(lambda d: states(d).get(node_id_of(victim), "gone") != "serving")
    assert text_of(browser, ".gaps") == "every block is served"
    others = {k: v for k, v in states(browser).items() if k != node_id_of(victim)}
    assert set(others.values()) == {"serving"}
    path = screenshot(browser, tmp_path, "monitor-killed.png")
    assert path.stat().st_size > 0
