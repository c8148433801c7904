"""The gateway as a real process: swaks in, Maildir and smtp-sink out.

Every test starts its own gateway on free ports of 127.0.0.1 and the real
peers it needs, and stops them afterwards.
"""

from __future__ import annotations

import concurrent.futures
import email
import email.policy
import itertools
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    GatewayProcess,
    SmtpSink,
    SwaksExit,
    data_reply_code,
    free_port,
    rcpt_reply_codes,
    sendmail_raw,
    swaks_send,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]

PLUGIN = """
from gateway.plugins import transform

@transform("fragile")
def fragile(msg, options):
    if b"explode" in msg.body:
        raise RuntimeError("this plugin cannot handle explosions")
    return msg
"""


def config_text(
    tmp_path: Path,
    port: int,
    sink_port: int,
    *,
    extra_routes: str = "",
    max_size: str = "64KiB",
    allow: str = "[127.0.0.0/8]",
) -> str:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "fragile.py").write_text(PLUGIN)
    return f"""
version: 1
plugins: [plugins]
shutdown_timeout: 20s
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{port}:interface=127.0.0.1
    hostname: gw.test
    max_size: {max_size}
    allow: {allow}
destinations:
  box:
    protocol: maildir
    path: mail
  relay:
    protocol: smtp
    connect: tcp:127.0.0.1:{sink_port}
    tls: none
    timeout: 30s
    retry_min: 1s
    retry_max: 4s
routes:
  - name: local
    from: mail-in
    match: {{rcpt: '^(?P<user>[a-z]+)@local\\.test$'}}
    transforms: [fragile, tag_subject]
    options: {{tag: '[{{user}}]'}}
    to: box
  - name: both
    from: mail-in
    match: {{rcpt: '@both\\.test$'}}
    to: [box, relay]
  - name: relay
    from: mail-in
    match: {{rcpt: '@relay\\.test$'}}
    to: relay
{extra_routes}"""


def start_gateway(tmp_path: Path, sink_port: int, **kw: str) -> tuple[GatewayProcess, int]:
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(config_text(tmp_path, port, sink_port, **kw))
    # The example plugin lives in the repository's plugins/ folder; copy it next to the config.
    (tmp_path / "plugins" / "tag_subject.py").write_text(
        (REPO / "plugins" / "tag_subject.py").read_text()
    )
    gw = GatewayProcess(path)
    gw.start(port)
    return gw, port


def maildir_messages(tmp_path: Path) -> list[email.message.Message]:
    new = tmp_path / "mail" / "new"
    if not new.is_dir():
        return []
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
        for p in sorted(new.iterdir())
    ]


def wait_maildir(tmp_path: Path, count: int, timeout: float = 10.0) -> list[email.message.Message]:
    """The Maildir's messages once there are ``count`` of them (delivery runs after the 250)."""
    deadline = time.monotonic() + timeout
    while True:
        found = maildir_messages(tmp_path)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, (
                f"expected {count} message(s) in the Maildir, found {len(found)}"
            )
            leftovers = list((tmp_path / "mail" / "tmp").iterdir())
            assert not leftovers, f"half-written files were left in tmp/: {leftovers}"
            return found
        time.sleep(0.05)


BODY = "line one\n.starts with a dot\n..two dots\nutf-8: caf\u00e9\n\n-- \nsignature\n"


@pytest.fixture
def sink(tmp_path: Path) -> SmtpSink:
    s = SmtpSink(tmp_path / "sink").start()
    yield s
    s.stop()


@pytest.fixture
def gateway(tmp_path: Path, sink: SmtpSink) -> tuple[GatewayProcess, int]:
    gw, port = start_gateway(tmp_path, sink.port)
    yield gw, port
    gw.stop()


def test_mail_reaches_maildir_and_smtp_sink_intact(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    gw, port = gateway
    headers = {
        "Subject": "=?utf-8?q?caf=C3=A9?= report",
        "Message-Id": "<intact-1@client.test>",
        "X-Custom": "kept as is",
    }
    code, transcript = swaks_send(
        port,
        ["ann@both.test", "bob@both.test"],
        headers=headers,
        body=BODY,
    )
    assert code == SwaksExit.OK, transcript
    assert data_reply_code(transcript) == 250
    [at_sink] = sink.wait_for(1)
    assert at_sink.sender == "sender@client.test"
    assert sorted(at_sink.recipients) == ["ann@both.test", "bob@both.test"]
    assert at_sink.headers["Subject"] == "=?utf-8?q?caf=C3=A9?= report"
    assert at_sink.headers["X-Custom"] == "kept as is"
    assert at_sink.headers["Message-ID"] == "<intact-1@client.test>"
    assert "by gw.test (gateway) with ESMTP id" in at_sink.headers["Received"]
    assert at_sink.body.decode().rstrip("\n") == BODY.rstrip("\n")
    [boxed] = wait_maildir(tmp_path, 1)
    assert boxed["Return-Path"] == "<sender@client.test>"
    assert boxed.get_all("Delivered-To") == ["ann@both.test", "bob@both.test"]
    assert boxed["Message-ID"] == "<intact-1@client.test>"
    raw = next((tmp_path / "mail" / "new").iterdir()).read_bytes()
    assert raw.split(b"\n\n", 1)[1].rstrip(b"\n") == BODY.rstrip("\n").encode()
    # The sink has the message once the gateway's DATA is answered; the gateway logs
    # the outcome a moment later, after recording it.
    log = gw.wait_for_log(
        "route=both destination=relay to=ann@both.test,bob@both.test attempt=1 outcome=delivered"
    )
    assert "msgid=<intact-1@client.test>" in log


def test_example_plugin_tags_the_subject_with_the_named_group(
    tmp_path: Path, gateway: tuple[GatewayProcess, int]
) -> None:
    _, port = gateway
    code, transcript = swaks_send(port, "carol@local.test", headers={"Subject": "hello"})
    assert code == SwaksExit.OK, transcript
    [boxed] = wait_maildir(tmp_path, 1)
    assert boxed["Subject"] == "[carol] hello"


def test_unroutable_recipient_gets_550_and_nothing_is_delivered(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    _, port = gateway
    code, transcript = swaks_send(port, "someone@elsewhere.test")
    assert code == SwaksExit.RCPT_REJECTED, transcript
    assert rcpt_reply_codes(transcript) == [550]
    assert "550 5.1.1" in transcript
    # One good and one bad recipient: only the good one is accepted and delivered.
    code, transcript = swaks_send(port, ["x@relay.test", "y@nowhere.test"])
    assert rcpt_reply_codes(transcript) == [250, 550]
    [msg] = sink.wait_for(1)
    assert msg.recipients == ["x@relay.test"]
    time.sleep(0.3)
    assert len(sink.captured()) == 1
    assert maildir_messages(tmp_path) == []


def test_oversized_message_gets_552(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    _, port = gateway
    big = "x" * 70 + "\n"
    code, transcript = swaks_send(port, "x@relay.test", body=big * 1200)  # ~85 KB > 64 KiB
    assert code == SwaksExit.MESSAGE_REJECTED
    assert data_reply_code(transcript) == 552, transcript
    assert "552 5.3.4" in transcript
    # SIZE declared up front is refused at MAIL.
    reply = sendmail_raw(port, b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=1000000\r\nQUIT\r\n")
    assert b"552 5.3.4" in reply
    assert b"SIZE 65536" in reply
    time.sleep(0.3)
    assert sink.captured() == []


def test_malformed_commands_get_500_501_and_the_session_goes_on(
    sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    _, port = gateway
    reply = sendmail_raw(
        port,
        b"EHLO c.test\r\n"
        b"FROBNICATE\r\n"
        b"MAIL FROM:<not an address\r\n"
        b"RCPT TO:<x@relay.test>\r\n"
        b"MAIL FROM:<a@b.test> BODY=9BIT\r\n"
        b"\xff\xfe\x00garbage\r\n"
        b"MAIL FROM:<a@b.test>\r\n"
        b"RCPT TO:<x@relay.test>\r\n"
        b"DATA\r\n"
        b"Subject: after errors\r\n\r\nstill fine\r\n.\r\n"
        b"QUIT\r\n",
    )
    text = reply.decode("latin-1")
    codes = [line[:3] for line in text.splitlines() if line[3:4] == " "]
    assert codes == [
        "220",
        "250",
        "500",
        "501",
        "503",
        "501",
        "500",
        "250",
        "250",
        "354",
        "250",
        "221",
    ], text
    [msg] = sink.wait_for(1)
    assert msg.headers["Subject"] == "after errors"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_client_that_pipelines_without_reading_costs_bounded_memory(
    sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    """Before the fix, 28 MB of NOOPs from a client that read no reply grew the gateway
    by 220 MB in 20 s; the gateway now stops reading it once its replies back up. (NOOPs
    now also end the session after the junk limit; HELP shows the flow control.)"""
    gw, port = gateway
    before = _rss_kib(gw.pid)
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.settimeout(3)
        chunk = b"HELP\r\n" * 10_000  # not a junk command: only the flow control stops it
        sent = 0
        deadline = time.monotonic() + 30
        with pytest.raises(TimeoutError):
            client.sendall(b"EHLO flood.test\r\n")
            while time.monotonic() < deadline and sent < 200_000_000:
                client.sendall(chunk)
                sent += len(chunk)
        # The gateway stopped reading long before the bound: the kernel's buffers and
        # the gateway's read-ahead hold what it took.
        assert sent < 20_000_000
        assert _rss_kib(gw.pid) - before < 20_000
    # Other clients are served as before.
    reply = sendmail_raw(
        port,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@relay.test>\r\nDATA\r\n"
        b"Subject: after the flood\r\n\r\nfine\r\n.\r\nQUIT\r\n",
    )
    assert b"\r\n250 2.0.0 Ok" in reply, reply
    [msg] = sink.wait_for(1)
    assert msg.headers["Subject"] == "after the flood"


def _abandon_a_transfer(port: int, size: int) -> None:
    """EHLO, MAIL, RCPT, DATA, ``size`` octets of content, then a reset: no final dot."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        replies = client.makefile("rb")

        def command(line: bytes) -> bytes:
            client.sendall(line)
            while (reply := replies.readline())[3:4] == b"-":
                pass
            return reply

        replies.readline()
        for line in (
            b"EHLO c.test\r\n",
            b"MAIL FROM:<a@b.test>\r\n",
            b"RCPT TO:<x@relay.test>\r\n",
        ):
            assert command(line).startswith(b"250"), line
        assert command(b"DATA\r\n").startswith(b"354")
        block = (b"x" * 998 + b"\r\n") * 64
        for _ in range(size // len(block)):
            client.sendall(block)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_abandoned_large_transfers_leave_no_memory_or_files_behind(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Defect: message content was kept in memory as it arrived, and what a client that
    hung up before the final dot had sent stayed: 300 clients that each sent 9 MB took
    the gateway from 59 MB to 2.76 GB. Content beyond 256 KiB now goes to an unlinked
    temporary file, which the hang-up removes."""
    data = tmp_path / "tmp"
    data.mkdir()
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(config_text(tmp_path, port, sink.port, max_size="20MiB"))
    (tmp_path / "plugins" / "tag_subject.py").write_text(
        (REPO / "plugins" / "tag_subject.py").read_text()
    )
    gw = GatewayProcess(path, env={**os.environ, "TMPDIR": str(data)})
    gw.start(port)
    try:
        before = _rss_kib(gw.pid)
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            for done in [pool.submit(_abandon_a_transfer, port, 9_000_000) for _ in range(300)]:
                done.result()
        wait_until(
            lambda: not gw_connections(gw.pid, port), what="the gateway to see every hang-up"
        )
        grown = _rss_kib(gw.pid) - before
        assert grown < 50_000, f"the gateway grew by {grown} KiB"
        assert list(data.iterdir()) == []
        assert not [
            f for f in Path(f"/proc/{gw.pid}/fd").iterdir() if "gateway-data" in str(f.resolve())
        ]
        # A message that does end is delivered whole, however large.
        body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 5000
        reply = sendmail_raw(
            port,
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@relay.test>\r\nDATA\r\n"
            + body
            + b".\r\nQUIT\r\n",
        )
        assert b"\r\n250 2.0.0 Ok" in reply, reply[-300:]
        [msg] = sink.wait_for(1)
        assert msg.headers["Subject"] == "big"
        assert len(msg.body) >= 5000 * 999
    finally:
        gw.stop()


def gw_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` on local port ``port``."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


@pytest.mark.parametrize(
    "recipient",
    ["user%evil.test@relay.test", '"user@evil.test"@relay.test', "evil.test!user@relay.test"],
)
def test_sender_specified_routing_is_refused_and_never_relayed(
    sink: SmtpSink, gateway: tuple[GatewayProcess, int], recipient: str
) -> None:
    """Defect: user%evil.test@partner.test and the like were accepted for a relayed domain
    and passed to the smarthost unchanged, which then sent the mail on to evil.test."""
    _, port = gateway
    _, transcript = swaks_send(port, [recipient, "ok@relay.test"])
    assert rcpt_reply_codes(transcript) == [550, 250], transcript
    assert "550 5.7.1 <" in transcript and "sender-specified routing" in transcript
    [msg] = sink.wait_for(1)
    assert msg.recipients == ["ok@relay.test"]


def test_clients_trickling_commands_are_closed_at_the_idle_timeout(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Defect: the idle timeout restarted on every byte: 10 clients sending one byte a
    second were all still connected after 40 s on a 5 s timeout."""
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        config_text(tmp_path, port, sink.port).replace(
            "    hostname: gw.test\n", "    hostname: gw.test\n    idle_timeout: 2s\n", 1
        )
    )
    (tmp_path / "plugins" / "tag_subject.py").write_text(
        (REPO / "plugins" / "tag_subject.py").read_text()
    )
    with GatewayProcess(path) as gw:
        gw.start(port)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
        try:
            for client in clients:
                assert client.recv(1024).startswith(b"220 ")
                client.setblocking(False)
            started = time.monotonic()
            closed: dict[int, bytes] = {}
            text = b"EHLO a.very.slow.client.test\r\n"
            for i in range(len(text)):
                for n, client in enumerate(clients):
                    if n in closed:
                        continue
                    try:
                        client.send(text[i : i + 1])
                        data = client.recv(1024)
                    except BlockingIOError:
                        continue
                    except ConnectionError:
                        data = b""
                    closed[n] = data
                if len(closed) == len(clients):
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                client.close()
    assert len(closed) == 10 and elapsed < 6, (closed, elapsed)
    assert all(reply.startswith(b"421 4.4.2") or reply == b"" for reply in closed.values())


def test_failing_plugin_fails_only_its_message(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    gw, port = gateway
    code, transcript = swaks_send(port, "dan@local.test", body="please explode now\n")
    assert data_reply_code(transcript) == 451, transcript
    assert "451 4.3.0" in transcript
    log = gw.log_text()
    assert "transform fragile of route local failed" in log
    assert "this plugin cannot handle explosions" in log
    # The listener keeps working, for other messages on the same route and for others.
    code, transcript = swaks_send(port, "dan@local.test", body="calm\n")
    assert code == SwaksExit.OK, transcript
    code, transcript = swaks_send(port, "x@relay.test", body="calm\n")
    assert code == SwaksExit.OK, transcript
    assert len(wait_maildir(tmp_path, 1)) == 1
    assert len(sink.wait_for(1)) == 1


def test_upstream_soft_failure_is_retried_and_hard_failure_bounces_once(
    tmp_path: Path, gateway: tuple[GatewayProcess, int], smtp_sink_factory
) -> None:
    soft = smtp_sink_factory(soft_reject=["rcpt"])
    hard = smtp_sink_factory(hard_reject=["rcpt"])
    routes = """  - name: soft
    from: mail-in
    match: {rcpt: '@soft\\.test$'}
    to: soft
  - name: hard
    from: mail-in
    match: {rcpt: '@hard\\.test$'}
    to: hard
  - name: bounces-home
    from: mail-in
    match: {rcpt: '@client\\.test$'}
    to: box
"""
    dests = f"""  soft: {{protocol: smtp, connect: "tcp:127.0.0.1:{soft.port}", tls: none, retry_min: 1s, retry_max: 1s}}
  hard: {{protocol: smtp, connect: "tcp:127.0.0.1:{hard.port}", tls: none}}
"""
    gw, port = gateway
    path = tmp_path / "routes.yaml"
    text = (
        path.read_text()
        .replace("routes:\n", "routes:\n" + routes)
        .replace("destinations:\n", "destinations:\n" + dests)
    )
    path.write_text(text)
    mark = gw.log_mark()
    gw.hup()
    gw.wait_for_log("configuration reloaded", since=mark)
    # Accepted once on disk; the upstream's 450 means "later", so it is tried again.
    code, transcript = swaks_send(
        port, "x@soft.test", headers={"Message-Id": "<soft-1@client.test>"}
    )
    assert code == SwaksExit.OK, transcript
    gw.wait_for_log("destination=soft to=x@soft.test attempt=3 outcome=temporary", timeout=15)
    assert "450 4.3.0" in gw.log_text()
    # The upstream's 550 means "never": a dead letter and exactly one bounce to the sender.
    code, transcript = swaks_send(
        port, "x@hard.test", headers={"Message-Id": "<hard-1@client.test>", "Subject": "doomed"}
    )
    assert code == SwaksExit.OK, transcript
    gw.wait_for_log("destination=hard to=x@hard.test attempt=1 outcome=dead", timeout=15)
    gw.wait_for_log("destination=box to=sender@client.test attempt=1 outcome=delivered", timeout=15)
    [dsn] = wait_maildir(tmp_path, 1)
    time.sleep(1)
    assert len(maildir_messages(tmp_path)) == 1  # exactly one bounce
    assert dsn["Return-Path"] == "<>"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = dsn.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; x@hard.test" in status
    assert "Action: failed" in status and "Status: 5.3.0" in status
    assert "Diagnostic-Code: smtp; 500" in status
    assert "Subject: doomed" in parts[2].as_string()


def test_outage_messages_queue_and_are_delivered_when_upstream_returns(tmp_path: Path) -> None:
    down = free_port()
    gw, port = start_gateway(tmp_path, down)
    try:
        for n in range(3):
            code, transcript = swaks_send(
                port, f"x{n}@relay.test", headers={"Message-Id": f"<outage-{n}@client.test>"}
            )
            assert code == SwaksExit.OK, transcript
        gw.wait_for_log("to=x0@relay.test attempt=3 outcome=temporary", timeout=20)
        assert "connection refused" in gw.log_text()
        with SmtpSink(tmp_path / "late-sink", port=down).start() as sink:
            got = sink.wait_for(3, timeout=20)
            assert sorted(m.recipients[0] for m in got) == [
                "x0@relay.test",
                "x1@relay.test",
                "x2@relay.test",
            ]
        # The tries followed the back-off: 1 s, then 2 s, then 4 s (capped), each +-20 %.
        times = [
            time.mktime(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S"))
            for line in gw.log_text().splitlines()
            if "to=x0@relay.test attempt=" in line
        ]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 3
        assert 0 <= gaps[0] <= 2 and 1 <= gaps[1] <= 4 and 2 <= gaps[2] <= 6, gaps
    finally:
        gw.stop()


def test_client_outside_allow_is_refused_at_connect(tmp_path: Path, sink: SmtpSink) -> None:
    gw, port = start_gateway(tmp_path, sink.port, allow="[10.0.0.0/8]")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            greeting = s.recv(1024)
            assert greeting.startswith(b"554 5.7.1"), greeting
            # RFC 5321 3.1: only QUIT is taken, then the connection closes.
            s.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
            replies = b""
            while replies.count(b"\r\n") < 2:
                replies += s.recv(1024)
            assert [line[:3] for line in replies.splitlines()] == [b"503", b"503"], replies
            s.sendall(b"QUIT\r\n")
            assert s.recv(1024).startswith(b"221 ")
            assert s.recv(1024) == b""
    finally:
        gw.stop()


def _send_in_background(
    port: int, to: str, results: list[tuple[int, str]], **kw: object
) -> threading.Thread:
    t = threading.Thread(target=lambda: results.append(swaks_send(port, to, **kw)))  # type: ignore[arg-type]
    t.start()
    return t


def test_sighup_swaps_routes_and_survives_a_broken_file(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    gw, port = gateway
    path = tmp_path / "routes.yaml"
    good = path.read_text()
    # A route for a new domain, added while mail flows.
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def flow() -> None:
        while not stop.is_set():
            results.append(swaks_send(port, "x@relay.test"))

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        assert swaks_send(port, "x@new.test")[0] == SwaksExit.RCPT_REJECTED
        path.write_text(
            good
            + "  - name: new\n    from: mail-in\n    match: {rcpt: '@new\\.test$'}\n    to: relay\n"
        )
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        code, transcript = swaks_send(port, "x@new.test")
        assert code == SwaksExit.OK, transcript
        # A broken file: the running routes stay, the error is logged with its line.
        path.write_text(good.replace("to: relay\n", "to: relya\n"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("reload refused", since=mark)
        assert "did you mean 'relay'?" in gw.log_text(since=mark)
        assert "routes.yaml:" in gw.log_text(since=mark)
        code, transcript = swaks_send(port, "x@new.test")
        assert code == SwaksExit.OK, transcript
    finally:
        stop.set()
        flowing.join(60)
    assert results and all(code == SwaksExit.OK for code, _ in results), [
        t for c, t in results if c
    ][:1]
    assert gw.is_running()
    # Every message that got 250 reached the sink.
    sink.wait_for(len(results) + 2, timeout=15)


def test_sighup_opens_new_listeners_and_closes_removed_ones(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    gw, port = gateway
    path = tmp_path / "routes.yaml"
    second = free_port()
    text = (
        path.read_text()
        .replace(
            "destinations:\n",
            f"  second-in:\n    protocol: smtp\n    listen: tcp:{second}:interface=127.0.0.1\n    hostname: second.test\ndestinations:\n",
        )
        .replace(
            "    from: mail-in\n    match: {rcpt: '@relay",
            "    from: [mail-in, second-in]\n    match: {rcpt: '@relay",
        )
    )
    path.write_text(text)
    mark = gw.log_mark()
    gw.hup()
    gw.wait_for_log("configuration reloaded", since=mark)
    code, transcript = swaks_send(second, "x@relay.test")
    assert code == SwaksExit.OK, transcript
    assert "220 second.test" in transcript
    # The unchanged listener kept its socket: a connection opened before the reload still works.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as early:
        assert early.recv(100).startswith(b"220 gw.test")
        path.write_text(text.replace("hostname: gw.test", "hostname: renamed.test"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        early.sendall(b"EHLO c.test\r\n")
        assert b"250" in early.recv(1000)
    _, transcript = swaks_send(port, "x@relay.test")
    assert "220 renamed.test" in transcript
    # Remove the second listener: its port closes.
    path.write_text(
        path.read_text()
        .replace("[mail-in, second-in]", "mail-in")
        .replace(
            f"  second-in:\n    protocol: smtp\n    listen: tcp:{second}:interface=127.0.0.1\n    hostname: second.test\n",
            "",
        )
    )
    mark = gw.log_mark()
    gw.hup()
    gw.wait_for_log("configuration reloaded", since=mark)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=5)


def _reload(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "reload", "-c", str(config), "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_reload_that_cannot_open_a_listener_changes_nothing(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    """The listener moves onto a port another program holds, and the same file adds a
    route: the reload is refused as a whole while mail flows, the old port goes on
    answering, the new route is not in force, and `gateway reload` exits 1 saying why."""
    gw, port = gateway
    path = tmp_path / "routes.yaml"
    good = path.read_text()
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def flow() -> None:
        while not stop.is_set():
            results.append(swaks_send(port, "x@relay.test"))

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        flowing = threading.Thread(target=flow)
        flowing.start()
        try:
            path.write_text(
                good.replace(f"listen: tcp:{port}:", f"listen: tcp:{busy}:")
                + "  - name: new\n    from: mail-in\n    match: {rcpt: '@new\\.test$'}\n"
                "    to: relay\n"
            )
            out = _reload(path)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "refused the reload" in out.stderr
            assert "listener 'mail-in' cannot open" in out.stderr and str(busy) in out.stderr
            log = gw.log_text()
            assert "reload refused, the running listeners and routes stay in force" in log
            assert "listener mail-in closed" not in log
            # The old port still answers, with the old routes only.
            assert swaks_send(port, "x@new.test")[0] == SwaksExit.RCPT_REJECTED
            code, transcript = swaks_send(port, "x@relay.test")
            assert code == SwaksExit.OK, transcript
            time.sleep(1)  # mail keeps flowing after the refusal
        finally:
            stop.set()
            flowing.join(60)
    assert len(results) >= 2 and all(c == SwaksExit.OK for c, _ in results), [
        t for c, t in results if c
    ][:1]
    # Once the port is free the same file goes in: listener moved, route in force.
    out = _reload(path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("reloaded: ")
    code, transcript = swaks_send(busy, "x@new.test")
    assert code == SwaksExit.OK, transcript
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_reload_that_shares_a_port_with_the_old_sockets_moves_the_listener(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    """A listener that keeps one of its ports and gains another: the old socket makes
    way for the new one on the same port, and both ports answer afterwards."""
    _gw, port = gateway
    path = tmp_path / "routes.yaml"
    extra = free_port()
    path.write_text(
        path.read_text().replace(
            f"listen: tcp:{port}:interface=127.0.0.1",
            f"listen: [tcp:{port}:interface=127.0.0.1, tcp:{extra}:interface=127.0.0.1]",
        )
    )
    out = _reload(path)
    assert out.returncode == 0, out.stdout + out.stderr
    for p in (port, extra):
        code, transcript = swaks_send(p, "x@relay.test")
        assert code == SwaksExit.OK, transcript


def test_gateway_reload_refuses_a_file_that_does_not_check_without_signalling(
    tmp_path: Path, sink: SmtpSink, gateway: tuple[GatewayProcess, int]
) -> None:
    gw, _port = gateway
    path = tmp_path / "routes.yaml"
    path.write_text(path.read_text().replace("to: relay\n", "to: relya\n"))
    mark = gw.log_mark()
    out = _reload(path)
    assert out.returncode == 1
    assert "did you mean 'relay'?" in out.stderr
    assert "the running gateway was not asked to reload" in out.stderr
    time.sleep(0.5)
    assert "reload" not in gw.log_text(since=mark)


def test_sigterm_lets_the_message_in_flight_finish_and_exits_0(
    tmp_path: Path, smtp_sink_factory
) -> None:
    slow = smtp_sink_factory(extra_args=["-W", "data:3"])  # the upstream takes 3 s to answer DATA
    gw, port = start_gateway(tmp_path, slow.port)
    results: list[tuple[int, str]] = []
    t = _send_in_background(port, "x@relay.test", results)
    time.sleep(1.5)  # the message is now waiting for the slow upstream's answer to DATA
    gw.term()
    # New connections are refused at once while the message in flight completes.
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).recv(10)
    t.join(30)
    assert gw.wait(20) == 0
    [(code, transcript)] = results
    assert code == SwaksExit.OK, transcript
    assert data_reply_code(transcript) == 250
    assert len(slow.wait_for(1)) == 1
    assert "gateway stopped" in gw.log_text()


def test_check_command(tmp_path: Path) -> None:
    good = REPO / "routes.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    bad = tmp_path / "routes.yaml"
    bad.write_text(good.read_text().replace("to: smarthost", "to: smarthots"))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "tag_subject.py").write_text(
        (REPO / "plugins" / "tag_subject.py").read_text()
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "smarthots" in text)
    assert (
        f"routes.yaml:{line}:9: route 'relay-partner': unknown destination 'smarthots'; did you mean 'smarthost'?"
        in out.stderr
    )


def test_route_dry_run_sends_nothing(tmp_path: Path) -> None:
    message = b"Subject: plans\nFrom: bob@partner.test\n\nhello\n"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "route",
            "--dry-run",
            "-c",
            str(REPO / "routes.yaml"),
            "--from",
            "bob@partner.test",
            "--to",
            "alice@example.test",
        ],
        input=message,
        capture_output=True,
        timeout=60,
    )
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr
    assert (
        "route 'local-mailbox' matches for alice@example.test; named groups {'user': 'alice'}"
        in text
    )
    assert "transform 'tag_subject' -> 1 message(s)" in text
    assert "=== route 'local-mailbox' -> mailbox" in text
    assert "Subject: [alice] plans" in text
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "route",
            "--dry-run",
            "-c",
            str(REPO / "routes.yaml"),
            "--to",
            "x@nowhere.test",
        ],
        input=message,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert (
        b"<x@nowhere.test>: refused at RCPT: 550 5.1.1 <x@nowhere.test>: Recipient address rejected"
        in out.stdout
    )


def test_schema_command() -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"], capture_output=True, text=True, timeout=60
    )
    schema = json.loads(out.stdout)
    assert schema["title"] == "gateway routes.yaml"
    assert "routes" in schema["properties"]


def test_invalid_config_at_start_exits_1_with_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:2525', max_size: huge}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "routes.yaml:3:54: listener 'in': 'max_size': expected a size" in out.stderr


def test_port_in_use_exits_1(tmp_path: Path, sink: SmtpSink) -> None:
    gw, _ = start_gateway(tmp_path, sink.port)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(tmp_path / "routes.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode == 1
        assert "cannot start" in out.stderr and "Address already in use" in out.stderr
    finally:
        gw.stop()


def test_sigterm_when_idle_exits_0(tmp_path: Path, sink: SmtpSink) -> None:
    gw, port = start_gateway(tmp_path, sink.port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        assert idle.recv(100).startswith(b"220")
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(20) == 0
        data = idle.recv(200)
        assert data == b"" or data.startswith(b"421")


REFUSING_PLUGIN = """
from gateway.plugins import Reject, transform

@transform("refuse")
def refuse(msg, options):
    raise Reject("refused by policy")
"""


REFUSING_ROUTE = """
  - name: refused
    from: mail-in
    match: {rcpt: '@refused\\.test$'}
    transforms: [refuse]
    to: box
"""


def _codes(reply: bytes) -> list[str]:
    text = reply.decode("latin-1")
    return [line[:3] for line in text.splitlines() if line[3:4] == " "]


def test_smuggled_transaction_after_bare_lf_dot_is_content(
    tmp_path: Path,
    sink: SmtpSink,
) -> None:
    """Defect: "\\n.\\n" (and "\\n.\\r\\n") ended the DATA, so a sender whose outbound MTA
    passes bare LFs through could append a second transaction with a forged sender to
    the message (SMTP smuggling). Only CRLF.CRLF may end it (RFC 5321 4.1.1.4)."""
    gw, port = start_gateway(tmp_path, sink.port)
    try:
        reply = sendmail_raw(
            port,
            b"EHLO relay.client.test\r\n"
            b"MAIL FROM:<mallory@client.test>\r\n"
            b"RCPT TO:<alice@local.test>\r\n"
            b"DATA\r\n"
            b"Subject: harmless\r\n\r\nhello\n.\n"
            b"MAIL FROM:<ceo@bank.test>\r\n"
            b"RCPT TO:<bob@local.test>\r\n"
            b"DATA\r\n"
            b"Subject: forged\r\n\r\npay now\n.\r\n"
            b"still the first message\r\n"
            b".\r\n"
            b"QUIT\r\n",
        )
        assert _codes(reply) == ["220", "250", "250", "250", "354", "250", "221"], reply
        [boxed] = wait_maildir(tmp_path, 1)
        assert boxed["Return-Path"] == "<mallory@client.test>"
        assert boxed.get_all("Delivered-To") == ["alice@local.test"]
        body = boxed.get_payload()
        assert isinstance(body, str)
        assert "MAIL FROM:<ceo@bank.test>" in body and "still the first message" in body
        time.sleep(0.5)
        assert len(maildir_messages(tmp_path)) == 1
        assert "bob@local.test" not in gw.log_text()
    finally:
        gw.stop()


def test_a_transform_refusal_is_a_5xx_and_the_session_goes_on(
    tmp_path: Path,
    sink: SmtpSink,
) -> None:
    """A transform's Reject is a permanent refusal in SMTP's words (550 5.7.1 for a
    policy refusal), never a success: nothing was stored. (It once was answered with a
    code the plugin chose, 250 included.)"""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "refusing.py").write_text(REFUSING_PLUGIN)
    gw, port = start_gateway(tmp_path, sink.port, extra_routes=REFUSING_ROUTE)
    try:
        code, transcript = swaks_send(port, "carol@refused.test")
        assert code == SwaksExit.MESSAGE_REJECTED, transcript
        assert data_reply_code(transcript) == 550, transcript
        assert "550 5.7.1 refused by policy" in transcript
        # The session's next message is handled as usual.
        code, transcript = swaks_send(port, "dave@local.test")
        assert code == SwaksExit.OK, transcript
        [boxed] = wait_maildir(tmp_path, 1)
        assert boxed.get_all("Delivered-To") == ["dave@local.test"]
    finally:
        gw.stop()


def test_recipient_probing_is_cut_off_after_max_errors(
    tmp_path: Path,
    sink: SmtpSink,
) -> None:
    """Defect: refused recipients did not count as errors: one connection could try
    recipients without end (directory harvesting). Postfix counts them toward
    smtpd_hard_error_limit (20) and ends the session with 421 4.7.0."""
    gw, port = start_gateway(tmp_path, sink.port)
    try:
        probes = b"".join(b"RCPT TO:<guess%d@elsewhere.test>\r\n" % n for n in range(40))
        reply = sendmail_raw(
            port, b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\n" + probes, until=421
        )
        codes = _codes(reply)
        assert codes == ["220", "250", "250"] + ["550"] * 20 + ["421"], reply
        assert b"421 4.7.0 gw.test Error: too many errors" in reply
    finally:
        gw.stop()


class _Peer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, bad_data_reply: bytes, bad_times: int) -> None:
        self.bad_data_reply = bad_data_reply
        self.bad_left = bad_times
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Session)


class _Session(socketserver.StreamRequestHandler):
    server: _Peer
    timeout = 60

    def handle(self) -> None:
        out = self.wfile
        out.write(b"220 peer.test ESMTP\r\n")
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.write(b"250-peer.test\r\n250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                with self.server.lock:
                    bad = self.server.bad_left > 0
                    self.server.bad_left -= 1
                if bad:
                    out.write(self.server.bad_data_reply)
                    continue
                out.write(b"354 go ahead\r\n")
                body = b""
                while (chunk := self.rfile.readline(65536)) not in (b".\r\n", b""):
                    body += chunk
                with self.server.lock:
                    self.server.bodies.append(body)
                out.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                out.write(b"221 Bye\r\n")
                return
            else:
                out.write(b"502 5.5.2 what\r\n")


@pytest.fixture
def peer_port() -> int:
    return free_port()


def _serve(port: int, reply: bytes, times: int) -> Iterator[_Peer]:
    peer = _Peer(port, reply, times)
    thread = threading.Thread(target=peer.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.shutdown()
        peer.server_close()


def _wait_bodies(peer: _Peer, count: int, timeout: float) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with peer.lock:
            if len(peer.bodies) >= count:
                return list(peer.bodies)
        time.sleep(0.2)
    with peer.lock:
        return list(peer.bodies)


@pytest.mark.parametrize(
    "reply",
    [b"250 2.0.0 Ok\r\n", b"250-2.0.0 fine\r\n550 5.7.1 no\r\n"],
    ids=["data-answered-250", "inconsistent-multiline"],
)
def test_confused_data_reply_is_retried_not_delivered(tmp_path: Path, reply: bytes) -> None:
    """Defect: a 2xx (or mixed-code) reply to DATA made the gateway drop the message as delivered."""
    port = free_port()
    for peer in _serve(port, reply, 1):
        gw, gw_port = start_gateway(tmp_path, port)
        try:
            code, transcript = swaks_send(
                gw_port, "bob@relay.test", headers={"Subject": "confused peer"}
            )
            assert code == 0, transcript
            bodies = _wait_bodies(peer, 1, 30)
            assert len(bodies) == 1, gw.log_text()
            assert b"Subject: confused peer" in bodies[0]
        finally:
            gw.stop()
    with socket.socket() as probe:  # the peer is gone: nothing listens any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0
