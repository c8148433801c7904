#!/usr/bin/env python3
"""The gateway's HTTP reverse-proxy path in memory: no sockets, no reactor loop, only its Python.

    .venv/bin/python bench/http_hotpath.py [--requests 100000] [--routes 0] [--profile]

A request as wrk sends it goes into the listener's server protocol, the http
destination writes the upstream request to a fake transport of a kept-alive
upstream connection, the response nginx would give (1 KiB body) comes back
into that connection, and the client's answer lands in a fake transport.
What is timed is everything the gateway's code and Twisted's protocol
wrappers cost per request, without the system calls and the wake-ups that
bench/http_proxy.py also measures; the figure moves far less with other programs on
the machine (it is the process's CPU time), so it is the one to watch while
changing the hot path.  ``--profile`` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository on the path instead of this folder, whose scripts must not hide packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock  # noqa: E402

from bench.http_proxy import gateway_config  # noqa: E402
from gateway.config import parse  # noqa: E402
from gateway.destination import build_destination  # noqa: E402
from gateway.plugins import Transforms  # noqa: E402
from gateway.protocols.http.listener import HttpSockets  # noqa: E402
from gateway.service import Runtime  # noqa: E402
from tests.support.port import FakePort as GatewayPortFake  # noqa: E402

PORT = 8080
UPSTREAM = 8081
CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
# What wrk sends, and what the nginx origin of bench/http_proxy.py answers for its 1 KiB file.
REQUEST = b"GET /file HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % PORT
BODY = b"x" * 1024
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Wed, 25 Nov 2026 18:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6925f000-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)


class FakeTransport:
    """The little of a TCP transport the gateway uses; what is written is kept in a list."""

    def __init__(self, peer: IPv4Address) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.connected = True
        self.disconnecting = False
        self.producer: Any = None
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.written.extend(seq)

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", PORT)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection


def build(routes: int) -> tuple[Any, FakeTransport, Any, FakeTransport, MemoryReactorClock]:
    """The listener's connection from wrk and the destination's kept-alive upstream connection."""
    reactor = MemoryReactorClock()
    text = gateway_config(Path(tempfile.gettempdir()), PORT, UPSTREAM, routes)
    config = parse(text)
    destinations: dict[str, Any] = {
        name: build_destination(dest, reactor) for name, dest in config.destinations.items()
    }
    runtime = Runtime(config, Transforms(), destinations)
    sockets = HttpSockets(
        config.listeners["web"], GatewayPortFake(runtime, reactor=reactor), reactor
    )
    server = sockets.factory().buildProtocol(CLIENT)
    client_side = FakeTransport(CLIENT)
    server.makeConnection(client_side)
    # The first request makes the destination connect: complete that connection by hand.
    server.dataReceived(REQUEST)
    host, port, factory, _timeout, _bind = reactor.tcpClients[-1]
    address = IPv4Address("TCP", host, port)
    upstream = factory.buildProtocol(address)  # Twisted's endpoint wrapper, as in real runs
    upstream_side = FakeTransport(address)
    upstream.makeConnection(upstream_side)
    sent = b"".join(upstream_side.written)
    if not sent.startswith(b"GET /file HTTP/1.1\r\n"):
        raise SystemExit(f"unexpected upstream request {sent[:200]!r}")
    upstream_side.written.clear()
    upstream.dataReceived(RESPONSE)
    answer = b"".join(client_side.written)
    if not (answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + BODY)):
        raise SystemExit(f"unexpected answer {answer[:300]!r}")
    client_side.written.clear()
    return server, client_side, upstream, upstream_side, reactor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--routes", type=int, default=0, help="routes before the catch-all")
    p.add_argument("--repeat", type=int, default=5, help="timed passes; the fastest is shown")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    p.add_argument(
        "--no-freeze", action="store_true", help="no gc.freeze() after start-up, as `run` does"
    )
    args = p.parse_args()

    server, client_side, upstream, upstream_side, reactor = build(args.routes)
    expected = len(RESPONSE) + 200  # a loose check: the answer has the head and the body

    def one_pass(count: int) -> None:
        receive = server.dataReceived
        answer = upstream.dataReceived
        to_upstream = upstream_side.written
        to_client = client_side.written
        for i in range(count):
            receive(REQUEST)
            if not to_upstream:
                raise SystemExit(f"request {i} was not forwarded")
            to_upstream.clear()
            answer(RESPONSE)
            if not to_client or sum(map(len, to_client)) > expected:
                raise SystemExit(f"request {i} got no proper answer: {to_client!r:.300}")
            to_client.clear()
            if i % 100 == 0:
                reactor.advance(0.005)  # 20,000 requests a second: the sweepers run as they would

    one_pass(2000)  # warm up
    if not args.no_freeze:
        gc.collect()
        gc.freeze()  # as `gateway run` does once it has started
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        one_pass(args.requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    times = []
    for _ in range(args.repeat):
        gc.collect()
        start = time.process_time()
        one_pass(args.requests)
        times.append(1e6 * (time.process_time() - start) / args.requests)
    times.sort()
    print(
        f"{times[0]:.2f} us CPU per proxied request, fastest of {args.repeat} passes"
        f" (median {times[len(times) // 2]:.2f}; {args.routes} extra routes,"
        f" gc.freeze {'off' if args.no_freeze else 'on'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
