"""Twisted NNTP client: sessions with a news server, and a bounded pool of them for delivery.

``open_session`` connects, reads the greeting, switches mode (MODE READER or
MODE STREAM) and authenticates (AUTHINFO USER/PASS, RFC 4643); the session's
methods send one command each and return the server's reply, block included.
``NntpClientPool`` keeps up to ``max_connections`` sessions to one server for
the ``nntp`` destination: POST, IHAVE, or CHECK and TAKETHIS pipelined on a
shared session (RFC 4644).  A failed connection attempt makes the pool wait
(doubling, capped) before the next one, so a server that is down is not
hammered by every queued article.

Replies are returned, never judged here; a reply that never comes (connection
lost, timeout, garbage, a ``400`` goodbye) raises ``NntpSessionError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._client_pool import Slots, connect_failure
from .codec import (
    NntpError,
    StreamReader,
    encode_block,
    format_command,
    is_message_id,
    parse_capabilities,
    parse_response,
    response_has_block,
)

__all__ = [
    "MAX_REPLY_SIZE",
    "NntpClientPool",
    "NntpSession",
    "NntpSessionError",
    "Reply",
    "describe_endpoint",
    "open_session",
]

log = Logger(namespace="gateway.nntp.client")

# Response lines are short (RFC 3977: 512 octets); some servers put long texts in them.
_MAX_RESPONSE_LINE = 4096
# The largest multi-line block taken in one reply (an article, an OVER batch); a
# server that sends more, or never ends its block, loses the session.
MAX_REPLY_SIZE = 64 * 1024 * 1024
# Replies nobody asked for that are kept (the greeting, a "400" goodbye); more is garbage.
_MAX_UNSOLICITED = 2
# RFC 4644 responses that start with the message-id they answer.
_STREAMING_CODES = frozenset({238, 239, 431, 438, 439})


@dataclass(frozen=True, slots=True)
class Reply:
    """A server's response: code, text, and the multi-line block (LF endings) if one followed."""

    code: int
    text: str
    block: bytes | None = None

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class NntpSessionError(Exception):
    """The session cannot go on: no usable reply came (or ``reply`` ended the session)."""

    def __init__(self, text: str, reply: Reply | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.reply = reply


class _DelayedCall(TypingProtocol):
    def cancel(self) -> None: ...
    def active(self) -> bool: ...


class _Clock(TypingProtocol):
    # Structural views of the zope interfaces, so that mypy checks calls without a zope plugin.
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> _DelayedCall: ...

    def seconds(self) -> float: ...


class _Endpoint(TypingProtocol):
    def connect(self, protocolFactory: Factory) -> Deferred[Any]: ...


class _Transport(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


class _Lost(Exception):
    pass


class _Malformed(Exception):
    pass


@dataclass(slots=True)
class _Pending:
    keyword: str
    waiter: Deferred[Reply]
    status: Reply | None = None  # the status line, while its block is being read


class _NntpClientProtocol(Protocol):
    """Bytes in, replies out, in the order the commands were written (so pipelining works)."""

    def __init__(self, max_block_size: int = MAX_REPLY_SIZE) -> None:
        self._reader = StreamReader(
            max_line_length=_MAX_RESPONSE_LINE, max_block_size=max_block_size
        )
        self.max_block_size = max_block_size
        self._pending: deque[_Pending] = deque()
        self._early: deque[Reply] = deque()  # the greeting, or input nobody asked for
        self._error: Exception | None = None
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    @property
    def unsolicited(self) -> bool:
        """The server sent something without being asked (a 400 goodbye, garbage)."""
        return bool(self._early) or self._error is not None

    def _transport(self) -> _Transport:
        return cast(_Transport, self.transport)

    def write(self, data: bytes) -> None:
        if not self.lost:
            self._transport().write(data)

    def lose(self) -> None:
        if not self.lost:
            self._transport().loseConnection()

    def abort(self) -> None:
        if not self.lost:
            self._transport().abortConnection()

    def expect(self, keyword: str) -> Deferred[Reply]:
        """The reply to the command (``keyword``) written last; replies come in order."""
        if self._error is not None:
            return fail(self._error)
        pending = _Pending(keyword, Deferred())
        self._pending.append(pending)
        return pending.waiter

    def expect_greeting(self) -> Deferred[Reply]:
        if self._early:
            return succeed(self._early.popleft())
        return self.expect("")

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._reader.receive_data(data)
        try:
            self._parse()
        except NntpError as exc:
            self._fail_all(_Malformed(str(exc)))
            self.abort()

    def _parse(self) -> None:
        while self._error is None:
            current = self._pending[0] if self._pending else None
            if current is not None and current.status is not None:
                block = self._reader.read_block()
                if block is None and not self._reader.block_refused:
                    return
                if block is None or not block.ok:
                    raise NntpError(
                        f"the block after {current.status.code} to {current.keyword} is longer"
                        f" than {self.max_block_size} octets, the limit for one reply"
                    )
                status, current.status = current.status, None
                self._pending.popleft()
                if not current.waiter.called:  # else cancelled by its caller
                    current.waiter.callback(Reply(status.code, status.text, block.data))
                continue
            line = self._reader.read_line()
            if line is None:
                return
            response = parse_response(line)
            reply = Reply(response.code, response.text)
            if current is None:
                if len(self._early) >= _MAX_UNSOLICITED:
                    raise NntpError(f"unsolicited reply {str(reply)[:80]!r}")
                self._early.append(reply)
                continue
            if response_has_block(reply.code, current.keyword):
                current.status = reply
                continue
            self._pending.popleft()
            if not current.waiter.called:
                current.waiter.callback(reply)

    def _fail_all(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        pending, self._pending = self._pending, deque()
        for item in pending:
            if not item.waiter.called:
                item.waiter.errback(self._error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        clean = isinstance(reason.value, ConnectionDone)
        self._fail_all(_Lost("" if clean else f" ({reason.getErrorMessage()})"))
        if self.on_lost is not None:
            self.on_lost()


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, max_reply_size: int = MAX_REPLY_SIZE) -> None:
        self.max_reply_size = max_reply_size

    def buildProtocol(self, addr: IAddress | None) -> _NntpClientProtocol:
        protocol = _NntpClientProtocol(self.max_reply_size)
        protocol.factory = self
        return protocol


def describe_endpoint(endpoint: object) -> str:
    """host:port of a client endpoint, for logs and failure texts."""
    wrapped = getattr(endpoint, "_wrappedEndpoint", None)  # ssl: wraps a TCP endpoint
    if wrapped is not None:
        return describe_endpoint(wrapped)
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = getattr(endpoint, "_path", None)
    if isinstance(path, str):
        return path
    return type(endpoint).__name__


class NntpSession:
    """One connection to a news server, past its greeting; commands return replies.

    ``posting`` is False when the server said 201 (no posting) in its greeting or
    to MODE READER; ``streaming`` is True once MODE STREAM was accepted.
    """

    def __init__(
        self, protocol: _NntpClientProtocol, reactor: IReactorTime, timeout: float, server: str
    ) -> None:
        self.protocol = protocol
        self._reactor = reactor
        self.timeout = timeout
        self.server = server
        self.greeting: Reply | None = None
        self.posting = True
        self.streaming = False
        self.reader_mode = False
        self.authenticated = False
        self.capabilities: dict[str, tuple[str, ...]] | None = None
        # Pool bookkeeping.
        self.inflight = 0
        self.broken = False
        self.quitting = False
        self.idle_call: _DelayedCall | None = None

    @property
    def usable(self) -> bool:
        return not (self.broken or self.quitting or self.protocol.lost or self.protocol.unsolicited)

    # ----------------------------------------------------------------- primitives

    async def _wait(self, waiting: Deferred[Reply], what: str) -> Reply:
        waiting.addTimeout(self.timeout, self._reactor)
        try:
            reply = await waiting
        except TimeoutError:
            self.broken = True
            self.protocol.abort()
            raise NntpSessionError(
                f"timed out after {self.timeout:g}s waiting for {what} from {self.server}"
            ) from None
        except _Lost as exc:
            self.broken = True
            raise NntpSessionError(
                f"connection to {self.server} lost while waiting for {what}{exc}"
            ) from None
        except _Malformed as exc:
            self.broken = True
            raise NntpSessionError(
                f"{self.server} sent a malformed reply while we waited for {what}: {exc}"
            ) from None
        if reply.code == 400:
            # RFC 3977 5.1.1: the server is closing the connection.
            self.broken = True
            raise NntpSessionError(f"{self.server} closed the session: {reply}", reply)
        return reply

    async def command(self, keyword: str, *args: str, data: bytes | None = None) -> Reply:
        """Send ``keyword args`` (and ``data`` as a block right after it) and read the reply."""
        try:
            line = format_command(keyword, *args)
        except NntpError as exc:
            raise NntpSessionError(f"cannot send {keyword} to {self.server}: {exc}") from None
        if self.broken or self.protocol.lost:
            raise NntpSessionError(f"the session with {self.server} is closed")
        waiting = self.protocol.expect(keyword.upper())
        self.protocol.write(line if data is None else line + encode_block(data))
        return await self._wait(waiting, f"the reply to {keyword.upper()}")

    async def _send_block(self, keyword: str, data: bytes, what: str) -> Reply:
        waiting = self.protocol.expect(keyword)
        self.protocol.write(encode_block(data))
        return await self._wait(waiting, what)

    # ----------------------------------------------------------------- set-up

    async def read_greeting(self) -> Reply:
        greeting = await self._wait(self.protocol.expect_greeting(), "the greeting")
        self.greeting = greeting
        if greeting.code not in (200, 201):
            # 400 is handled in _wait; 502 means we may not use this server at all.
            self.broken = True
            raise NntpSessionError(f"{self.server} refused the connection: {greeting}", greeting)
        self.posting = greeting.code == 200
        return greeting

    async def fetch_capabilities(self) -> dict[str, tuple[str, ...]]:
        """CAPABILITIES (RFC 3977 5.2); empty when the server does not know the command."""
        reply = await self.command("CAPABILITIES")
        self.capabilities = parse_capabilities(reply.block or b"") if reply.code == 101 else {}
        return self.capabilities

    async def mode_reader(self) -> Reply:
        reply = await self.command("MODE", "READER")
        if reply.code in (200, 201):
            self.reader_mode = True
            self.posting = reply.code == 200
        return reply

    async def mode_stream(self) -> Reply:
        reply = await self.command("MODE", "STREAM")
        self.streaming = reply.code == 203
        return reply

    async def authenticate(self, user: str, password: str | None) -> None:
        """AUTHINFO USER/PASS; raises NntpSessionError with the server's reply when refused."""
        reply = await self.command("AUTHINFO", "USER", user)
        if reply.code == 381:
            if password is None:
                raise NntpSessionError(
                    f"{self.server} wants a password for {user!r} and none is configured", reply
                )
            # A password may hold spaces, which format_command refuses; write it as is.
            if any(c in password for c in "\r\n\0"):
                raise NntpSessionError("the configured password contains a line break or NUL")
            line = f"AUTHINFO PASS {password}\r\n".encode()
            waiting = self.protocol.expect("AUTHINFO")
            self.protocol.write(line)
            reply = await self._wait(waiting, "the reply to AUTHINFO PASS")
        if reply.code != 281:
            raise NntpSessionError(f"{self.server} refused AUTHINFO for {user!r}: {reply}", reply)
        self.authenticated = True

    # ----------------------------------------------------------------- transfer

    async def post(self, data: bytes) -> Reply:
        """POST (RFC 3977 6.3.1): the 340 reply, then the article; the decisive reply."""
        reply = await self.command("POST")
        if reply.code != 340:
            return reply
        return await self._send_block("POST", data, "the reply to the posted article")

    async def ihave(self, message_id: str, data: bytes) -> Reply:
        """IHAVE (RFC 3977 6.3.2): 335 then the article; a 435/436/437 ends it early."""
        reply = await self.command("IHAVE", message_id)
        if reply.code != 335:
            return reply
        return await self._send_block("IHAVE", data, "the reply to the offered article")

    async def check(self, message_id: str) -> Reply:
        """CHECK (RFC 4644 2.3): 238 send it, 431 later, 438 not wanted."""
        return self._same_article(await self.command("CHECK", message_id), "CHECK", message_id)

    async def takethis(self, message_id: str, data: bytes) -> Reply:
        """TAKETHIS (RFC 4644 2.4): command and article in one write; 239 or 439."""
        reply = await self.command("TAKETHIS", message_id, data=data)
        return self._same_article(reply, "TAKETHIS", message_id)

    def _same_article(self, reply: Reply, keyword: str, message_id: str) -> Reply:
        """A streaming reply names its article: one for another article means the
        replies are out of step with the commands, and none of them can be trusted."""
        if reply.code in _STREAMING_CODES:
            words = reply.text.split(None, 1)
            if words and is_message_id(words[0]) and words[0] != message_id:
                self.abort()
                raise NntpSessionError(
                    f"{self.server} answered {keyword} {message_id} with {reply},"
                    " which is about another article; the session is out of step",
                    reply,
                )
        return reply

    # ----------------------------------------------------------------- reading

    async def group(self, name: str) -> Reply:
        """GROUP: 211 count low high name, or 411 (no such group)."""
        return await self.command("GROUP", name)

    async def over(self, first: int, last: int | None = None) -> Reply:
        """OVER first-last (XOVER when the server does not know OVER); 224 with the block."""
        spec = f"{first}-" if last is None else f"{first}-{last}"
        reply = await self.command("OVER", spec)
        if reply.code in (500, 501):
            reply = await self.command("XOVER", spec)
        return reply

    async def article(self, spec: int | str) -> Reply:
        """ARTICLE number or <message-id>: 220 n <id> with the article (LF endings)."""
        return await self.command("ARTICLE", str(spec))

    async def stat(self, spec: int | str) -> Reply:
        """STAT number or <message-id>: 223 n <id>, or 423/430."""
        return await self.command("STAT", str(spec))

    async def date(self) -> Reply:
        """DATE: 111 yyyymmddhhmmss (UTC)."""
        return await self.command("DATE")

    async def quit(self) -> None:
        """QUIT and close; never raises."""
        if self.quitting or self.protocol.lost:
            self.protocol.lose()
            return
        self.quitting = True
        try:
            if not self.broken:
                await self.command("QUIT")
        except NntpSessionError:
            pass
        finally:
            self.protocol.lose()

    def abort(self) -> None:
        self.broken = True
        self.protocol.abort()


def _connect_error(exc: Exception, server: str, timeout: float) -> NntpSessionError:
    return NntpSessionError(connect_failure(exc, server, timeout))


async def open_session(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    *,
    connect_timeout: float = 30.0,
    timeout: float = 120.0,
    mode: str = "reader",
    user: str | None = None,
    password: str | None = None,
    server: str | None = None,
    max_reply_size: int = MAX_REPLY_SIZE,
) -> NntpSession:
    """A session past greeting, mode switch and AUTHINFO; raises NntpSessionError.

    ``mode`` is "reader" (MODE READER: POST, GROUP, ARTICLE), "stream" (MODE
    STREAM; the session falls back to IHAVE when refused) or "transit" (none).
    MODE READER comes before AUTHINFO, as RFC 4643 2.2 asks of mode-switching
    servers.  A multi-line reply over ``max_reply_size`` octets (or one that
    never ends) ends the session with NntpSessionError.
    """
    server = server or describe_endpoint(endpoint)
    connecting = cast(_Endpoint, endpoint).connect(_ClientFactory(max_reply_size))
    connecting.addTimeout(connect_timeout, reactor)
    try:
        protocol = cast(_NntpClientProtocol, await connecting)
    except CancelledError:
        raise
    except Exception as exc:
        raise _connect_error(exc, server, connect_timeout) from None
    session = NntpSession(protocol, reactor, timeout, server)
    try:
        await session.read_greeting()
        if mode == "reader":
            reply = await session.mode_reader()
            if reply.code == 502:
                raise NntpSessionError(f"{server} refused MODE READER: {reply}", reply)
        elif mode == "stream":
            await session.mode_stream()
        if user is not None:
            await session.authenticate(user, password)
            if mode == "stream" and not session.streaming:
                # Some servers only allow streaming once the peer is known.
                await session.mode_stream()
    except BaseException:
        session.abort()
        raise
    return session


class NntpClientPool:
    """Up to ``max_connections`` sessions to one news server, for the nntp destination.

    ``mode`` is "post", "ihave" or "stream".  In stream mode one session carries
    up to ``pipeline`` articles at once (CHECK and TAKETHIS pipelined); in the
    other modes a session carries one article at a time.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        *,
        mode: str = "post",
        user: str | None = None,
        password: str | None = None,
        max_connections: int = 4,
        connect_timeout: float = 30.0,
        command_timeout: float = 120.0,
        idle_timeout: float = 30.0,
        pipeline: int = 16,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        destination: str | None = None,
    ) -> None:
        if mode not in ("post", "ihave", "stream"):
            raise ValueError(f'mode must be "post", "ihave" or "stream", not {mode!r}')
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if pipeline < 1:
            raise ValueError(f"pipeline must be at least 1, not {pipeline}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("command_timeout", command_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value}")
        self._reactor = reactor
        self._clock = cast(_Clock, reactor)
        self._endpoint = endpoint
        self.destination = destination or describe_endpoint(endpoint)
        self.mode = mode
        self._user = user
        self._password = password
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_timeout = idle_timeout
        self._pipeline = pipeline if mode == "stream" else 1
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._backoff = 0.0  # the wait after the last failed attempt; 0 after a success
        self._retry_at = 0.0
        self._last_failure = ""
        self._slots: Slots[NntpSession] = Slots(max_connections)  # open or being opened
        self._sessions: list[NntpSession] = []
        self._closed = False

    # ----------------------------------------------------------------- public interface

    @property
    def open_connections(self) -> int:
        return self._slots.taken

    async def post(self, data: bytes) -> Reply:
        """POST the article; the decisive reply, or NntpSessionError when none came."""
        return await self._run(lambda session: session.post(data))

    async def ihave(self, message_id: str, data: bytes) -> Reply:
        return await self._run(lambda session: session.ihave(message_id, data))

    async def stream(self, message_id: str, data: bytes) -> Reply:
        """CHECK, then TAKETHIS when wanted; IHAVE on a server that refused MODE STREAM."""

        async def offer(session: NntpSession) -> Reply:
            if not session.streaming:
                return await session.ihave(message_id, data)
            reply = await session.check(message_id)
            if reply.code != 238:
                return reply
            return await session.takethis(message_id, data)

        return await self._run(offer)

    async def send(self, message_id: str, data: bytes) -> Reply:
        """The article by this pool's mode."""
        if self.mode == "post":
            return await self.post(data)
        if not is_message_id(message_id):
            raise ValueError(f"{message_id!r} is not a message-id that IHAVE or CHECK can offer")
        if self.mode == "ihave":
            return await self.ihave(message_id, data)
        return await self.stream(message_id, data)

    async def close(self) -> None:
        """QUIT idle sessions, fail waiting sends, and wait until every session is closed."""
        if not self._closed:
            self._closed = True
            self._slots.fail_waiters(
                lambda: NntpSessionError(f"the NNTP client for {self.destination} was closed")
            )
            for session in list(self._sessions):
                if session.inflight == 0:
                    self._cancel_idle(session)
                    self._start_quit(session)
        await self._slots.drained()

    # ----------------------------------------------------------------- one operation

    async def _run(self, operation: Callable[[NntpSession], Any]) -> Reply:
        session = await self._acquire()
        try:
            reply = cast(Reply, await operation(session))
        except BaseException:
            session.broken = True
            raise
        finally:
            self._release(session)
        return reply

    async def _acquire(self) -> NntpSession:
        if self._closed:
            raise NntpSessionError(f"the NNTP client for {self.destination} is closed")
        session = self._pick()
        if session is not None:
            session.inflight += 1
            return session
        if not self._slots.reserve():
            given = await self._slots.wait()
            if given is not None:
                return given  # inflight was counted by whoever handed it over
        return await self._open()

    def _pick(self) -> NntpSession | None:
        best: NntpSession | None = None
        for session in list(self._sessions):
            if not session.usable:
                if session.inflight == 0:
                    self._cancel_idle(session)
                    session.abort()
                continue
            if session.inflight < self._capacity(session) and (
                best is None or session.inflight > best.inflight
            ):
                best = session  # fill busy sessions first, so spare ones age out
        if best is not None:
            self._cancel_idle(best)
        return best

    async def _open(self) -> NntpSession:
        """Open a session in the slot already reserved; back off after failures."""
        now = self._clock.seconds()
        if now < self._retry_at:
            self._slots.free()
            raise NntpSessionError(
                f"{self._last_failure}; not trying {self.destination} again for"
                f" {self._retry_at - now:.0f}s"
            )
        session_mode = {"post": "reader", "ihave": "transit", "stream": "stream"}[self.mode]
        try:
            session = await open_session(
                self._reactor,
                self._endpoint,
                connect_timeout=self._connect_timeout,
                timeout=self._command_timeout,
                mode=session_mode,
                user=self._user,
                password=self._password,
                server=self.destination,
            )
        except NntpSessionError as exc:
            self._slots.free()
            self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
            self._retry_at = self._clock.seconds() + self._backoff
            self._last_failure = exc.text
            log.warn(
                "NNTP connection to {destination} failed: {reason}; next attempt in {delay:g}s",
                destination=self.destination,
                reason=exc.text,
                delay=self._backoff,
            )
            raise
        except BaseException:
            self._slots.free()
            raise
        self._backoff = 0.0
        self._retry_at = 0.0
        if self.mode == "stream" and not session.streaming:
            log.info(
                "{destination} refused MODE STREAM; offering articles with IHAVE",
                destination=self.destination,
            )
        session.protocol.on_lost = partial(self._session_lost, session)
        if session.protocol.lost:
            self._sessions.append(session)
            self._session_lost(session)
            raise NntpSessionError(f"connection to {self.destination} was lost as it opened")
        self._sessions.append(session)
        session.inflight = 1
        self._hand_over(session)  # a streaming session can take waiting articles at once
        return session

    def _release(self, session: NntpSession) -> None:
        session.inflight -= 1
        if not session.usable:
            if session.inflight == 0 and not session.quitting:
                session.abort()  # the slot comes back in _session_lost
            return
        if self._closed:
            if session.inflight == 0:
                self._start_quit(session)
            return
        self._hand_over(session)
        if session.inflight == 0:
            session.idle_call = self._clock.callLater(self._idle_timeout, self._expire, session)

    def _hand_over(self, session: NntpSession) -> None:
        while session.inflight < self._capacity(session):
            waiter = self._slots.next_waiter()
            if waiter is None:
                return
            session.inflight += 1
            waiter.callback(session)

    def _capacity(self, session: NntpSession) -> int:
        """Articles a session may carry at once: only CHECK and TAKETHIS pipeline;
        IHAVE and POST wait for the server between command and article."""
        return self._pipeline if session.streaming else 1

    def _expire(self, session: NntpSession) -> None:
        session.idle_call = None
        if session.inflight == 0:
            self._start_quit(session)

    @staticmethod
    def _cancel_idle(session: NntpSession) -> None:
        if session.idle_call is not None:
            if session.idle_call.active():
                session.idle_call.cancel()
            session.idle_call = None

    def _session_lost(self, session: NntpSession) -> None:
        self._cancel_idle(session)
        if session in self._sessions:
            self._sessions.remove(session)
            self._slots.free()

    def _start_quit(self, session: NntpSession) -> None:
        if session.quitting or session.protocol.lost:
            return
        self._cancel_idle(session)
        quitting = Deferred.fromCoroutine(session.quit())
        quitting.addErrback(
            lambda failure: log.failure(
                "NNTP client error while closing a session with {destination}",
                failure=failure,
                destination=self.destination,
            )
        )
