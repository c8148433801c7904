#!/usr/bin/env python3
"""The gateway's store-and-forward path in one process: what it costs in CPU per message.

    .venv/bin/python -m bench.pipeline_hotpath [--messages 3000] [--sessions 20]
        [--mode submit|smtp|news] [--size 2048] [--concurrency N] [--delay S] [--profile]

A real ``GatewayService`` starts from a generated configuration, with a real
SQLite spool (WAL, synchronous=FULL, group commit) in a temporary folder and
the destination replaced by one that says "delivered" at once. Messages go in:

* submit: straight into ``GatewayService.submit`` (routing, the spool, the
  delivery bookkeeping; no protocol code);
* smtp: through the SMTP listener's protocol (codec, DATA parsing, the
  listener, submit) over an in-memory transport, ``--sessions`` at a time,
  each sending its next message when the 250 for the last one arrives;
* news: as smtp, on a route with ``mail_to_news`` to an ``nntp`` destination.

With ``--delay`` each delivery takes that long (a news server's round trips) and
the wall rate shows how long a delivery holds one of the destination's
``--concurrency`` slots beyond the peer's own time.

It waits until every message was delivered and its delivery recorded, and
prints the process's CPU time per message (all threads: the spool's writer
thread is part of the cost), the wall time, and the spool's messages per
commit. Log lines are formatted as ``gateway run`` formats them and written to
/dev/null. ``--profile`` prints cProfile's top functions of the reactor thread.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
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

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402

from gateway.cli import start_logging  # noqa: E402
from gateway.message import Kind, MailMessage, Message  # noqa: E402
from gateway.ports import Deliverer, Outcome  # noqa: E402
from gateway.service import GatewayService  # noqa: E402

CONFIG = """\
version: 1
spool: {spool}
listeners:
  bench-in:
    protocol: smtp
    listen: tcp:{port}:interface=127.0.0.1
    hostname: gateway.bench.localdomain
    allow: [127.0.0.0/8]
destinations:
  sink:
    protocol: smtp
    connect: tcp:127.0.0.1:9
    tls: none
    concurrency: {concurrency}
  news:
    protocol: nntp
    connect: tcp:127.0.0.1:9
    mode: ihave
    concurrency: {concurrency}
routes:
  - name: bench
    from: bench-in
    match: {{rcpt: '@bench\\.test$'}}
    to: sink
  - name: bench-news
    from: bench-in
    match: {{rcpt: '@news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: local.bench, gateway: gateway.bench.localdomain}}
    to: news
"""


class InstantDestination(Deliverer):
    """Says "delivered" for every message: at once, or after ``delay`` seconds (a peer's
    round trips, during which the delivery holds one of the destination's slots)."""

    def __init__(self, name: str, kinds: frozenset[Kind], delay: float = 0.0) -> None:
        self.name = name
        self.kinds = kinds
        self.delay = delay
        self.count = 0

    async def deliver(self, message: Message) -> Outcome:
        self.count += 1
        if self.delay:
            from twisted.internet import task

            await task.deferLater(reactor, self.delay, lambda: None)
        return Outcome.delivered("250 ok")

    async def close(self) -> None:
        pass


def body(size: int, n: int) -> bytes:
    head = (
        f"From: Sender <sender@example.org>\n"
        f"To: list@bench.test\n"
        f"Subject: bench message {n}\n"
        f"Message-ID: <bench.{n}.{os.getpid()}@example.org>\n"
        f"Date: Wed, 25 Nov 2026 12:00:00 +0000\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    return head + line * max(1, (size - len(head)) // len(line))


class FakeTransport:
    """An SMTP client's side of a connection, in memory: it sends the next message on 250."""

    def __init__(self, driver: Driver, protocol: Any) -> None:
        self.driver = driver
        self.protocol = protocol
        self.buffer = b""
        self.state = "greeting"

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 25)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # the driver reads every reply at once: the server is never paused

    def unregisterProducer(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.state = "closed"

    abortConnection = loseConnection

    def write(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] == b"-":
                continue  # a continuation line of a multi-line reply
            reactor.callLater(0, self.reply, int(line[:3]), line)

    def reply(self, code: int, line: bytes) -> None:
        if code >= 400:
            raise SystemExit(f"the gateway answered {line!r} in state {self.state}")
        if self.state == "greeting":
            self.state = "ehlo"
            self.protocol.dataReceived(b"EHLO client.example.org\r\n")
        elif self.state in ("ehlo", "data-sent"):
            if self.state == "data-sent":
                self.driver.accepted += 1
            n = self.driver.take()
            if n is None:
                self.state = "quit"
                self.protocol.dataReceived(b"QUIT\r\n")
                return
            self.state = "data-sent"
            # MAIL, RCPT, DATA pipelined, then the message: one write, as smtp-source does.
            self.protocol.dataReceived(self.driver.wire(n))


class Driver:
    def __init__(self, messages: int, size: int, domain: str) -> None:
        self.messages = messages
        self.next = 0
        self.accepted = 0
        self.domain = domain
        # SMTP wire form of the message (CRLF, dot-stuffed: the body has no leading dots).
        self.payload = body(size, 0).replace(b"\n", b"\r\n")

    def take(self) -> int | None:
        if self.next >= self.messages:
            return None
        self.next += 1
        return self.next

    def wire(self, n: int) -> bytes:
        return (
            b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<list@"
            + self.domain.encode()
            + b">\r\nDATA\r\n"
            + self.payload.replace(b"bench.0.", b"bench.%d." % n, 1)
            + b".\r\n"
        )


async def wait_delivered(service: GatewayService, total: int, timeout: float) -> None:
    from twisted.internet import task

    assert service.delivery is not None
    deadline = time.monotonic() + timeout
    while service.delivery.counters.delivered < total:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {service.delivery.counters.delivered} of {total} delivered in {timeout}s"
            )
        await task.deferLater(reactor, 0.005, lambda: None)
    # The last delivered() change has to be recorded too.
    assert service.spool is not None
    while service.spool._jobs.qsize():
        await task.deferLater(reactor, 0.005, lambda: None)


async def one_run(service: GatewayService, args: argparse.Namespace, base: int) -> float:
    """Feed args.messages messages; return the CPU seconds they took."""
    assert service.delivery is not None
    delivered_before = service.delivery.counters.delivered
    start_cpu = time.process_time()
    if args.mode == "submit":
        template = body(args.size, 0)
        count = iter(range(args.messages))

        async def session() -> None:
            for n in count:
                data = template.replace(b"bench.0.", b"bench.%d." % (base + n), 1)
                message = MailMessage.from_bytes(
                    data,
                    sender="sender@example.org",
                    recipients=("list@bench.test",),
                    listener="bench-in",
                    client="127.0.0.1",
                )
                verdict = await service.submit(message)
                if not verdict.ok:
                    raise SystemExit(f"submit refused: {verdict}")

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(session()) for _ in range(args.sessions)]
        )
    else:
        factory = service.listeners["bench-in"].listener.factory()  # type: ignore[attr-defined]
        domain = "news.test" if args.mode == "news" else "bench.test"
        driver = Driver(args.messages, args.size, domain)
        driver.next = base
        driver.messages = base + args.messages
        for _ in range(args.sessions):
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(FakeTransport(driver, protocol))
        while driver.accepted < args.messages:
            from twisted.internet import task

            await task.deferLater(reactor, 0.005, lambda: None)
    await wait_delivered(service, delivered_before + args.messages, 120)
    return time.process_time() - start_cpu


async def run(args: argparse.Namespace, folder: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = folder / "routes.yaml"
    concurrency = args.concurrency or args.sessions
    config.write_text(CONFIG.format(spool=folder / "spool", port=port, concurrency=concurrency))
    service = GatewayService(config, reactor)
    await service.start()
    runtime = service.current()
    for name, dest in list(runtime.destinations.items()):
        runtime.destinations[name] = InstantDestination(name, dest.kinds, args.delay)  # type: ignore[assignment]
    gc.collect()
    gc.freeze()
    assert service.spool is not None
    base = 0
    await one_run(service, argparse.Namespace(**{**vars(args), "messages": 200}), base)  # warm up
    base += 200
    results = []
    for _ in range(args.repeat):
        commits, writes = service.spool.commits, service.spool.writes
        wall = time.monotonic()
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        cpu = await one_run(service, args, base)
        if profiler:
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(out.getvalue())
        wall = time.monotonic() - wall
        base += args.messages
        per_commit = (service.spool.writes - writes) / max(1, service.spool.commits - commits)
        results.append((cpu, wall, per_commit))
        print(
            f"{args.mode}: {1e3 * cpu / args.messages:.3f} ms CPU/message,"
            f" {args.messages / wall:.0f} msg/s wall, {per_commit:.1f} writes/commit",
            flush=True,
        )
    best = min(r[0] for r in results)
    print(f"best: {1e3 * best / args.messages:.3f} ms CPU per message ({args.mode})")
    await service.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--mode", choices=("submit", "smtp", "news"), default="smtp")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=0, help="of the destination (--sessions)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each delivery takes")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    start_logging("info", open(os.devnull, "w"), "text")  # noqa: SIM115
    status = 0
    with tempfile.TemporaryDirectory(prefix="pipeline-hotpath-") as tmp:

        def go() -> None:
            d = defer.Deferred.fromCoroutine(run(args, Path(tmp)))

            def failed(f: Any) -> None:
                nonlocal status
                status = 1
                print(f.getTraceback(), file=sys.stderr)

            d.addErrback(failed)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(go)
        reactor.run()
    return status


if __name__ == "__main__":
    sys.exit(main())
