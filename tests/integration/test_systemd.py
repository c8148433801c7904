"""The gateway under systemd's protocols, without systemd as PID 1.

sd_notify goes to an AF_UNIX datagram socket the test binds ($NOTIFY_SOCKET),
the watchdog interval comes from $WATCHDOG_USEC, sockets are passed by
``systemd-socket-activate`` (as systemd passes them: LISTEN_FDS), and the
journal is a log file named by $JOURNAL_STREAM.  Also: /metrics after real
traffic, /readyz while stopping and while the spool refuses, and the log formats.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.peers import (
    LOOPBACK,
    GatewayProcess,
    Unbound,
    dig,
    free_port,
    free_udp_tcp_port,
    pid_listens_on,
    port_accepts,
    require_binary,
    swaks_send,
    wait_for_port_closed,
)


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def lines(datagram: str) -> list[str]:
    return datagram.split("\n")


class NotifySocket:
    """$NOTIFY_SOCKET for a child process: an abstract AF_UNIX datagram socket that a
    thread reads, keeping each datagram with the monotonic time it arrived.

    ``on_datagram`` runs on that thread as each one arrives, before it is kept.
    """

    def __init__(self, on_datagram: Callable[[str], None] | None = None) -> None:
        name = f"gateway-test-{uuid.uuid4().hex}"
        self.address = "@" + name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.sock.settimeout(0.05)
        self.on_datagram = on_datagram
        self.got: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            text = data.decode()
            arrived = time.monotonic()
            if self.on_datagram is not None:
                self.on_datagram(text)  # before wait_for() can see it
            with self._lock:
                self.got.append((arrived, text))

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.address, **extra}

    def datagrams(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.got)

    def count(self) -> int:
        with self._lock:
            return len(self.got)

    def times_of(self, line: str, since: int = 0) -> list[float]:
        return [t for t, text in self.datagrams()[since:] if line in lines(text)]

    def wait_for(self, line: str, since: int = 0, timeout: float = 15.0) -> int:
        """The index of the first datagram from ``since`` on with ``line`` as one of its lines."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.datagrams()
            for index in range(since, len(got)):
                if line in lines(got[index][1]):
                    return index
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {line!r} from the gateway in {timeout}s; got {got[since:]}")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def smtp_config(tmp_path: Path, smtp: int, admin: int, extra: str = "") -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{name: mailbox, from: mail-in, match: {{rcpt: '@example\\.test$'}}, to: box}}
{extra}"""
    )
    return path


# --------------------------------------------------------------------------- sd_notify


def test_ready_watchdog_reload_and_stop_are_told_to_systemd(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(tmp_path, smtp, admin)
    at_ready: list[tuple[bool, int]] = []

    def on_datagram(text: str) -> None:
        # At the moment systemd hears READY=1, clients must already get through.
        if "READY=1" in lines(text):
            at_ready.append((port_accepts(LOOPBACK, smtp), fetch(admin, "/readyz")[0]))

    with (
        NotifySocket(on_datagram) as notify,
        GatewayProcess(path, env=notify.env(WATCHDOG_USEC="1000000")) as gw,
    ):
        gw.start([smtp, admin])
        ready = notify.wait_for("READY=1")
        assert lines(notify.datagrams()[ready][1])[1].startswith(
            "STATUS=1 listener(s), 1 destination(s), 1 route(s);"
        )
        assert at_ready == [(True, 200)]

        # Watchdog pings every WATCHDOG_USEC/2 = 0.5 s.
        time.sleep(3.0)
        pings = notify.times_of("WATCHDOG=1", since=ready)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 5, pings
        assert 0.4 <= statistics.median(gaps) <= 0.65, gaps
        assert max(gaps) < 1.2, gaps

        # A reload: RELOADING=1 (with the time, for Type=notify-reload), then READY=1.
        mark = notify.count()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        gw.hup()
        reloading = notify.wait_for("RELOADING=1", since=mark)
        assert notify.wait_for("READY=1", since=reloading + 1) > reloading
        usec = [x for x in lines(notify.datagrams()[reloading][1]) if x.startswith("MONOTONIC")]
        assert len(usec) == 1 and 0 <= int(usec[0].split("=")[1]) - before < 10_000_000
        assert "READY=1" not in [x for _, t in notify.datagrams()[mark:reloading] for x in lines(t)]

        # A reload of a broken file: the old routes stay, and the status says so.
        path.write_text(path.read_text().replace("to: box", "to: bxo"))
        mark = notify.count()
        gw.hup()
        reloading = notify.wait_for("RELOADING=1", since=mark)
        done = notify.wait_for("READY=1", since=reloading + 1)
        assert "the last reload failed" in notify.datagrams()[done][1]
        assert fetch(admin, "/readyz")[1].startswith("ready\n")

        mark = notify.count()
        gw.term()
        assert gw.wait(15) == 0
        stopping = notify.wait_for("STOPPING=1", since=mark, timeout=2)
        assert "STATUS=stopping: finishing the work in flight" in lines(
            notify.datagrams()[stopping][1]
        )
    assert len(at_ready) == 3, at_ready
    assert all(x == (True, 200) for x in at_ready), at_ready


def test_no_ready_when_a_listener_cannot_open(tmp_path: Path) -> None:
    first, second, admin = free_port(), free_port(), free_port()
    path = smtp_config(tmp_path, first, admin)
    text = path.read_text().replace(
        "listeners:\n",
        f'listeners:\n  later: {{protocol: smtp, listen: "tcp:{second}:interface=127.0.0.1"}}\n',
    )
    path.write_text(text.replace("from: mail-in", "from: [mail-in, later]"))
    with (
        socket.socket() as taken,
        NotifySocket() as notify,
        GatewayProcess(path, env=notify.env()) as gw,
    ):
        taken.bind((LOOPBACK, second))
        taken.listen()
        gw.start([])
        assert gw.wait(15) == 1
        notify.wait_for("STOPPING=1", timeout=2)
        said = [x for _, t in notify.datagrams() for x in lines(t)]
    assert "READY=1" not in said, said
    statuses = [x for x in said if x.startswith("STATUS=")]
    # The reason stays the status while it stops, so systemctl status shows it.
    assert statuses[-1].startswith("STATUS=cannot start:") and str(second) in statuses[-1], said


BLOCKING_PLUGIN = """
import time

from gateway.message import Kind
from gateway.plugins import transform


@transform("block_the_loop", accepts=[Kind.MAIL])
def block_the_loop(msg, options):
    time.sleep(2.5)  # on the reactor thread, as a careless plugin would
    return msg
"""


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    """The pings come from the reactor: a plugin that blocks it silences them, so systemd's
    watchdog would restart the gateway; a ping thread would have kept it alive."""
    smtp, admin = free_port(), free_port()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "blocker.py").write_text(BLOCKING_PLUGIN)
    path = smtp_config(tmp_path, smtp, admin)
    path.write_text(
        path.read_text()
        .replace("version: 1\n", "version: 1\nplugins: [plugins]\n")
        .replace("to: box}", "transforms: [block_the_loop], to: box}")
    )
    with (
        NotifySocket() as notify,
        GatewayProcess(path, env=notify.env(WATCHDOG_USEC="1000000")) as gw,
    ):
        gw.start([smtp, admin])
        ready = notify.wait_for("READY=1")
        time.sleep(1.5)
        status, transcript = swaks_send(smtp, "alice@example.test", timeout=20)
        assert status == 0, transcript
        time.sleep(1.5)
        pings = notify.times_of("WATCHDOG=1", since=ready)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    long = [g for g in gaps if g > 1.5]
    assert len(long) == 1 and long[0] >= 2.3, gaps  # the 2.5 s the loop was blocked
    at = gaps.index(long[0])
    assert at >= 2 and len(gaps) - at >= 3, gaps  # pinging before and after
    assert statistics.median(gaps) < 0.7, gaps


# --------------------------------------------------------------------------- /readyz


def test_readyz_is_503_while_shutting_down(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    with socket.socket() as blackhole:
        # An SMTP server that takes the connection and never says a word: the
        # delivery in progress holds the shutdown for shutdown_timeout.
        blackhole.bind((LOOPBACK, 0))
        blackhole.listen()
        relay = blackhole.getsockname()[1]
        path = smtp_config(
            tmp_path,
            smtp,
            admin,
            "  - {name: relay, from: mail-in, match: {rcpt: '@relay\\.test$'}, to: relay}\n",
        )
        path.write_text(
            path.read_text()
            .replace("version: 1\n", "version: 1\nshutdown_timeout: 4s\n")
            .replace(
                "destinations:\n",
                f"destinations:\n  relay: {{protocol: smtp, connect: tcp:127.0.0.1:{relay}}}\n",
            )
        )
        with NotifySocket() as notify, GatewayProcess(path, env=notify.env()) as gw:
            gw.start([smtp, admin])
            assert swaks_send(smtp, "bob@relay.test")[0] == 0
            assert select.select([blackhole], [], [], 10)[0], "the delivery never connected"
            held, _ = blackhole.accept()
            with held:
                assert fetch(admin, "/readyz")[1].startswith("ready\n")
                stopped_at = time.monotonic()
                gw.term()
                deadline = time.monotonic() + 3
                while fetch(admin, "/readyz")[0] == 200:
                    assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
                    time.sleep(0.02)
                code, text = fetch(admin, "/readyz")
                assert code == 503 and text.startswith("not ready: shutting down"), text
                assert fetch(admin, "/healthz") == (200, "ok\n")
                wait_for_port_closed(LOOPBACK, smtp, 3)
                notify.wait_for("STOPPING=1", timeout=2)
                assert gw.is_running()
                assert gw.wait(15) == 0
            assert time.monotonic() - stopped_at >= 3  # it did wait for the delivery


def _chattr(flag: str, files: list[str]) -> None:
    done = subprocess.run(["chattr", flag, *files], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"chattr {flag} failed on the spool's files ({done.stderr.strip()}); this test"
            " needs root and a file system with the immutable flag (ext4, xfs, btrfs).",
            pytrace=False,
        )


def test_readyz_is_503_while_the_spool_refuses_messages(disk_tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(disk_tmp_path, smtp, admin)
    with GatewayProcess(path) as gw:
        gw.start([smtp, admin])
        assert swaks_send(smtp, "alice@example.test")[0] == 0
        deadline = time.monotonic() + 10
        while metric(scrape(admin), "gateway_deliveries_total", destination="box") != 1:
            assert time.monotonic() < deadline, "the first message was never delivered"
            time.sleep(0.05)
        # Immutable spool files: SQLite cannot write (root ignores chmod, not this).
        # Not the -shm file: SQLite maps it, and writing a mapped page of an immutable
        # file kills the process with SIGBUS.
        files = [
            str(p)
            for p in (disk_tmp_path / "var" / "spool").iterdir()
            if not p.name.endswith("-shm")
        ]
        _chattr("+i", files)
        try:
            status, transcript = swaks_send(smtp, "alice@example.test")
            assert status != 0 and "<** 452 4.3.1" in transcript, transcript
            code, text = fetch(admin, "/readyz")
            assert code == 503 and "the spool refused a message" in text, text
            samples = scrape(admin)
            assert metric(samples, "gateway_spool_refusals_total") == 1
            assert metric(samples, "gateway_ready") == 0
            labels = {"listener": "mail-in", "outcome": "tempfail"}
            assert metric(samples, "gateway_listener_messages_total", **labels) == 1
        finally:
            _chattr("-i", files)
        # The next message that fits makes it ready at once.
        assert swaks_send(smtp, "alice@example.test")[0] == 0
        assert fetch(admin, "/readyz")[1].startswith("ready\n")


# --------------------------------------------------------------------------- socket activation


# systemd-socket-activate passes on only PATH, TERM, HOME and USER, and what -E names.
ACTIVATION_ENV = ["-E", "PYTHONPATH", "-E", "PYTHONUNBUFFERED", "-E", "NOTIFY_SOCKET"]


def test_socket_activation_smtp_takes_the_connection_made_before_it_ran(tmp_path: Path) -> None:
    activate = require_binary("systemd-socket-activate")
    port, admin = free_port(), free_port()
    path = smtp_config(tmp_path, port, admin)
    path.write_text(
        path.read_text().replace(
            f'"tcp:{port}:interface=127.0.0.1"', "systemd:domain=INET:name=smtp"
        )
    )
    with NotifySocket() as notify:
        argv = [
            activate, "-l", f"{LOOPBACK}:{port}", "--fdname=smtp", *ACTIVATION_ENV,
            "--", sys.executable, "-m", "gateway", "run", "-c", str(path),
        ]  # fmt: skip
        with GatewayProcess(path, argv=argv, env=notify.env()) as gw:
            gw.start([])  # systemd-socket-activate starts the gateway at the first connection
            gw.wait_for_log(f"Listening on {LOOPBACK}:{port} as 3.")
            with socket.create_connection((LOOPBACK, port), timeout=15) as early:
                assert notify.count() == 0  # the gateway is not running yet
                assert early.recv(512).startswith(b"220 "), "no greeting on the early connection"
                early.sendall(b"QUIT\r\n")
            notify.wait_for("READY=1")
            status, transcript = swaks_send(port, "alice@example.test")
            assert status == 0, transcript
            # The gateway (systemd-socket-activate exec'd it: same pid) holds the socket.
            assert pid_listens_on(gw.pid, port)
            gw.wait_for_log("accepting on systemd:domain=INET:name=smtp")
            assert fetch(admin, "/readyz")[1].startswith("ready\n")
            # A reload that reopens the listener's sockets takes the passed one again.
            other = free_port()
            listen = f'["systemd:domain=INET:name=smtp", "tcp:{other}:interface=127.0.0.1"]'
            path.write_text(path.read_text().replace("systemd:domain=INET:name=smtp", listen))
            mark = gw.log_mark()
            gw.hup()
            log = gw.wait_for_log("configuration reloaded", since=mark)
            assert "failed to open" not in log, log
            for each in (port, other):
                status, transcript = swaks_send(each, "alice@example.test")
                assert status == 0, transcript
            assert pid_listens_on(gw.pid, port)
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 3


def test_socket_activation_dns_over_udp_and_tcp(tmp_path: Path, unbound: Unbound) -> None:
    """The first query, over UDP, starts the gateway and is answered: nothing is lost while
    it starts. Two activators nest as systemd's sockets would: UDP number 0, TCP number 1."""
    activate = require_binary("systemd-socket-activate")
    port = free_udp_tcp_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:systemd:name=dns-udp", "systemd:domain=INET:index=1"]
destinations:
  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"], timeout: 2s}}
routes:
  - {{name: fwd, from: dns-in, to: inside}}
"""
    )
    with NotifySocket() as notify:
        argv = [
            activate, "--datagram", "-l", f"{LOOPBACK}:{port}", "--fdname=dns-udp", *ACTIVATION_ENV,
            "--", activate, "-l", f"{LOOPBACK}:{port}", "--fdname=dns-udp:dns-tcp", *ACTIVATION_ENV,
            "--", sys.executable, "-m", "gateway", "run", "-c", str(path),
        ]  # fmt: skip
        with GatewayProcess(path, argv=argv, env=notify.env()) as gw:
            gw.start([])
            gw.wait_for_log(f"Listening on {LOOPBACK}:{port} as 3.")
            # dig waits while the gateway starts: 15 s for its answer.
            query = ["-p", str(port), "www.example.test", "+short", "+time=15"]
            out = dig(f"@{LOOPBACK}", *query, timeout=25)
            assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr + gw.log_text()
            notify.wait_for("READY=1")
            out = dig(f"@{LOOPBACK}", "-p", str(port), "www.example.test", "+tcp", "+short")
            assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr
            log = gw.wait_for_log("accepting on udp:systemd:name=dns-udp")
            assert "accepting on systemd:domain=INET:index=1" in log
            assert pid_listens_on(gw.pid, port)


def test_a_missing_systemd_socket_is_a_clear_error(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(tmp_path, smtp, admin)
    path.write_text(
        path.read_text().replace(f'"tcp:{smtp}:interface=127.0.0.1"', "systemd:domain=INET:index=0")
    )
    gw = GatewayProcess(path)
    gw.start([])
    assert gw.wait(15) == 1
    log = gw.log_text()
    assert "error: cannot start: systemd:domain=INET:index=0: there is no inherited socket" in log
    assert "Traceback" not in log


# --------------------------------------------------------------------------- /metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(admin: int) -> Samples:
    code, text = fetch(admin, "/metrics")
    assert code == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    if "outcome" not in labels and name in ("gateway_deliveries_total",):
        labels["outcome"] = "delivered"
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_real_traffic(tmp_path: Path, unbound: Unbound) -> None:
    smtp, admin, dns_port, closed = free_port(), free_port(), free_udp_tcp_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
  dns-in:
    protocol: dns
    listen: ["udp:{dns_port}:interface=127.0.0.1", "tcp:{dns_port}:interface=127.0.0.1"]
destinations:
  box: {{protocol: maildir, path: mail}}
  down: {{protocol: smtp, connect: "tcp:127.0.0.1:{closed}", retry_min: 1h}}
  expired: {{protocol: smtp, connect: "tcp:127.0.0.1:{closed}", max_age: 1ms}}
  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"], timeout: 2s}}
routes:
  - {{name: mailbox, from: mail-in, match: {{rcpt: '@example\\.test$'}}, to: box}}
  - {{name: to-down, from: mail-in, match: {{rcpt: '@down\\.test$'}}, to: down}}
  - {{name: to-expired, from: mail-in, match: {{rcpt: '@expired\\.test$'}}, to: expired}}
  - {{name: block, from: dns-in, match: {{qname: blocked.test}}, action: refuse}}
  - {{name: fwd, from: dns-in, to: inside}}
"""
    )
    with GatewayProcess(path) as gw:
        gw.start([smtp, admin, dns_port])
        for _ in range(3):
            assert swaks_send(smtp, "alice@example.test")[0] == 0
        status, transcript = swaks_send(smtp, "nobody@elsewhere.test")
        assert status != 0 and "<** 550 5.1.1" in transcript, transcript
        assert swaks_send(smtp, "carol@down.test")[0] == 0
        assert swaks_send(smtp, "dave@expired.test")[0] == 0
        for _ in range(3):
            out = dig(f"@{LOOPBACK}", "-p", str(dns_port), "www.example.test", "+short")
            assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr
        out = dig(f"@{LOOPBACK}", "-p", str(dns_port), "blocked.test")
        assert "status: REFUSED" in out.stdout, out.stdout
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        path.write_text(path.read_text().replace("to: box", "to: bxo"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("reload refused", since=mark)
        with socket.create_connection((LOOPBACK, smtp), timeout=5) as idle:
            assert idle.recv(512).startswith(b"220 ")
            deadline = time.monotonic() + 10
            while True:
                samples = scrape(admin)
                settled = (
                    metric(samples, "gateway_deliveries_total", destination="box") == 3
                    and metric(samples, "gateway_dead_letters_total") == 1
                    and metric(samples, "gateway_delivery_retries_total") == 1
                )
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    def m(name: str, **labels: str) -> float | None:
        return metric(samples, name, **labels)

    mail_in = {"listener": "mail-in"}
    assert m("gateway_listener_messages_total", **mail_in, outcome="accepted") == 5
    assert m("gateway_listener_messages_total", **mail_in, outcome="rejected") == 0
    assert m("gateway_listener_messages_total", **mail_in, outcome="tempfail") == 0
    assert m("gateway_listener_recipients_refused_total", **mail_in) == 1
    assert m("gateway_listener_message_duration_seconds_count", **mail_in) == 5
    assert m("gateway_listener_open_connections", **mail_in) == 1
    assert m("gateway_route_messages_total", route="mailbox", outcome="queued") == 3
    assert m("gateway_route_messages_total", route="to-down", outcome="queued") == 1
    assert m("gateway_deliveries_total", destination="box", outcome="delivered") == 3
    assert m("gateway_deliveries_total", destination="down", outcome="temporary") == 1
    assert m("gateway_deliveries_total", destination="expired", outcome="temporary") == 1
    assert m("gateway_delivery_duration_seconds_count", destination="box") == 3
    assert m("gateway_delivery_retries_total") == 1
    assert m("gateway_dead_letters_total") == 1
    assert m("gateway_spool_queued") == 1  # the one waiting for "down"
    assert m("gateway_spool_dead") == 1
    age = m("gateway_spool_oldest_age_seconds")
    assert age is not None and 0 < age < 60
    dns_in = {"listener": "dns-in"}
    assert m("gateway_listener_requests_total", **dns_in) == 4
    assert m("gateway_dns_queries_total", **dns_in, route="fwd", outcome="forwarded") == 1
    assert m("gateway_dns_queries_total", **dns_in, route="fwd", outcome="cache") == 2
    assert m("gateway_dns_queries_total", **dns_in, route="block", outcome="refused") == 1
    assert m("gateway_dns_queries_total", **dns_in, route="", outcome="unrouted") == 0
    assert m("gateway_dns_cache_hits_total", **dns_in, route="fwd") == 2
    assert m("gateway_dns_cache_misses_total", **dns_in, route="fwd") == 1
    assert m("gateway_dns_cache_entries", **dns_in, route="fwd") == 1
    assert m("gateway_dns_upstream_queries_total", destination="inside", outcome="answered") == 1
    assert m("gateway_dns_upstream_duration_seconds_count", destination="inside") == 1
    assert m("gateway_listener_open_connections", **dns_in) == 0
    assert m("gateway_reloads_total", outcome="ok") == 1
    assert m("gateway_reloads_total", outcome="failed") == 1
    assert m("gateway_ready") == 1
    assert m("gateway_spool_refusals_total") == 0
    memory = m("process_resident_memory_bytes")
    assert memory is not None and memory > 0
    assert unbound.query_count() == 1


# --------------------------------------------------------------------------- logs

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")


def test_json_log_lines(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(tmp_path, smtp, admin)
    argv = [sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-format", "json"]
    with GatewayProcess(path, argv=argv) as gw:
        gw.start([smtp, admin])
        headers = {"Message-Id": "<json-1@client.test>"}
        assert swaks_send(smtp, "alice@example.test", headers=headers)[0] == 0
        gw.wait_for_log("outcome=delivered")
    records = [json.loads(line) for line in gw.log_text().splitlines()]
    for record in records:
        assert {"time", "level", "namespace", "message"} <= record.keys(), record
        datetime.datetime.fromisoformat(record["time"])
    queued = [r for r in records if "outcome=queued" in r["message"]]
    assert len(queued) == 1, records
    assert queued[0]["level"] == "info"
    assert queued[0]["namespace"] == "gateway.service"
    assert queued[0]["route"] == "mailbox"
    assert queued[0]["msgid"] == "<json-1@client.test>"
    assert queued[0]["id"]
    delivered = [r for r in records if "outcome=delivered" in r["message"]]
    assert delivered[0]["destination"] == "box" and delivered[0]["id"]


def test_journal_log_lines_under_systemd(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(tmp_path, smtp, admin)
    log_path = tmp_path / "gateway.log"
    log_path.touch()
    st = log_path.stat()
    # systemd names the journal connection it gives as stderr; here the log file is it.
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with GatewayProcess(path, env=env, log_path=log_path) as gw:
        gw.start([smtp, admin])
        gw.wait_for_log("gateway ready")
        path.write_text(path.read_text().replace("to: box", "to: bxo"))
        gw.hup()
        gw.wait_for_log("reload refused")
        gw.term()
        assert gw.wait(15) == 0
    text = gw.log_text()
    for line in text.splitlines():
        assert re.match(r"<[2-7]>", line), line
        assert not TIMESTAMP.search(line), line
    assert "<6>gateway.service: gateway ready: 1 listener(s)" in text
    assert re.search(r"^<3>gateway\.service: reload refused", text, re.M), text


def test_text_log_lines_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = smtp_config(tmp_path, smtp, admin)
    # JOURNAL_STREAM inherited, but stderr goes elsewhere: not the journal.
    env = {**os.environ, "JOURNAL_STREAM": "1:1"}
    with GatewayProcess(path, env=env) as gw:
        gw.start([smtp, admin])
        text = gw.wait_for_log("gateway ready")
    ready = [line for line in text.splitlines() if "gateway ready" in line]
    assert ready and TIMESTAMP.match(ready[0]) and " info  gateway.service: " in ready[0]


# --------------------------------------------------------------------------- the unit files

UNITS = Path(__file__).resolve().parents[2] / "systemd"


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Path]:
    """Copies of the units whose gateway is this checkout's venv.

    ``systemd-analyze verify`` checks that each Exec program exists, and
    /opt/gateway/bin/gateway (where the README installs it) does not exist here;
    so the copies name the gateway next to this Python instead, and nothing else
    changes.
    """
    here = Path(sys.executable).parent / "gateway"
    assert here.exists(), f"no gateway script at {here}; pip install -e . first"
    folder = tmp_path / "units"
    folder.mkdir()
    for name in ("gateway.service", "gateway.socket"):
        text = (UNITS / name).read_text()
        (folder / name).write_text(text.replace("/opt/gateway/bin/gateway", str(here)))
    yield folder


def test_units_verify(units: Path) -> None:
    analyze = require_binary("systemd-analyze")
    service = (UNITS / "gateway.service").read_text()
    assert "ExecStart=/opt/gateway/bin/gateway run -c /etc/gateway/routes.yaml" in service
    assert "ExecStartPre=/opt/gateway/bin/gateway check -c /etc/gateway/routes.yaml" in service
    done = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            str(units / "gateway.service"),
            str(units / "gateway.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misspelt settings are only warned about (exit 0): any output fails.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done


def test_service_unit_security_exposure_is_at_most_2(units: Path) -> None:
    analyze = require_binary("systemd-analyze")
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(units / "gateway.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for gateway\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout


def test_example_config_for_etc_checks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(UNITS / "routes.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (UNITS / "routes.yaml").read_text()
    # Under ProtectSystem=strict the gateway writes only in its StateDirectory=.
    assert "spool: /var/lib/gateway/spool" in text
    for line in text.splitlines():
        if line.strip().startswith("path:"):
            assert line.split("path:")[1].strip().startswith("/var/lib/gateway/"), line
