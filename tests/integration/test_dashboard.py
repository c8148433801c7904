"""The admin dashboard in a real browser: Debian's chromium driven by Selenium.

The page loads with no console error and fetches nothing from elsewhere, the
picture shows every route, a mail sent by SMTP appears in the live trace within
2 s and in the counters, and a dead letter is listed.  Screenshots go to
tests/output/ (kept by CI as artifacts): the page after load, and after the mail.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory, SmtpSinkFactory
from tests.peers import REPO_ROOT, SwaksExit, free_port, require_binary, swaks_send, wait_until

OUTPUT = REPO_ROOT / "tests" / "output"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-default-apps", "--disable-sync",
    "--disable-extensions", "--window-size=1280,1400",
    # Nothing leaves the machine: every host but this one fails at once.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]  # fmt: skip


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = require_binary("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(require_binary("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_dashboard_shows_the_routes_the_trace_and_the_queue(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    smtp_sink_factory: SmtpSinkFactory,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By

    hard = smtp_sink_factory(hard_reject=["rcpt"])
    smtp, admin = free_port(), free_port()
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  box: {{protocol: maildir, path: mail}}
  hard: {{protocol: smtp, connect: "tcp:127.0.0.1:{hard.port}", tls: none}}
routes:
  - {{name: local-mail, from: mail-in, match: {{rcpt: '@example\\.test$'}}, to: box}}
  - {{name: to-hard, from: mail-in, match: {{rcpt: '@hard\\.test$'}}, to: hard}}
""")
    gw.start([smtp, admin])
    assert swaks_send(smtp, "x@hard.test")[0] == SwaksExit.OK  # becomes a dead letter
    url = f"http://127.0.0.1:{admin}/"
    wait_until(lambda: "x@hard.test" in _page(browser, url).find_element(By.ID, "dead").text
               or None, "the dead letter on the page")  # fmt: skip
    OUTPUT.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "dashboard-loaded.png"))
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    picture = browser.find_element(By.ID, "picture").text
    for name in ("local-mail", "to-hard", "mail-in (smtp)", "box (maildir)", "hard (smtp)"):
        assert name in picture, (name, picture)
    assert "ready" in browser.find_element(By.ID, "state").text
    assert "loaded" in browser.find_element(By.ID, "configuration").text
    wait_until(
        lambda: browser.find_element(By.ID, "trace-state").text == "following" or None,
        "the live trace to connect",
        timeout=5,
    )
    sent = time.monotonic()
    code, transcript = swaks_send(smtp, "ann@example.test")
    assert code == SwaksExit.OK, transcript
    queue_id = transcript.split("queued as ")[1].split()[0]
    wait_until(
        lambda: queue_id in browser.find_element(By.ID, "trace").text or None,
        "the mail in the live trace",
        timeout=2,
    )
    assert time.monotonic() - sent < 2.5
    lines = browser.find_element(By.ID, "trace").text.splitlines()
    assert any("routed" in ln and "routes=local-mail" in ln and "outcome=queued" in ln for ln in lines)
    browser.save_screenshot(str(OUTPUT / "dashboard-trace.png"))
    rows = _page(browser, url).find_element(By.ID, "routes").text.splitlines()
    assert "local-mail 1 0 0" in rows and "to-hard 1 0 0" in rows, rows
    rows = browser.find_element(By.ID, "destinations").text.splitlines()
    assert "box 1 0 0 0" in rows and "hard 0 0 1 0" in rows, rows
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def _page(browser: Any, url: str) -> Any:
    browser.get(url)
    return browser
