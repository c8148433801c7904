"""sd_notify, the watchdog and sockets passed by systemd, against real AF_UNIX sockets."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.systemd import ListenFDs

from gateway import systemd
from gateway.config import ConfigError, Endpoint, default_spool, parse, systemd_endpoint_args
from gateway.systemd import (
    Notifier,
    SocketActivationError,
    inherited_datagram_socket,
    inherited_stream_socket,
    notify,
    watchdog_interval,
)


def receive(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, without blocking."""
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace, as $NOTIFY_SOCKET spells it ('@...')."""
    name = f"gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield "@" + name, sock


def test_notify_sends_one_datagram_to_a_socket_path() -> None:
    # A short folder: AF_UNIX paths must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            assert notify("READY=1\nSTATUS=all good", {"NOTIFY_SOCKET": path})
            assert receive(sock) == ["READY=1\nSTATUS=all good"]


def test_notify_to_an_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    assert notify("STOPPING=1", {"NOTIFY_SOCKET": address})
    assert receive(sock) == ["STOPPING=1"]


def test_notify_reads_the_process_environment(
    abstract_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify("WATCHDOG=1")
    assert receive(sock) == ["WATCHDOG=1"]


def test_nothing_is_sent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def no_socket(*args: object, **kwargs: object) -> None:
        raise AssertionError("notify() opened a socket without $NOTIFY_SOCKET")

    monkeypatch.setattr(systemd.socket, "socket", no_socket)
    assert notify("READY=1") is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    notifier = Notifier(Clock(), lambda: "status", environ={"WATCHDOG_USEC": "1000000"})
    notifier.start()
    notifier.on_state("ready")
    assert notifier.send("READY=1") is False


def test_notify_to_a_socket_nobody_listens_on_is_false_not_an_error() -> None:
    address = f"@gateway-test-{uuid.uuid4().hex}"
    assert notify("READY=1", {"NOTIFY_SOCKET": address}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}) is False


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": mine}) == 2.5
    # Meant for another process: not ours to ping.
    other = str(os.getpid() + 1)
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": other}) is None
    for bad in ("", "0", "-5", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert watchdog_interval({}) is None


def test_notifier_pings_at_half_the_watchdog_interval_on_the_reactor(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    clock = Clock()
    status = ["starting"]
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    notifier = Notifier(clock, lambda: status[0], environ=env)
    notifier.start()
    assert receive(sock) == ["WATCHDOG=1\nSTATUS=starting"]
    clock.advance(0.9)
    assert receive(sock) == []
    clock.advance(0.1)
    assert receive(sock) == ["WATCHDOG=1"]  # the status did not change: not repeated
    status[0] = "1 listener(s)"
    clock.advance(1.0)
    assert receive(sock) == ["WATCHDOG=1\nSTATUS=1 listener(s)"]
    for _ in range(3):
        clock.advance(1.0)
    assert receive(sock) == ["WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]
    # A loop that was blocked does not make up for the pings it missed: one, late.
    clock.advance(5.0)
    assert receive(sock) == ["WATCHDOG=1"]
    notifier.stop()
    clock.advance(5.0)
    assert receive(sock) == []


def test_notifier_states(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = Notifier(Clock(), lambda: "2 listener(s)", environ={"NOTIFY_SOCKET": address})
    notifier.on_state("ready")
    assert receive(sock) == ["READY=1\nSTATUS=2 listener(s)"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.on_state("reloading")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [reloading] = receive(sock)
    lines = reloading.split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=")[1]) <= after
    assert lines[2] == "STATUS=reloading the configuration"
    notifier.on_state("stopping")
    assert receive(sock) == ["STOPPING=1\nSTATUS=2 listener(s)"]
    # A failed start-up: its reason stays the status while the gateway stops.
    notifier.failed("port 25 is taken")
    notifier.on_state("stopping")
    assert receive(sock) == [
        "STATUS=cannot start: port 25 is taken",
        "STOPPING=1\nSTATUS=cannot start: port 25 is taken",
    ]


def test_notifier_without_watchdog_only_refreshes_the_status(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    clock = Clock()
    status = ["a"]
    notifier = Notifier(clock, lambda: status[0], environ={"NOTIFY_SOCKET": address})
    notifier.start()
    clock.advance(notifier.status_interval)
    assert receive(sock) == ["STATUS=a"]
    clock.advance(notifier.status_interval)
    assert receive(sock) == []
    status[0] = "b"
    clock.advance(notifier.status_interval)
    assert receive(sock) == ["STATUS=b"]


# --- sockets passed by systemd -----------------------------------------------------------


@pytest.fixture
def passed() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """A TCP listening socket, a UDP and a UDP6 socket, as systemd would pass them."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", 0))
    with tcp, udp, udp6:
        yield tcp, udp, udp6


def test_udp_socket_by_index_and_by_name(
    passed: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    tcp, udp, udp6 = passed
    fds = ListenFDs([tcp.fileno(), udp.fileno(), udp6.fileno()], ("dns", "dns", "dns6"))
    assert inherited_datagram_socket("udp:systemd:index=1", 1, None, fds=fds) == (
        udp.fileno(),
        socket.AF_INET,
    )
    assert inherited_datagram_socket("udp:systemd:index=2", 2, None, fds=fds) == (
        udp6.fileno(),
        socket.AF_INET6,
    )
    # One .socket unit names all its sockets alike: the UDP one of them is meant.
    assert inherited_datagram_socket("udp:systemd:name=dns", None, "dns", fds=fds) == (
        udp.fileno(),
        socket.AF_INET,
    )
    assert inherited_datagram_socket("x", None, "dns6", "INET6", fds=fds)[0] == udp6.fileno()


def test_udp_socket_errors_say_what_systemd_passed(
    passed: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    tcp, udp, _ = passed
    fds = ListenFDs([tcp.fileno(), udp.fileno()], ("smtp", "dns"))
    with pytest.raises(SocketActivationError, match=r"is not a UDP socket.*ListenDatagram="):
        inherited_datagram_socket("udp:systemd:index=0", 0, None, fds=fds)
    with pytest.raises(SocketActivationError, match=r"no inherited socket number 2.*smtp:dns"):
        inherited_datagram_socket("udp:systemd:index=2", 2, None, fds=fds)
    with pytest.raises(SocketActivationError, match=r"named 'dsn'.*passed 2, named smtp:dns"):
        inherited_datagram_socket("udp:systemd:name=dsn", None, "dsn", fds=fds)
    with pytest.raises(SocketActivationError, match="an INET socket, not INET6"):
        inherited_datagram_socket("udp:systemd:domain=INET6:index=1", 1, None, "INET6", fds=fds)
    with pytest.raises(SocketActivationError, match="passed no sockets"):
        inherited_datagram_socket("udp:systemd:index=0", 0, None, fds=ListenFDs([], ()))


def test_stream_socket_check(passed: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    tcp, udp, _ = passed
    fds = ListenFDs([tcp.fileno(), udp.fileno()], ("smtp", "dns"))
    assert inherited_stream_socket("systemd:domain=INET:index=0", 0, None, fds=fds) == tcp.fileno()
    by_name = inherited_stream_socket("systemd:domain=INET:name=smtp", None, "smtp", fds=fds)
    assert by_name == tcp.fileno()
    # One .socket unit names all its sockets alike: the stream one of them is meant.
    alike = ListenFDs([tcp.fileno(), udp.fileno()], ("dns", "dns"))
    assert inherited_stream_socket("x", None, "dns", fds=alike) == tcp.fileno()
    with pytest.raises(SocketActivationError, match=r"not a stream socket.*udp:systemd:index=N"):
        inherited_stream_socket("systemd:domain=INET:index=1", 1, None, fds=fds)
    with pytest.raises(SocketActivationError, match=r"passed no sockets.*socket unit"):
        inherited_stream_socket("systemd:domain=INET:index=0", 0, None, fds=ListenFDs([], ()))


def test_systemd_endpoint_syntax() -> None:
    assert systemd_endpoint_args("systemd:domain=INET6:index=0") == ("INET6", 0, None)
    assert systemd_endpoint_args("systemd:domain=INET:name=smtp") == ("INET", None, "smtp")
    assert systemd_endpoint_args("udp:systemd:index=3") == (None, 3, None)
    assert systemd_endpoint_args("udp:systemd:name=dns") == (None, None, "dns")
    assert systemd_endpoint_args("udp:systemd:domain=INET6:index=1") == ("INET6", 1, None)
    assert Endpoint.parse("udp:systemd:index=1").is_udp
    assert not Endpoint.parse("systemd:domain=INET:index=0").is_udp
    for bad, why in [
        ("systemd:index=0", "domain=INET or INET6 or UNIX"),
        ("systemd:domain=INET", "one of index= and name="),
        ("systemd:domain=INET:index=0:name=x", "one of index= and name="),
        ("udp:systemd:", "one of index= and name="),
        ("udp:systemd:index=one", "counting from 0"),
        ("udp:systemd:domain=UNIX:index=0", "domain=INET or INET6"),
        ("udp:systemd:port=53", "expected udp:systemd:index=N or udp:systemd:name=NAME"),
    ]:
        with pytest.raises(ValueError, match=why):
            Endpoint.parse(bad)


def test_a_wrong_systemd_endpoint_is_a_config_problem_with_its_place(tmp_path: Path) -> None:
    text = """version: 1
listeners:
  dns-in: {protocol: dns, listen: ["udp:systemd:idx=1"]}
"""
    with pytest.raises(ConfigError) as caught:
        parse(text, "routes.yaml", tmp_path)
    assert "routes.yaml:3" in str(caught.value)
    assert "udp:systemd:index=N" in str(caught.value)


# --- the spool under StateDirectory= ------------------------------------------------------


def test_spool_defaults_to_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 1\n"
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert str(parse(text, "routes.yaml", tmp_path).spool) == str(tmp_path / "var" / "spool")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/gateway")
    assert str(parse(text, "routes.yaml", tmp_path).spool) == "/var/lib/gateway/spool"
    # StateDirectory= with several folders: the first.
    assert default_spool(tmp_path, {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path(
        "/var/lib/a/spool"
    )
    assert default_spool(tmp_path, {"STATE_DIRECTORY": ""}) == tmp_path / "var" / "spool"
    # A spool the file names wins.
    named = parse("version: 1\nspool: /srv/spool\n", "routes.yaml", tmp_path)
    assert str(named.spool) == "/srv/spool"


def test_systemd_stream_endpoint_adopts_a_non_blocking_copy(
    passed: tuple[socket.socket, socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twisted needs the socket non-blocking (systemd-socket-activate passes blocking ones)
    and closes what it adopts: the gateway keeps the original, so a reload can adopt it again."""
    tcp, udp, _ = passed
    tcp.setblocking(True)
    fds = ListenFDs([udp.fileno(), tcp.fileno()], ("gateway", "gateway"))
    monkeypatch.setattr(systemd, "inherited_fds", lambda: fds)
    reactor = MemoryReactor()
    first = systemd.server_endpoint(reactor, "systemd:domain=INET:name=gateway")
    again = systemd.server_endpoint(reactor, "systemd:domain=INET:index=1")
    assert isinstance(first, AdoptedStreamServerEndpoint)
    assert not os.get_blocking(tcp.fileno())
    for endpoint in (first, again):
        assert endpoint.fileno != tcp.fileno()
        assert os.fstat(endpoint.fileno).st_ino == os.fstat(tcp.fileno()).st_ino
        assert endpoint.addressFamily == socket.AF_INET
        os.close(endpoint.fileno)
    with pytest.raises(SocketActivationError, match="not a stream socket"):
        systemd.server_endpoint(reactor, "systemd:domain=INET:index=0")
    plain = systemd.server_endpoint(reactor, "tcp:0:interface=127.0.0.1")
    assert not isinstance(plain, AdoptedStreamServerEndpoint)
