"""The direct NNTP load of bench/nntp.py: the same articles posted straight to a news server.

One process, one thread, non-blocking sockets under ``selectors``: each of the
``--connections`` connections carries one article at a time, the way the
gateway's ``nntp`` destination does in the same mode:

* ``post``: ``MODE READER`` once, then per article ``POST`` (340), the article (240);
* ``ihave``: per article ``IHAVE <id>`` (335), the article (235);
* ``stream``: ``MODE STREAM`` once, then per article ``CHECK <id>`` (238) and
  ``TAKETHIS <id>`` with the article (239).

It builds everything it can before the start (one header template, one
dot-stuffed body), prints ``ready``, waits for a line on stdin, and only then
connects, so the parent's clock and this program's start-up do not mix. At
the end it prints one JSON line: articles sent and accepted, the replies that
were not success, its wall and CPU seconds. Exit status 0 when every article
was accepted, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time
from email.utils import formatdate

LOOPBACK = "127.0.0.1"
LINE_LIMIT = 4096  # a reply line longer than this is an error, not something to keep reading


class Failure(Exception):
    """The connection cannot go on; the text says why."""


def body_bytes(size: int) -> bytes:
    """`size` octets of 79-character lines of X, as CRLF text (no line starts with a dot)."""
    lines = []
    left = max(1, size)
    while left > 0:
        n = min(79, max(1, left - 2))
        lines.append(b"X" * n + b"\r\n")
        left -= n + 2
    return b"".join(lines)


def header_template(group: str, gateway: str, sender: str) -> str:
    """The header the gateway's mail_to_news gives a smtp-source mail, with {mid} and {date}."""
    return (
        f"From: <{sender}>\r\n"
        f"To: <{group}@news.test>\r\n"
        "Date: {date}\r\n"
        "Message-ID: {mid}\r\n"
        "Subject: bench article\r\n"
        f"Newsgroups: {group}\r\n"
        f"Path: {gateway}!not-for-mail\r\n"
        f"Sender: mail-to-news@{gateway}\r\n"
        f"X-Gateway-Loop: {gateway}\r\n"
        "\r\n"
    )


class Conn:
    """One NNTP connection's state: what it waits for and what it sends next."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.index = index
        self.inbuf = b""
        self.outbuf = b""
        self.state = "greeting"
        self.mid = ""
        self.article = b""
        self.done = False


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode: str = args.mode
        self.template = header_template(args.group, args.gateway, args.sender)
        self.body = body_bytes(args.size) + b".\r\n"
        self.next_article = 0
        self.accepted = 0
        self.offered = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []
        self.errors: list[str] = []
        self.sel = selectors.DefaultSelector()
        self.open = 0

    # ---------------------------------------------------------------- articles

    def take(self) -> tuple[str, bytes] | None:
        if self.next_article >= self.args.articles:
            return None
        n = self.next_article
        self.next_article += 1
        mid = f"<{n}.{self.args.tag}@direct.bench.test>"
        head = self.template.format(mid=mid, date=formatdate(usegmt=True)).encode()
        return mid, head + self.body

    # ---------------------------------------------------------------- protocol

    def send(self, conn: Conn, data: bytes) -> None:
        conn.outbuf += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                raise Failure(f"send failed: {exc}") from None
            conn.outbuf = conn.outbuf[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self.sel.modify(conn.sock, events, conn)

    def refuse(self, conn: Conn, line: str) -> None:
        self.refused[line[:3]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{conn.mid}: {line}")

    def next_offer(self, conn: Conn) -> None:
        item = self.take()
        if item is None:
            conn.state = "quit"
            self.send(conn, b"QUIT\r\n")
            return
        conn.mid, conn.article = item
        self.offered += 1
        if self.mode == "post":
            conn.state = "post"
            self.send(conn, b"POST\r\n")
        elif self.mode == "ihave":
            conn.state = "ihave"
            self.send(conn, f"IHAVE {conn.mid}\r\n".encode())
        else:
            conn.state = "check"
            self.send(conn, f"CHECK {conn.mid}\r\n".encode())

    def on_line(self, conn: Conn, line: str) -> None:
        code = line[:3]
        state = conn.state
        if state == "greeting":
            if code not in ("200", "201"):
                raise Failure(f"greeting {line!r}")
            if self.mode == "post":
                conn.state = "mode"
                self.send(conn, b"MODE READER\r\n")
            elif self.mode == "stream":
                conn.state = "mode"
                self.send(conn, b"MODE STREAM\r\n")
            else:
                self.next_offer(conn)
        elif state == "mode":
            if code not in ("200", "201", "203"):
                raise Failure(f"MODE {'READER' if self.mode == 'post' else 'STREAM'}: {line!r}")
            self.next_offer(conn)
        elif state in ("post", "ihave"):
            if code in ("340", "335"):
                conn.state = "article"
                self.send(conn, conn.article)
            else:
                self.refuse(conn, line)
                self.next_offer(conn)
        elif state == "check":
            if code == "238":
                conn.state = "article"
                self.send(conn, f"TAKETHIS {conn.mid}\r\n".encode() + conn.article)
            else:
                self.refuse(conn, line)
                self.next_offer(conn)
        elif state == "article":
            if code in ("240", "235", "239"):
                self.accepted += 1
            else:
                self.refuse(conn, line)
            self.next_offer(conn)
        elif state == "quit":
            self.close(conn)
        else:  # pragma: no cover - every state is handled above
            raise Failure(f"unexpected reply {line!r} in state {state}")

    # ---------------------------------------------------------------- sockets

    def connect(self, index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex((LOOPBACK, self.args.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise Failure(f"connect to {LOOPBACK}:{self.args.port}: {os.strerror(err)}")
        conn = Conn(sock, index)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.open += 1

    def close(self, conn: Conn) -> None:
        if conn.done:
            return
        conn.done = True
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self.open -= 1

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            raise Failure(f"receive failed: {exc}") from None
        if not data:
            if conn.state == "quit":
                self.close(conn)
                return
            raise Failure(f"the server closed the connection (waiting for {conn.state})")
        conn.inbuf += data
        while not conn.done:
            line, sep, rest = conn.inbuf.partition(b"\r\n")
            if not sep:
                if len(conn.inbuf) > LINE_LIMIT:
                    raise Failure(f"reply line longer than {LINE_LIMIT} octets")
                return
            conn.inbuf = rest
            self.on_line(conn, line.decode("utf-8", "replace"))

    def run(self, deadline: float) -> None:
        for i in range(self.args.connections):
            self.connect(i)
        while self.open:
            if time.monotonic() > deadline:
                raise Failure(f"not finished within {self.args.timeout:.0f} s")
            for key, events in self.sel.select(timeout=1.0):
                conn: Conn = key.data
                if conn.done:
                    continue
                try:
                    if events & selectors.EVENT_WRITE:
                        self.flush(conn)
                    if events & selectors.EVENT_READ:
                        self.on_readable(conn)
                except Failure as exc:
                    self.errors.append(f"connection {conn.index}: {exc}")
                    self.close(conn)
                    if len(self.errors) >= self.args.connections:
                        return


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("post", "ihave", "stream"), required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--articles", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="body octets")
    p.add_argument("--group", required=True)
    p.add_argument("--tag", required=True, help="makes this run's Message-IDs unique")
    p.add_argument("--gateway", default="gateway.bench.localdomain")
    p.add_argument("--sender", default="load@client.bench.test")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if min(args.connections, args.articles, args.size) < 1:
        p.error("--connections, --articles and --size must be at least 1")
    client = Client(args)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 2  # the parent went away before the start
    cpu0, t0 = cpu_seconds(), time.monotonic()
    try:
        client.run(t0 + args.timeout)
    except Failure as exc:
        client.errors.append(str(exc))
    except OSError as exc:
        client.errors.append(f"{type(exc).__name__}: {exc}")
    wall = time.monotonic() - t0
    report = {
        "offered": client.offered,
        "accepted": client.accepted,
        "refused": dict(client.refused),
        "examples": client.examples,
        "errors": client.errors[:5],
        "seconds": wall,
        "cpu_seconds": cpu_seconds() - cpu0,
    }
    print(json.dumps(report), flush=True)
    return 0 if client.accepted == args.articles and not client.errors else 1


if __name__ == "__main__":
    sys.exit(main())
