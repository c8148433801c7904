"""The peer fixtures work against the real programs (smtp-sink, smtp-source, swaks)."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests import peers
from tests.conftest import GatewayFactory, SmtpSinkFactory
from tests.peers import (
    LOOPBACK,
    SmtpSink,
    SwaksExit,
    data_reply_code,
    free_port,
    port_accepts,
    rcpt_reply_codes,
    require_binary,
    sendmail_raw,
    smtp_exchanges,
    smtp_source,
    swaks_send,
    wait_for_port,
)


def test_swaks_to_sink_delivers_one_message(smtp_sink: SmtpSink) -> None:
    status, transcript = swaks_send(
        smtp_sink.port,
        ["first@b.test", "second@b.test"],
        sender="me@a.test",
        headers={"Subject": "smoke test", "X-Probe": "42"},
        body="line one\n.starts with a dot\nlast line",
    )
    assert status == SwaksExit.OK, transcript
    assert rcpt_reply_codes(transcript) == [250, 250]
    assert data_reply_code(transcript) == 250

    [message] = smtp_sink.wait_for(1)
    assert message.sender == "me@a.test"
    assert message.recipients == ["first@b.test", "second@b.test"]
    assert message.helo == "client.test"
    assert message.client_addr == LOOPBACK
    assert message.headers["Subject"] == "smoke test"
    assert message.headers["X-Probe"] == "42"
    assert message.headers["To"] == "first@b.test,second@b.test"
    # Dot-unstuffed, LF line ends; swaks ends the body with an empty line.
    assert message.body.startswith(b"line one\n.starts with a dot\nlast line\n")
    assert b"\r" not in message.raw
    assert message.raw.startswith(b"Date: ")
    assert not message.raw.startswith(b"Received:")
    assert message.raw.endswith(message.body)


def test_raw_data_arrives_exactly(smtp_sink: SmtpSink) -> None:
    data = b"Subject: exact\r\nX-A: 1\r\n\r\n..two dots\r\nend\r\n.\r\n"
    status, transcript = swaks_send(smtp_sink.port, "to@b.test", data=data, data_fixup=False)
    assert status == SwaksExit.OK, transcript
    [message] = smtp_sink.wait_for(1)
    assert message.raw == b"Subject: exact\nX-A: 1\n\n.two dots\nend\n"
    assert message.body == b".two dots\nend\n"


def test_smtp_source_messages_are_separate(smtp_sink: SmtpSink) -> None:
    started = time.monotonic()
    result = smtp_source(smtp_sink.port, sessions=4, messages=50, size=1024)
    assert result.returncode == 0, result.stdout + result.stderr
    messages = smtp_sink.wait_for(50)
    assert time.monotonic() - started < 10
    assert len(messages) == 50
    assert len({m.path.name for m in messages}) == 50
    assert len({m.headers["Message-Id"] for m in messages}) == 50
    for message in messages:
        assert message.sender == "from@a.test"
        assert message.recipients == ["to@b.test"]
        assert len(message.body) >= 1024 - 80


def test_rejecting_rcpt(smtp_sink_factory: SmtpSinkFactory) -> None:
    hard = smtp_sink_factory(hard_reject=["rcpt"], hard_reply="550 5.1.1 no such user")
    status, transcript = swaks_send(hard.port, "nobody@b.test")
    assert status == SwaksExit.RCPT_REJECTED, transcript
    assert rcpt_reply_codes(transcript) == [550]

    soft = smtp_sink_factory(soft_reject=["rcpt"])
    status, transcript = swaks_send(soft.port, "later@b.test")
    assert status == SwaksExit.RCPT_REJECTED, transcript
    assert rcpt_reply_codes(transcript) == [450]

    time.sleep(0.2)
    assert hard.captured() == []
    assert soft.captured() == []


def test_rejecting_data_and_end_of_data(smtp_sink_factory: SmtpSinkFactory) -> None:
    data_refused = smtp_sink_factory(soft_reject=["data"])
    status, transcript = swaks_send(data_refused.port, "to@b.test")
    assert status == SwaksExit.DATA_REJECTED, transcript
    assert data_reply_code(transcript) == 450

    dot_refused = smtp_sink_factory(hard_reject=["."], hard_reply="554 5.7.1 go away")
    status, transcript = swaks_send(dot_refused.port, "to@b.test", headers={"Subject": "x"})
    assert status == SwaksExit.MESSAGE_REJECTED, transcript
    assert data_reply_code(transcript) == 554
    assert [x.code for x in smtp_exchanges(transcript) if x.command == "."] == [554]
    # smtp-sink keeps the file of a refused message; messages() must not count it.
    deadline = time.monotonic() + 5
    while not dot_refused.captured() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [m.headers["Subject"] for m in dot_refused.captured()] == ["x"]
    assert dot_refused.messages() == []
    assert data_refused.captured() == []


def test_close_421_on_mail(smtp_sink_factory: SmtpSinkFactory) -> None:
    sink = smtp_sink_factory(close_421=["mail"])
    status, transcript = swaks_send(sink.port, "to@b.test")
    assert status == SwaksExit.MAIL_REJECTED, transcript
    assert [x.code for x in smtp_exchanges(transcript) if x.verb == "MAIL"] == [421]


def test_sendmail_raw_talks_smtp(smtp_sink: SmtpSink) -> None:
    replies = sendmail_raw(
        smtp_sink.port,
        b"HELO raw.test\r\nBOGUS command\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n",
        until=354,
    )
    assert replies.startswith(b"220 sink.localdomain")
    assert b"\r\n500 5.5.1 Error: unknown command\r\n" in replies
    assert replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    replies = sendmail_raw(smtp_sink.port, b"QUIT\r\n")
    assert replies.endswith(b"221 Bye\r\n")


def test_sink_stop_closes_port(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    assert port_accepts(LOOPBACK, sink.port)
    pid = sink.proc.pid if sink.proc else 0
    sink.stop()
    assert not port_accepts(LOOPBACK, sink.port)
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


def test_sink_retries_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        sink = SmtpSink(tmp_path / "sink")
        sink.port = taken.getsockname()[1]  # as if free_port raced with someone
        with sink:
            assert sink.port != taken.getsockname()[1]
            assert sendmail_raw(sink.port, b"QUIT\r\n").endswith(b"221 Bye\r\n")


def test_require_binary_fails_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_binary("smtp-sink") == "/usr/sbin/smtp-sink"
    monkeypatch.setitem(peers.DEBIAN_PACKAGES, "no-such-innd", "inn2")
    with pytest.raises(pytest.fail.Exception, match="Debian package 'inn2'"):
        require_binary("no-such-innd")


def test_gateway_process_with_stand_in(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    port = free_port()
    stand_in = [sys.executable, "-m", "http.server", "--bind", LOOPBACK, str(port)]
    gateway = gateway_factory("{}\n", argv=stand_in)
    assert gateway.cwd == tmp_path
    gateway.start(wait_port=[port], timeout=15)
    wait_for_port(LOOPBACK, port, timeout=1)
    assert gateway.is_running()

    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(b"GET /gateway.yaml HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200"), answer[:200]  # served from cwd
    gateway.wait_for_log('"GET /gateway.yaml HTTP/1.0" 200', timeout=5)

    gateway.term()
    assert gateway.wait(timeout=10) == -signal.SIGTERM
    assert not port_accepts(LOOPBACK, port)


def test_gateway_process_reports_early_exit(gateway_factory: GatewayFactory) -> None:
    crash = [sys.executable, "-c", "import sys; print('config is broken'); sys.exit(3)"]
    gateway = gateway_factory("{}\n", argv=crash)
    with pytest.raises(RuntimeError, match=r"(?s)status 3.*config is broken"):
        gateway.start(wait_port=free_port(), timeout=10)


def test_gateway_process_stop_kills_a_stubborn_child(gateway_factory: GatewayFactory) -> None:
    port = free_port()
    stubborn = [
        sys.executable,
        "-c",
        "import signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"s = socket.create_server(('{LOOPBACK}', {port}))\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(60)\n",
    ]
    gateway = gateway_factory(argv=stubborn)
    gateway.start(wait_port=port)
    gateway.wait_for_log("ignoring SIGTERM")
    gateway.hup()  # default action of SIGHUP: the process ends
    assert gateway.wait(timeout=5) == -signal.SIGHUP

    gateway.start(wait_port=port)
    started = time.monotonic()
    assert gateway.stop(timeout=1) == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_message_in_progress_is_not_listed(smtp_sink: SmtpSink) -> None:
    with socket.create_connection((LOOPBACK, smtp_sink.port), timeout=5) as conn:
        conn.sendall(b"HELO slow.test\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
        received = b""
        while b"354 " not in received:
            received += conn.recv(4096)
        conn.sendall(b"Subject: half\r\n\r\nfirst half\r\n")
        time.sleep(0.2)
        # smtp-sink has the capture file open and partly written by now.
        assert len(list(smtp_sink.dump_dir.iterdir())) == 1
        assert smtp_sink.messages() == []
        conn.sendall(b"second half\r\n.\r\n")
        [message] = smtp_sink.wait_for(1)
        assert message.body == b"first half\nsecond half\n"
        assert message.helo == "slow.test"
        assert message.client_proto == "SMTP"


def test_stopping_mid_transaction_leaves_no_message(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    with socket.create_connection((LOOPBACK, sink.port), timeout=5) as conn:
        conn.sendall(b"HELO x.test\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
        received = b""
        while b"354 " not in received:
            received += conn.recv(4096)
        conn.sendall(b"Subject: cut\r\n\r\nnever finished\r\n")
        time.sleep(0.2)
        sink.stop()
    assert len(list(sink.dump_dir.iterdir())) == 1  # the partial file stays on disk
    assert sink.messages() == []
