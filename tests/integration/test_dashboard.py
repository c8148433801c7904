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
    assert any(
        "routed" in ln and "routes=local-mail" in ln and "outcome=queued" in ln for ln in lines
    )
    browser.save_screenshot(str(OUTPUT / "dashboard-trace.png"))
    rows = _rows(_page(browser, url), "routes")
    assert "local-mail 1 0 0" in rows and "to-hard 1 0 0" in rows, rows
    rows = _rows(browser, "destinations")
    assert "box 1 0 0 0" in rows and "hard 0 0 0 1" in rows, rows
    # The charts of the last hour have the mail in the minute now running.
    charts = {
        svg.get_attribute("aria-label"): svg.get_attribute("data-total")
        for svg in browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    }
    assert (
        charts["route local-mail, last hour: 1 queued, 0 rejected, 0 failed; at most 1 a minute"]
        == "1"
    )
    assert charts["destination hard, last hour: 0 delivered, 0 duplicate, 0 temporary, 1 refused;"
                  " at most 1 a minute"] == "1"  # fmt: skip
    bar = browser.find_element(By.CSS_SELECTOR, "#routes svg.chart rect.ok")
    assert bar.size["height"] > 20, bar.size  # the only busy minute is the peak
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_dead_letter_is_retried_from_the_page_with_the_token_and_refused_without(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    smtp_sink_factory: SmtpSinkFactory,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By

    hard = smtp_sink_factory(hard_reject=["rcpt"])
    smtp, admin = free_port(), free_port()
    (tmp_path / "admin.token").write_text("correct horse battery staple\n")
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
admin_token_file: admin.token
listeners:
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  partner: {{protocol: smtp, connect: "tcp:127.0.0.1:{hard.port}", tls: none}}
routes:
  - {{name: to-partner, from: mail-in, match: {{rcpt: '@partner\\.test$'}}, to: partner}}
""")
    gw.start([smtp, admin])
    code, transcript = swaks_send(smtp, "bob@partner.test")
    assert code == SwaksExit.OK, transcript
    queue_id = transcript.split("queued as ")[1].split()[0]
    delivery_id = f"{queue_id}.1"
    code, transcript = swaks_send(smtp, "carol@partner.test")  # to be dropped
    assert code == SwaksExit.OK, transcript
    dropped_id = transcript.split("queued as ")[1].split()[0] + ".1"
    url = f"http://127.0.0.1:{admin}/"
    wait_until(lambda: (dropped_id in _page(browser, url).find_element(By.ID, "dead").text
               and delivery_id in browser.find_element(By.ID, "dead").text)
               or None, "the dead letters on the page")  # fmt: skip
    # The partner is fixed: the same address now takes mail.
    hard.stop()
    good = smtp_sink_factory(port=hard.port)

    # Without signing in: no buttons, and neither showing nor acting works.
    assert not browser.find_elements(By.CSS_SELECTOR, "#dead form")
    assert browser.find_element(By.ID, "sign-in")
    assert _post(f"{url}queue/retry", {"id": delivery_id, "csrf": "x"}) == 403
    browser.get(f"{url}queue/{delivery_id}")
    assert "403: sign in with the admin token first" in browser.find_element(By.ID, "refusal").text
    browser.get(url)
    _sign_in(browser, "wrong token")
    assert "403: wrong token" in browser.find_element(By.ID, "refusal").text

    # The browser logs those two refusals (and nothing else).
    logged = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert len(logged) == 2 and all("403 (Forbidden)" in e["message"] for e in logged), logged
    browser.get(url)
    _sign_in(browser, "correct horse battery staple")
    assert "Signed in" in browser.find_element(By.ID, "account").text
    cookie = browser.get_cookie("gateway_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The session alone is not enough: a form from elsewhere lacks the CSRF field,
    # and a request from another origin is refused even with it.
    header = {"Cookie": f"gateway_session={cookie['value']}"}
    assert _post(f"{url}queue/retry", {"id": delivery_id}, header) == 403
    csrf = browser.find_element(By.CSS_SELECTOR, "#dead input[name=csrf]").get_attribute("value")
    foreign = {**header, "Origin": "http://attacker.test"}
    assert _post(f"{url}queue/retry", {"id": delivery_id, "csrf": csrf}, foreign) == 403
    assert good.messages() == []

    _follow(browser, browser.find_element(By.LINK_TEXT, delivery_id))
    assert "dead letter" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(OUTPUT / "dashboard-show.png"))
    _follow(browser, browser.find_element(By.CSS_SELECTOR, f"button[value='{delivery_id}']"))
    assert f"{delivery_id} retried" in browser.find_element(By.ID, "notice").text
    wait_until(lambda: good.messages() or None, "the retried mail at the partner")
    wait_until(lambda: delivery_id not in _page(browser, url).find_element(By.ID, "dead").text
               or None, "the dead letter gone from the page")  # fmt: skip
    browser.save_screenshot(str(OUTPUT / "dashboard-retried.png"))
    rows = _rows(browser, "destinations")
    assert "partner 1 0 0 2" in rows, rows
    drop = f"#dead form[action='/queue/drop'] button[value='{dropped_id}']"
    _follow(browser, browser.find_element(By.CSS_SELECTOR, drop))
    assert f"{dropped_id} dropped" in browser.find_element(By.ID, "notice").text
    assert "0 dead letters" in browser.find_element(By.ID, "dead").text
    browser.get(f"{url}queue/{dropped_id}")
    assert "404: no message or delivery" in browser.find_element(By.ID, "refusal").text
    browser.get_log("browser")  # that 404 was asked for
    assert len(good.messages()) == 1  # only the retried one went out
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    assert "dashboard: 127.0.0.1 retried " + delivery_id in gw.log_text()
    assert "dashboard: 127.0.0.1 dropped " + dropped_id in gw.log_text()
    assert "dashboard: sign-in from 127.0.0.1 refused: wrong token" in gw.log_text()


def _rows(browser: Any, table: str) -> list[str]:
    """The rows of a table of counters, each as its cells' text (the chart's is hover text)."""
    from selenium.webdriver.common.by import By

    return [
        " ".join(td.text for td in row.find_elements(By.CSS_SELECTOR, "td:not(:last-child)"))
        for row in browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    ]


def _sign_in(browser: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    form = browser.find_element(By.ID, "sign-in")
    form.find_element(By.NAME, "token").send_keys(token)
    _follow(browser, form.find_element(By.TAG_NAME, "button"))


def _follow(browser: Any, element: Any) -> None:
    """Click a link or a form's button and wait until the next page has replaced this one
    (a click does not wait for the navigation it starts)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(page))
    WebDriverWait(browser, 10).until(
        lambda b: b.execute_script("return document.readyState") == "complete"
    )


def _post(url: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> int:
    """The status of a form POSTed outside the browser (redirects not followed)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    class _Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(fields).encode(), headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.build_opener(_Stay).open(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _page(browser: Any, url: str) -> Any:
    browser.get(url)
    return browser
