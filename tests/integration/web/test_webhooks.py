"""Web hooks through the real gateway process, both ways.

Mail to web hook: swaks -> the gateway's SMTP listener -> the ``webhook``
destination -> a real HTTP server started here (Python's http.server in a
thread on 127.0.0.1) that records what it gets and answers from a script.
Web hook to mail: curl -> the gateway's ``http`` listener -> ``http_to_mail``
-> Postfix's smtp-sink and a Maildir.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import functools
import hashlib
import hmac
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import peers
from tests.peers import (
    LOOPBACK,
    REPO_ROOT,
    GatewayProcess,
    SmtpSink,
    SwaksExit,
    curl,
    data_reply_code,
    free_port,
    make_tls_cert,
    swaks_send,
)

HOOK_SECRET = "hook-secret"
WEB_SECRET = "web-secret"
ATTACHMENT_LIMIT = 4096


# --------------------------------------------------------------------------- the receiver


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.monotonic()
    client_port: int  # tells connections apart

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b"ok"
    delay: float = 0.0


class Receiver:
    """A web hook receiver: records each POST and answers with the next scripted Answer
    (the last one repeats). Optionally HTTPS with (cert, key)."""

    def __init__(
        self,
        answers: Sequence[Answer] = (Answer(),),
        *,
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.answers = list(answers)
        self.port = port
        self.tls = tls
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                            self.client_address[1],
                        )
                    )
                    n = len(receiver.requests) - 1
                    answer = receiver.answers[min(n, len(receiver.answers) - 1)]
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> Receiver:
        server = http.server.ThreadingHTTPServer((LOOPBACK, self.port), self._handler())
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(10)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{LOOPBACK}:{self.port}/inbox?token=abc"

    def got(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        return wait_until(
            lambda: self.got() if len(self.got()) >= count else None,
            f"{count} request(s) at the receiver (got {len(self.got())})",
            timeout,
        )


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(*answers: Answer, **kw: Any) -> Receiver:
        receiver = Receiver(answers or (Answer(),), **kw).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


# --------------------------------------------------------------------------- the gateway


wait_until = functools.partial(peers.wait_until, interval=0.05)


CONFIG = r"""
version: 1
shutdown_timeout: 5s
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:@SMTP@:interface=127.0.0.1
    hostname: gw.test
  web-in:
    protocol: http
    listen: tcp:@HTTP@:interface=127.0.0.1
    max_size: 1MiB
destinations:
  hook:
    protocol: webhook
    url: @URL@
    secret: hook-secret
    attachment_limit: 4KiB
    timeout: 2s
    retry_min: 60s      # a Retry-After must beat this
    retry_max: 120s
    headers: {Authorization: Bearer t0k3n}
@CA@
  sink:
    protocol: smtp
    connect: tcp:127.0.0.1:@SINK@
    tls: none
    retry_min: 1s
  box:
    protocol: maildir
    path: mail
routes:
  - name: to-hook
    from: mail-in
    match: {rcpt: '@hook\.test$'}
    to: hook
  - name: deploys
    from: web-in
    match: {path: '^/hooks/(?P<team>[a-z]+)$'}
    transforms: [http_to_mail]
    options:
      from: 'Hook bot <bot@gw.test>'
      to: ['{team}@example.test']
      subject: 'Deployed {{repository.name}} for {team}'
      secret: web-secret
      message_id_domain: gw.test
    to: [sink, box]
  - name: forms
    from: web-in
    match: {prefix: /forms/}
    transforms: [http_to_mail]
    options:
      from: forms@gw.test
      to: office@example.test
      subject: 'Form from {{name}}'
      body: "{{name}} wrote:\n{{message}}\n"
    to: box
"""


@dataclass
class Gateway:
    process: GatewayProcess
    config: Path
    smtp: int
    http: int
    folder: Path

    def queue(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", "-c", str(self.config), *args, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def retry(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", "-c", str(self.config), "retry", "--all"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert out.returncode == 0, out.stderr

    def maildir(self) -> list[email.message.EmailMessage]:
        new = self.folder / "mail" / "new"
        found = []
        for path in sorted(new.iterdir()) if new.is_dir() else []:
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(msg, email.message.EmailMessage)
            found.append(msg)
        return found


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SmtpSink]:
    with SmtpSink(tmp_path / "sink").start() as s:
        yield s


@pytest.fixture
def start_gateway(tmp_path: Path, sink: SmtpSink) -> Iterator[Callable[..., Gateway]]:
    started: list[GatewayProcess] = []

    def start(url: str, *, ca: Path | None = None) -> Gateway:
        smtp, web = free_port(), free_port()
        text = (
            CONFIG.replace("@SMTP@", str(smtp))
            .replace("@HTTP@", str(web))
            .replace("@URL@", url)
            .replace("@SINK@", str(sink.port))
            .replace("@CA@", f"    ca: {ca}" if ca else "")
        )
        path = tmp_path / "routes.yaml"
        path.write_text(text)
        process = GatewayProcess(path)
        started.append(process)
        process.start([smtp, web], timeout=30)
        return Gateway(process, path, smtp, web, tmp_path)

    yield start
    for process in started:
        process.stop()


# --------------------------------------------------------------------------- mail -> web hook


PDF = bytes(range(256)) * 8  # 2 KiB: under the attachment limit, so included
BIG = b"Z" * (ATTACHMENT_LIMIT + 1)  # over it: listed only


def multipart_mail(message_id: str) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = "=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@client.test>"
    msg["To"] = "Team <team@hook.test>"
    msg["Cc"] = "boss@elsewhere.test"
    msg["Subject"] = "Grüße: the report"
    msg["Date"] = "Tue, 01 Jan 2030 10:00:00 +0100"
    msg["Message-ID"] = message_id
    msg["X-Custom"] = "kept"
    msg.set_content("Hello team,\nthe report is attached. Größe: 2 KiB.\n")
    msg.add_alternative("<p>Hello team,<br>the report is <b>attached</b>.</p>\n", subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    msg.add_attachment(BIG, maintype="application", subtype="zip", filename="big.zip")
    return msg.as_bytes(policy=email.policy.SMTP)


def send_mail(gw: Gateway, message_id: str, rcpt: str = "team@hook.test") -> None:
    code, transcript = swaks_send(
        gw.smtp, rcpt, sender="juergen@client.test", data=multipart_mail(message_id)
    )
    assert code == SwaksExit.OK, transcript
    assert data_reply_code(transcript) == 250


def test_a_multipart_mail_arrives_as_signed_json_with_everything(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(Answer(202, body=b"accepted"))
    gw = start_gateway(receiver.url)
    send_mail(gw, "<report-1@client.test>")
    [got] = receiver.wait_for(1)
    assert got.path == "/inbox?token=abc"
    assert got.headers["content-type"] == "application/json; charset=utf-8"
    assert got.headers["authorization"] == "Bearer t0k3n"
    mac = hmac.new(HOOK_SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-hub-signature-256"] == f"sha256={mac}"
    doc = got.json()
    assert got.headers["idempotency-key"] == doc["id"]
    assert doc["kind"] == "mail" and doc["listener"] == "mail-in"
    assert doc["envelope"] == {"sender": "juergen@client.test", "recipients": ["team@hook.test"]}
    assert doc["message_id"] == "<report-1@client.test>"
    assert doc["subject"] == "Grüße: the report"
    assert doc["from"] == {"name": "Jürgen Müller", "address": "juergen@client.test"}
    assert doc["to"] == [{"name": "Team", "address": "team@hook.test"}]
    assert doc["cc"] == [{"name": "", "address": "boss@elsewhere.test"}]
    assert doc["date"] == "Tue, 01 Jan 2030 10:00:00 +0100"
    assert doc["date_iso"] == "2030-01-01T10:00:00+01:00"
    headers = dict((name.lower(), value) for name, value in doc["headers"])
    assert headers["subject"] == "Grüße: the report"
    assert headers["x-custom"] == "kept"
    assert "by gw.test (gateway) with ESMTP" in headers["received"]  # the gateway's own trace
    assert doc["text"] == "Hello team,\nthe report is attached. Größe: 2 KiB.\n"
    assert doc["html"] == "<p>Hello team,<br>the report is <b>attached</b>.</p>\n"
    report, big = doc["attachments"]
    assert report["name"] == "report.pdf" and report["type"] == "application/pdf"
    assert report["size"] == len(PDF) and report["included"] is True
    assert base64.b64decode(report["content"]) == PDF
    assert big["name"] == "big.zip" and big["type"] == "application/zip"
    assert big["size"] == len(BIG) and big["included"] is False and big["content"] is None
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")
    assert "route=to-hook destination=hook" in gw.process.log_text()
    assert "outcome=delivered detail=HTTP 202" in gw.process.log_text()


def test_503_with_retry_after_then_200_gets_the_message_once_later(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(
        Answer(503, (("Retry-After", "1"),), b"maintenance until later"), Answer(200)
    )
    gw = start_gateway(receiver.url)
    send_mail(gw, "<retry-1@client.test>")
    first, second = receiver.wait_for(2, timeout=30)
    # Retry-After: 1 beat retry_min (60 s): the second try came about a second later.
    assert 0.9 <= second.at - first.at < 30
    assert first.body == second.body
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")
    log = gw.process.log_text()
    assert "attempt=1 outcome=temporary detail=HTTP 503" in log
    assert "maintenance until later" in log
    assert "attempt=2 outcome=delivered" in log
    time.sleep(2.5)  # nothing more comes: delivered once
    assert len(receiver.got()) == 2
    assert gw.queue("dead") == []


def test_400_makes_a_dead_letter_with_the_reason(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(Answer(400, body=b'{"error": "unknown mailbox team"}'))
    gw = start_gateway(receiver.url)
    send_mail(gw, "<dead-1@client.test>")
    receiver.wait_for(1)
    [dead] = wait_until(lambda: gw.queue("dead"), "a dead letter")
    assert dead["destination"] == "hook" and dead["route"] == "to-hook"
    assert dead["msgid"] == "<dead-1@client.test>"
    shown = receiver.url.split("?")[0]  # the query may hold a token: never shown
    assert dead["last_error"].startswith(f"HTTP 400 Bad Request from {shown}: "), dead
    assert "token" not in dead["last_error"]
    assert "unknown mailbox team" in dead["last_error"]
    assert gw.queue("list") == []
    time.sleep(1.5)
    assert len(receiver.got()) == 1  # a permanent failure is not tried again


def test_a_receiver_that_is_down_then_up_gets_the_message_after_a_retry(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    port = free_port()
    gw = start_gateway(f"http://{LOOPBACK}:{port}/inbox?token=abc")
    send_mail(gw, "<outage-1@client.test>")

    def deferred() -> Any:
        return [d for d in gw.queue("list") if d["attempts"] >= 1]

    [waiting] = wait_until(deferred, "the first failed try")
    assert "refused the connection" in waiting["last_error"]
    receiver = receivers(port=port)
    gw.retry()  # retry_min is a minute: ask for the next try now
    [got] = receiver.wait_for(1)
    assert got.json()["message_id"] == "<outage-1@client.test>"
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")


def test_a_receiver_that_hangs_is_a_timeout_and_tried_again(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(Answer(200, delay=5.0), Answer(200))
    gw = start_gateway(receiver.url)
    send_mail(gw, "<slow-1@client.test>")

    def timed_out() -> Any:
        return [d for d in gw.queue("list") if d["attempts"] >= 1]

    [waiting] = wait_until(timed_out, "the try to time out")
    assert "no answer from" in waiting["last_error"] and "within 2s" in waiting["last_error"]
    gw.retry()
    receiver.wait_for(2)
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")


def test_https_receiver_verified_with_the_destinations_ca(
    tmp_path: Path,
    start_gateway: Callable[..., Gateway],
    receivers: Callable[..., Receiver],
) -> None:
    cert, key = make_tls_cert(tmp_path / "tls")
    receiver = receivers(Answer(200), tls=(cert, key))
    gw = start_gateway(receiver.url, ca=cert)
    send_mail(gw, "<tls-1@client.test>")
    [got] = receiver.wait_for(1)
    assert got.json()["message_id"] == "<tls-1@client.test>"
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")


def test_https_receiver_not_trusted_is_a_temporary_tls_failure(
    tmp_path: Path,
    start_gateway: Callable[..., Gateway],
    receivers: Callable[..., Receiver],
) -> None:
    cert, key = make_tls_cert(tmp_path / "tls")
    receiver = receivers(Answer(200), tls=(cert, key))
    gw = start_gateway(receiver.url)  # no ca: the system's trust store does not know it

    def failed() -> Any:
        return [d for d in gw.queue("list") if d["attempts"] >= 1]

    send_mail(gw, "<tls-2@client.test>")
    [waiting] = wait_until(failed, "the TLS failure")
    assert "TLS" in waiting["last_error"] and "ca:" in waiting["last_error"]
    assert receiver.got() == []


# --------------------------------------------------------------------------- web hook -> mail


def post(
    gw: Gateway, path: str, body: bytes, content_type: str | None, *extra: str
) -> tuple[int, Any]:
    data = gw.folder / "request.body"
    data.write_bytes(body)
    args = ["-X", "POST", "--data-binary", f"@{data}", "-w", "\n%{http_code}"]
    args += ["-H", f"Content-Type: {content_type}" if content_type else "Content-Type:"]
    result = curl(*args, *extra, f"http://{LOOPBACK}:{gw.http}{path}", timeout=30)
    assert result.returncode == 0, result.stderr
    text, _, status = result.stdout.rpartition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text  # the listener's own errors (404, 413) are plain text


def signature(body: bytes, secret: str = WEB_SECRET) -> str:
    return (
        "X-Hub-Signature-256: sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    )


def test_signed_json_hook_becomes_mail_at_the_sink_and_the_maildir(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver], sink: SmtpSink
) -> None:
    gw = start_gateway(receivers().url)
    payload = {"repository": {"name": "gatewäy"}, "ref": "main", "commits": [{"id": "abc123"}]}
    body = json.dumps(payload).encode()
    status, answer = post(gw, "/hooks/ops", body, "application/json", "-H", signature(body))
    assert status == 202, answer
    assert answer["status"] == "queued" and answer["id"]
    [mail] = sink.wait_for(1, timeout=20)
    assert mail.sender == "bot@gw.test" and mail.recipients == ["ops@example.test"]
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert parsed["Subject"] == "Deployed gatewäy for ops"
    assert parsed["From"] == "Hook bot <bot@gw.test>"
    assert parsed["Message-ID"] == f"<{answer['id']}.webhook@gw.test>"
    assert b"=?utf-8?" in mail.raw.split(b"\n\n", 1)[0].lower()
    text = parsed.get_body(("plain",))
    assert text is not None and json.loads(text.get_content()) == payload
    [boxed] = wait_until(gw.maildir, "the Maildir copy")
    assert boxed["Message-ID"] == f"<{answer['id']}.webhook@gw.test>"


def test_refused_hooks_get_their_status_and_nothing_arrives(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver], sink: SmtpSink
) -> None:
    gw = start_gateway(receivers().url)
    good = json.dumps({"repository": {"name": "gw"}}).encode()
    cases = [
        # (body, content type, extra curl args, status, words in the error)
        (good, "application/json", ["-H", signature(good, "wrong")], 401, "does not match"),
        (good, "application/json", [], 401, "no X-Hub-Signature-256"),
        (b'{"repository": ', "application/json", ["-H", signature(b'{"repository": ')],
         400, "not valid JSON"),
        (good, "text/plain", ["-H", signature(good)], 415, "application/json"),
        (b"{}", "application/json", ["-H", signature(b"{}")], 400, "repository"),
    ]  # fmt: skip
    for body, ctype, extra, expected, words in cases:
        status, answer = post(gw, "/hooks/ops", body, ctype, *extra)
        assert status == expected, (body, ctype, answer)
        assert words in answer["error"], answer
    status, answer = post(gw, "/nowhere", good, "application/json", "-H", signature(good))
    assert status == 404, answer
    # A GET to a hook: 405, naming the method that works (RFC 9110 15.5.6).
    got = curl("-s", "-i", f"http://{LOOPBACK}:{gw.http}/hooks/ops", timeout=30)
    head = got.stdout.replace("\r\n", "\n").split("\n\n", 1)[0]
    assert head.startswith("HTTP/1.1 405 "), head
    assert "\nAllow: POST" in head, head
    # Then one good hook: it is the only mail that arrives.
    status, answer = post(gw, "/hooks/dev", good, "application/json", "-H", signature(good))
    assert status == 202, answer
    [mail] = sink.wait_for(1, timeout=20)
    assert mail.recipients == ["dev@example.test"]
    time.sleep(1.0)
    assert len(sink.messages()) == 1
    assert len(wait_until(gw.maildir, "the Maildir copy")) == 1
    assert gw.queue("dead") == []


def test_forms_urlencoded_and_multipart_with_a_file_become_mail(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    gw = start_gateway(receivers().url)
    body = b"name=J%C3%BCrgen&message=Please+call+me+back."
    status, answer = post(gw, "/forms/contact", body, "application/x-www-form-urlencoded")
    assert status == 202, answer
    upload = gw.folder / "plan.pdf"
    upload.write_bytes(PDF)
    result = curl(
        "-F", "name=Ann", "-F", "message=See the plan.", "-F", f"plan=@{upload};type=application/pdf",
        "-w", "\n%{http_code}", f"http://{LOOPBACK}:{gw.http}/forms/upload", timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.rpartition("\n")[2] == "202", result.stdout
    mails = wait_until(lambda: gw.maildir() if len(gw.maildir()) >= 2 else None, "two mails")
    by_subject = {m["Subject"]: m for m in mails}
    contact = by_subject["Form from Jürgen"]
    text = contact.get_body(("plain",))
    assert text is not None and text.get_content() == "Jürgen wrote:\nPlease call me back.\n"
    uploaded = by_subject["Form from Ann"]
    text = uploaded.get_body(("plain",))
    assert text is not None and text.get_content() == "Ann wrote:\nSee the plan.\n"
    [attachment] = list(uploaded.iter_attachments())
    assert attachment.get_filename() == "plan.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == PDF


def test_a_hook_over_the_size_limit_is_413_and_the_listener_goes_on(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    gw = start_gateway(receivers().url)
    body = b"name=x&message=" + b"y" * (2 * 1024 * 1024)
    status, _ = post(gw, "/forms/big", body, "application/x-www-form-urlencoded")
    assert status == 413
    status, answer = post(
        gw, "/forms/ok", b"name=ok&message=fine", "application/x-www-form-urlencoded"
    )
    assert status == 202, answer
    wait_until(gw.maildir, "the mail")
    with socket.create_connection((LOOPBACK, gw.http), timeout=5):
        pass  # still listening


def test_a_waiting_delivery_survives_kill_9_and_is_posted_once_after_the_restart(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    port = free_port()
    gw = start_gateway(f"http://{LOOPBACK}:{port}/inbox?token=abc")
    send_mail(gw, "<crash-1@client.test>")
    wait_until(lambda: [d for d in gw.queue("list") if d["attempts"] >= 1], "the first failed try")
    gw.process.kill9()
    gw.process.wait()
    receiver = receivers(port=port)
    # A restart tries what was waiting at once, without waiting for retry_min (60 s).
    gw.process.start([gw.smtp, gw.http], timeout=30)
    [got] = receiver.wait_for(1)
    assert got.json()["message_id"] == "<crash-1@client.test>"
    wait_until(lambda: gw.queue("list") == [] or None, "the delivery to be done")
    time.sleep(1.5)
    assert len(receiver.got()) == 1


def test_deliveries_reuse_kept_alive_connections(
    start_gateway: Callable[..., Gateway], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(Answer(200))
    gw = start_gateway(receiver.url)
    for n in range(8):
        send_mail(gw, f"<keepalive-{n}@client.test>")
        receiver.wait_for(n + 1)
    got = receiver.got()
    assert sorted(r.json()["message_id"] for r in got) == sorted(
        f"<keepalive-{n}@client.test>" for n in range(8)
    )
    # One after the other, each POST could take the connection the last one left open.
    assert len({r.client_port for r in got}) <= 2, [r.client_port for r in got]
