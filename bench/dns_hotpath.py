#!/usr/bin/env python3
"""The gateway's DNS forwarding path in memory: no sockets, no reactor loop, only its Python.

    .venv/bin/python bench/dns_hotpath.py [--queries 200000] [--routes 0] [--cache] [--profile]

A query goes into the listener's UDP protocol, the upstream client "sends" it
to a fake socket, the answer unbound would give comes back into the client's
socket, and the listener's answer lands in a fake transport. What is timed is
everything the gateway's code and Twisted's Deferreds cost per query, without
the system calls and the wake-ups that bench/dns_forwarding.py also measures; the figure
moves far less with other programs on the machine, so it is the one to watch
while changing the hot path (it is the process's CPU time, so time spent waiting for the
CPU while other programs run is left out). ``--profile`` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository on the path instead of this folder, whose scripts must not hide packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

import dns.message  # noqa: E402
import dns.rrset  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from bench.dns_forwarding import NAMES, gateway_config, records  # noqa: E402
from gateway.config import parse  # noqa: E402
from gateway.destination import build_destination  # noqa: E402
from gateway.plugins import Transforms  # noqa: E402
from gateway.protocols.dns.listener import DnsListener  # noqa: E402
from gateway.protocols.dns.server import DnsUdpProtocol  # noqa: E402
from gateway.service import Runtime  # noqa: E402
from tests.support.port import FakePort as GatewayPortFake  # noqa: E402

CLIENT = ("127.0.0.1", 40000)
UPSTREAM = ("127.0.0.1", 5301)


class FakePort:
    """What reactor.listenUDP returns, keeping the last datagram written."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.sent: list[tuple[bytes, Any]] = []
        self.socket = self  # for code that writes to the socket directly

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    sendto = write

    def stopListening(self) -> None:
        pass


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakePort:
        fake = FakePort(protocol)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake


def answers() -> dict[bytes, bytes]:
    """Query (ID 0) -> unbound's answer (ID 0) for every name of bench/dns_forwarding.py's zone."""
    out = {}
    for record in records():
        name = record.split()[0]
        query = dns.message.make_query(name, "A", use_edns=False)
        query.id = 0
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", record.split()[-1]))
        out[query.to_wire()] = response.to_wire()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=200_000)
    p.add_argument("--routes", type=int, default=0, help="suffix routes before the catch-all")
    p.add_argument("--cache", action="store_true", help="cache on: after the first pass, hits")
    p.add_argument("--repeat", type=int, default=5, help="timed passes; the fastest is shown")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    p.add_argument(
        "--no-freeze", action="store_true", help="no gc.freeze() after start-up, as `run` does"
    )
    args = p.parse_args()

    config = parse(gateway_config(5353, UPSTREAM[1], cache=args.cache, routes=args.routes))
    reactor = FakeReactor()
    destinations: dict[str, Any] = {
        name: build_destination(dest, reactor) for name, dest in config.destinations.items()
    }
    runtime = Runtime(config, Transforms(), destinations)
    listener = DnsListener(config.listeners["dns-in"], GatewayPortFake(runtime, reactor=reactor))
    server = DnsUdpProtocol(listener)
    client_port = FakePort(server)
    server.makeConnection(client_port)
    table = answers()
    queries = [
        query[:0] + bytes([i >> 8 & 0xFF, i & 0xFF]) + query[2:] for i, query in enumerate(table)
    ]
    responses = list(table.values())
    assert len(queries) == NAMES

    def one_pass(count: int) -> None:
        ports = reactor.ports
        receive = server.datagramReceived
        for i in range(count):
            index = i % NAMES
            receive(queries[index], CLIENT)
            reactor.advance(0)  # the upstream query leaves at the end of the reactor's turn
            for port in ports:
                if port.sent:
                    data, addr = port.sent.pop()
                    port.protocol.datagramReceived(data[:2] + responses[index][2:], addr)
            if not client_port.sent:
                raise SystemExit(f"query {i} got no answer")
            client_port.sent.pop()
            if index % 100 == 0:
                reactor.advance(0.01)  # 10,000 queries a second: timers run as they would

    one_pass(2 * NAMES)  # warm up: memo tables, sockets, the cache
    if not args.no_freeze:
        gc.collect()
        gc.freeze()  # as `gateway run` does once it has started
    what = "cache hits" if args.cache else "forwarded queries"
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        one_pass(args.queries)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    times = []
    for _ in range(args.repeat):
        gc.collect()
        start = time.process_time()
        one_pass(args.queries)
        times.append(1e6 * (time.process_time() - start) / args.queries)
    times.sort()
    print(
        f"{times[0]:.2f} us CPU per query, fastest of {args.repeat} passes"
        f" (median {times[len(times) // 2]:.2f};"
        f" {what}, {args.routes} extra routes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
