"""A scripted news server in memory, and an endpoint that connects NNTP clients to it.

``FakeNewsServer`` keeps articles per group and answers the way INN does; a
``Script`` changes single answers, holds replies back or stays silent.
``MemoryEndpoint`` connects a client to a new one through iosim pumps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from zope.interface import implementer

from gateway.protocols.nntp.codec import (
    StreamReader,
    encode_block,
    parse_command,
)


@dataclass
class Script:
    """How the fake server answers. ``replies`` maps a keyword (or "POST-DONE",
    "IHAVE-DONE", "TAKETHIS-DONE" for the reply after an article) to raw bytes."""

    greeting: bytes = b"200 fake.example InterNetNews server ready (transit mode)\r\n"
    replies: dict[str, bytes] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)  # never answer these
    drop: set[str] = field(default_factory=set)  # close the connection instead
    user: str | None = None  # AUTHINFO needed before anything but MODE/QUIT
    password: str = "secret"
    hold: bool = False  # keep replies until release()
    stream: bool = True  # MODE STREAM allowed
    over: bool = True  # OVER known (else 500)
    xover: bool = True


@dataclass
class StoredArticle:
    msgid: str
    data: bytes


class NewsStore:
    """Articles by group and number, and Message-IDs the server has (for duplicates)."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[int, StoredArticle]] = {}
        self.low: dict[str, int] = {}
        self.next: dict[str, int] = {}
        self.seen: set[str] = set()
        self.received: list[tuple[str, str, bytes]] = []  # (command, msgid, data)

    def add_group(self, name: str, first: int = 1) -> None:
        self.groups.setdefault(name, {})
        self.low.setdefault(name, first)
        self.next.setdefault(name, first)

    def add(self, group: str, msgid: str, body: bytes = b"body\n") -> int:
        self.add_group(group)
        number = self.next[group]
        self.next[group] = number + 1
        data = (
            f"Path: fake!not-for-mail\nFrom: a@example.test\nNewsgroups: {group}\n"
            f"Subject: article {number}\nMessage-ID: {msgid}\n\n"
        ).encode() + body
        self.groups[group][number] = StoredArticle(msgid, data)
        self.seen.add(msgid)
        return number

    def renumber(self, group: str, first: int) -> None:
        """Give the group's articles new numbers from ``first`` (like a re-created group)."""
        old = [self.groups[group][n] for n in sorted(self.groups[group])]
        self.groups[group] = {first + i: a for i, a in enumerate(old)}
        self.low[group] = first
        self.next[group] = first + len(old)


class FakeNewsServer(Protocol):
    def __init__(self, script: Script, store: NewsStore) -> None:
        self.script = script
        self.store = store
        self.reader = StreamReader(max_line_length=2048)
        self.commands: list[str] = []
        self.block_for: tuple[str, str] | None = None  # (command, msgid) awaiting an article
        self.held: list[bytes] = []
        self.group: str | None = None
        self.authed = False
        self.pending_user: str | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.script.greeting)  # type: ignore[union-attr]
        if self.script.greeting[:3] in (b"400", b"502"):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        if self.script.hold:
            self.held.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def release(self) -> None:
        held, self.held = self.held, []
        for data in held:
            self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.reader.receive_data(data)
        while True:
            if self.block_for is not None:
                block = self.reader.read_block()
                if block is None:
                    return
                command, msgid = self.block_for
                self.block_for = None
                self.article_done(command, msgid, block.data)
                continue
            line = self.reader.read_line()
            if line is None:
                return
            self.command(line)

    def command(self, line: bytes) -> None:
        cmd = parse_command(line)
        key = cmd.keyword
        if key == "MODE" and cmd.args:
            key = f"MODE {cmd.args[0].upper()}"
        if key == "AUTHINFO" and cmd.args:
            key = f"AUTHINFO {cmd.args[0].upper()}"
        self.commands.append(" ".join((cmd.keyword, *cmd.args)))
        script = self.script
        if key in script.drop:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if key in script.silent:
            if key == "TAKETHIS":
                self.block_for = ("SILENT", "")
            return
        if key in script.replies and key != "TAKETHIS":
            self.send(script.replies[key])
            if script.replies[key].startswith(b"335"):
                self.block_for = ("IHAVE", cmd.args[0])
            if script.replies[key].startswith(b"340"):
                self.block_for = ("POST", "")
            return
        handler: Callable[[Any], None] = getattr(self, "do_" + key.replace(" ", "_"), self.unknown)
        if (
            script.user is not None
            and not self.authed
            and key not in ("MODE READER", "MODE STREAM", "QUIT")
            and not key.startswith("AUTHINFO")
        ):
            self.send(b"480 Authentication required\r\n")
            if key == "TAKETHIS":
                self.block_for = ("SILENT", "")
            return
        handler(cmd)

    def unknown(self, cmd: Any) -> None:
        self.send(b"500 What?\r\n")

    def do_QUIT(self, cmd: Any) -> None:
        self.send(b"205 Bye!\r\n")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def do_MODE_READER(self, cmd: Any) -> None:
        self.send(b"200 fake.example ready (posting ok)\r\n")

    def do_MODE_STREAM(self, cmd: Any) -> None:
        self.send(b"203 Streaming permitted\r\n" if self.script.stream else b"500 What?\r\n")

    def do_AUTHINFO_USER(self, cmd: Any) -> None:
        self.pending_user = cmd.args[1]
        self.send(b"381 Enter password\r\n")

    def do_AUTHINFO_PASS(self, cmd: Any) -> None:
        password = cmd.rest.split(None, 1)[1] if " " in cmd.rest else ""
        if self.pending_user is None:
            self.send(b"482 Authentication commands issued out of sequence\r\n")
        elif self.pending_user == self.script.user and password == self.script.password:
            self.authed = True
            self.send(b"281 Authentication accepted\r\n")
        else:
            self.send(b"481 Authentication failed\r\n")

    def do_DATE(self, cmd: Any) -> None:
        self.send(b"111 20261125120000\r\n")

    def do_POST(self, cmd: Any) -> None:
        self.send(b"340 Ok, recommended message-ID <x@fake>\r\n")
        self.block_for = ("POST", "")

    def do_IHAVE(self, cmd: Any) -> None:
        msgid = cmd.args[0]
        if msgid in self.store.seen:
            self.send(b"435 Duplicate\r\n")
            return
        self.send(b"335 Send it\r\n")
        self.block_for = ("IHAVE", msgid)

    def do_CHECK(self, cmd: Any) -> None:
        msgid = cmd.args[0]
        if msgid in self.store.seen:
            self.send(f"438 {msgid}\r\n".encode())
        else:
            self.send(f"238 {msgid}\r\n".encode())

    def do_TAKETHIS(self, cmd: Any) -> None:
        self.block_for = ("TAKETHIS", cmd.args[0])

    def article_done(self, command: str, msgid: str, data: bytes) -> None:
        if command == "SILENT":
            return
        self.store.received.append((command, msgid, data))
        override = self.script.replies.get(f"{command}-DONE")
        if override is not None:
            self.send(override)
            return
        if command == "POST":
            for line in data.split(b"\n"):
                if line.lower().startswith(b"message-id:"):
                    msgid = line.split(b":", 1)[1].strip().decode()
            if msgid in self.store.seen:
                self.send(b"441 435 Duplicate\r\n")
                return
            self.store.seen.add(msgid)
            self.send(f"240 Article received {msgid}\r\n".encode())
        elif command == "IHAVE":
            self.store.seen.add(msgid)
            self.send(f"235 {msgid}\r\n".encode())
        else:
            if msgid in self.store.seen:
                self.send(f"439 {msgid} Duplicate\r\n".encode())
                return
            self.store.seen.add(msgid)
            self.send(f"239 {msgid}\r\n".encode())

    def do_GROUP(self, cmd: Any) -> None:
        name = cmd.args[0]
        if name not in self.store.groups:
            self.send(b"411 No such group " + name.encode() + b"\r\n")
            return
        self.group = name
        numbers = sorted(self.store.groups[name])
        low = numbers[0] if numbers else self.store.low[name]
        high = numbers[-1] if numbers else low - 1
        self.send(f"211 {len(numbers)} {low} {high} {name}\r\n".encode())

    def _range(self, spec: str) -> list[int]:
        assert self.group is not None
        first_text, _, last_text = spec.partition("-")
        first = int(first_text)
        last = int(last_text) if last_text else (1 << 62) if "-" in spec else first
        return [n for n in sorted(self.store.groups[self.group]) if first <= n <= last]

    def do_OVER(self, cmd: Any) -> None:
        if not self.script.over:
            self.unknown(cmd)
            return
        self._overview(cmd)

    def do_XOVER(self, cmd: Any) -> None:
        if not self.script.xover:
            self.unknown(cmd)
            return
        self._overview(cmd)

    def _overview(self, cmd: Any) -> None:
        if self.group is None:
            self.send(b"412 No newsgroup selected\r\n")
            return
        numbers = self._range(cmd.args[0])
        if not numbers:
            self.send(b"423 No articles in that range\r\n")
            return
        lines = []
        for n in numbers:
            art = self.store.groups[self.group][n]
            lines.append(f"{n}\tarticle {n}\ta@example.test\tdate\t{art.msgid}\t\t10\t1\n")
        self.send(b"224 Overview information follows\r\n" + encode_block("".join(lines).encode()))

    def _lookup(self, spec: str) -> tuple[int, StoredArticle] | None:
        if self.group is None:
            return None
        art = self.store.groups[self.group].get(int(spec))
        return None if art is None else (int(spec), art)

    def do_ARTICLE(self, cmd: Any) -> None:
        found = self._lookup(cmd.args[0])
        if found is None:
            self.send(b"423 No such article number in this group\r\n")
            return
        number, art = found
        self.send(f"220 {number} {art.msgid}\r\n".encode() + encode_block(art.data))

    def do_STAT(self, cmd: Any) -> None:
        found = self._lookup(cmd.args[0])
        if found is None:
            self.send(b"423 No such article number in this group\r\n")
            return
        number, art = found
        self.send(f"223 {number} {art.msgid}\r\n".encode())


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every client to a fresh FakeNewsServer through an iosim pump."""

    def __init__(self, clock: MemoryReactorClock, script: Script | None = None) -> None:
        self.clock = clock
        self.script = script or Script()
        self.store = NewsStore()
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[FakeNewsServer] = []
        self.connects = 0
        self.refuse = False

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.connects += 1
        if self.refuse:
            return fail(ConnectionRefusedError("Connection refused"))
        client = factory.buildProtocol(None)
        assert client is not None
        server = FakeNewsServer(self.script, self.store)
        self.servers.append(server)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def pump(self) -> None:
        for _ in range(10_000):
            if not any([pump.pump() for pump in self.pumps]):
                return
        raise AssertionError("the conversation never went quiet")

    def release(self) -> None:
        for server in self.servers:
            server.release()
        self.pump()

    @property
    def commands(self) -> list[str]:
        return [c for server in self.servers for c in server.commands]
