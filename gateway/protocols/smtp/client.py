"""Twisted SMTP client: a pool of connections to one destination that delivers messages.

send() reports one RecipientResult per recipient and never raises for network or server trouble.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._client_pool import Slots, connect_failure
from .codec import (
    Reply,
    ReplyParser,
    SmtpSyntaxError,
    encode_message,
    is_valid_address,
    message_size,
    parse_ehlo_extensions,
)

__all__ = ["RecipientResult", "SmtpClientPool"]

log = Logger()

TlsMode = Literal["none", "may", "require"]


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient: the server's reply, or code 0 when there was none."""

    recipient: str
    code: int
    status: str
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return self.code == 0 or 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class _SessionError(Exception):
    """The session cannot go on; the reply (or the text, with code 0) applies to what is left."""

    def __init__(self, text: str, reply: Reply | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.reply = reply

    @classmethod
    def from_reply(cls, reply: Reply) -> _SessionError:
        return cls(reply.text, reply)

    def result_for(self, recipient: str) -> RecipientResult:
        if self.reply is not None:
            return _result(recipient, self.reply)
        return RecipientResult(recipient, 0, "", self.text)


class _ConnectionLost(Exception):
    pass


class _MalformedReply(Exception):
    pass


class _StaleSession(_SessionError):
    """A reused session failed before the server took anything: try a fresh connection."""


def _result(recipient: str, reply: Reply) -> RecipientResult:
    if reply.code // 100 not in (2, 4, 5):
        # RFC 5321 4.2.1: only 2xx, 4xx and 5xx end a command other than DATA; anything
        # else is a confused server, and what it did with the mail is unknown: try again.
        text = f"unexpected reply {reply.code} {reply.text}".rstrip()
        return RecipientResult(recipient, 0, "", text)
    return RecipientResult(recipient, reply.code, reply.status, reply.text)


# RFC 5321 4.5.3.1.6: at most 998 octets of text a line. Longer lines are folded as the
# Postfix SMTP client folds them (smtp_line_length_limit): a CRLF and a space are inserted,
# which keeps the text and, in MIME, most of its meaning, where refusing would bounce it.
_MAX_LINE = 998
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (_MAX_LINE + 1))


def _wire_data(data: bytes) -> bytes:
    """The message as it may go over SMTP: LF line ends only, no line over 998 octets.

    RFC 5321 2.3.8 forbids bare CR and LF on the wire; CRLF and a lone CR in stored
    data are line breaks, so both become LF here (encode_message turns LF into CRLF).
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if len(data) <= _MAX_LINE or _LONG_LINE.search(data) is None:
        return data
    out: list[bytes] = []
    for line in data.split(b"\n"):
        if len(line) > _MAX_LINE:
            out.append(line[:_MAX_LINE])
            step = _MAX_LINE - 1
            out.extend(b" " + line[i : i + step] for i in range(_MAX_LINE, len(line), step))
        else:
            out.append(line)
    return b"\n".join(out)


class _DelayedCall(TypingProtocol):
    def cancel(self) -> None: ...
    def active(self) -> bool: ...


class _Clock(TypingProtocol):
    # Structural views of the zope interfaces, so that mypy checks calls without a zope plugin.
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> _DelayedCall: ...


class _Endpoint(TypingProtocol):
    def connect(self, protocolFactory: Factory) -> Deferred[Any]: ...


class _Transport(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def startTLS(self, contextFactory: object) -> None: ...


class _SmtpClientProtocol(Protocol):
    """Bytes in, replies out: hands complete replies to whoever waits in next_reply()."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiter: Deferred[Reply] | None = None
        self._error: Exception | None = None
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    @property
    def has_unread_input(self) -> bool:
        return bool(self._replies) or self._parser.pending or self._error is not None

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

    def start_tls(self, context: object) -> None:
        self._transport().startTLS(context)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            self._replies.extend(self._parser.receive_data(data))
        except SmtpSyntaxError as exc:
            self._error = _MalformedReply(str(exc))
            self.abort()
        self._deliver()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._error is None:
            clean = isinstance(reason.value, ConnectionDone)
            detail = "" if clean else f" ({reason.getErrorMessage()})"
            self._error = _ConnectionLost(detail)
        self._deliver()
        if self.on_lost is not None:
            self.on_lost()

    def next_reply(self) -> Deferred[Reply]:
        if self._replies:
            return succeed(self._replies.popleft())
        if self._error is not None:
            return fail(self._error)
        waiter: Deferred[Reply] = Deferred(self._cancel_wait)
        self._waiter = waiter
        return waiter

    def _cancel_wait(self, waiter: Deferred[Reply]) -> None:
        if self._waiter is waiter:
            self._waiter = None

    def _deliver(self) -> None:
        while self._waiter is not None and (self._replies or self._error is not None):
            waiter, self._waiter = self._waiter, None
            if self._replies:
                waiter.callback(self._replies.popleft())
            else:
                waiter.errback(self._error)


class _ClientFactory(Factory):
    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> _SmtpClientProtocol:
        protocol = _SmtpClientProtocol()
        protocol.factory = self
        return protocol


@dataclass(slots=True)
class _Job:
    """One send(): what to deliver, and a result slot per recipient (None while open)."""

    sender: str
    recipients: list[str]
    todo: list[int]  # indexes of the recipients that go to the server
    data: bytes
    results: list[RecipientResult | None]

    def settle(self, result_for: Callable[[str], RecipientResult]) -> None:
        for index in self.todo:
            if self.results[index] is None:
                self.results[index] = result_for(self.recipients[index])


class _Connection:
    """A pooled session past its greeting and EHLO, with what the server offered."""

    def __init__(self, protocol: _SmtpClientProtocol) -> None:
        self.protocol = protocol
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.messages = 0
        self.needs_rset = False
        self.broken = False
        self.quitting = False
        self.idle_call: _DelayedCall | None = None

    def cancel_idle_timer(self) -> None:
        if self.idle_call is not None:
            if self.idle_call.active():
                self.idle_call.cancel()
            self.idle_call = None


def _describe_endpoint(endpoint: object) -> str:
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = getattr(endpoint, "_path", None)
    if isinstance(path, str):
        return path
    return type(endpoint).__name__


def _endpoint_host(endpoint: object) -> str | None:
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    return host if isinstance(host, str) else None


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _tls_context(
    verify: bool, ca_file: str | None, server_name: str | None, destination: str
) -> object:
    from twisted.internet import ssl
    from twisted.internet._sslverify import IOpenSSLTrustRoot

    # Both are untyped in Twisted; pin down what they return.
    platform_trust = cast(Callable[[], IOpenSSLTrustRoot], ssl.platformTrust)
    trust_from = cast(
        Callable[[list[ssl.Certificate]], IOpenSSLTrustRoot], ssl.trustRootFromCertificates
    )

    if not verify:
        # Opportunistic, like Postfix's "may": encryption against passive listeners only.
        return ssl.CertificateOptions(verify=False)
    if not server_name:
        raise ValueError(
            f"tls_verify needs the server's name to check its certificate against, and none is"
            f" known for {destination}; pass server_name="
        )
    if ca_file is None:
        return ssl.optionsForClientTLS(server_name, trustRoot=platform_trust())
    try:
        pem = Path(ca_file).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the CA file {ca_file}: {exc.strerror}") from None
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError(f"the CA file {ca_file} holds no PEM certificate")
    certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    trust = trust_from(certificates)
    return ssl.optionsForClientTLS(server_name, trustRoot=trust)


class SmtpClientPool:
    """Delivers messages over at most max_connections pooled SMTP sessions to one endpoint.

    tls is "none" (never STARTTLS), "may" (STARTTLS when offered) or "require" (fail
    temporarily when it is not offered). destination names the peer in logs and in
    result texts; by default it is read from the endpoint.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        *,
        helo: str,
        max_connections: int = 10,
        tls: str = "may",
        tls_verify: bool = False,
        ca_file: str | None = None,
        server_name: str | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        idle_timeout: float = 10.0,
        max_messages_per_connection: int = 100,
        destination: str | None = None,
    ) -> None:
        if tls not in ("none", "may", "require"):
            raise ValueError(f'tls must be "none", "may" or "require", not {tls!r}')
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if max_messages_per_connection < 1:
            raise ValueError(
                f"max_messages_per_connection must be at least 1, not {max_messages_per_connection}"
            )
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("command_timeout", command_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value}")
        if not helo or any(not 33 <= ord(c) <= 126 for c in helo):
            raise ValueError(f"helo must be a host name in ASCII without spaces, not {helo!r}")
        self._reactor = reactor
        self._clock = cast(_Clock, reactor)
        self._endpoint = cast(_Endpoint, endpoint)
        self.destination = destination or _describe_endpoint(endpoint)
        self._helo = helo.encode("ascii")
        self._tls: TlsMode = cast(TlsMode, tls)
        self._tls_context: object | None = None
        if tls != "none":
            self._tls_context = _tls_context(
                tls_verify, ca_file, server_name or _endpoint_host(endpoint), self.destination
            )
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages_per_connection
        self._slots: Slots[_Connection] = Slots(max_connections)  # open or being opened
        self._slots_limit = max_connections
        self._idle: list[_Connection] = []
        self._closed = False

    # ----------------------------------------------------------------- public interface

    @property
    def open_connections(self) -> int:
        """Connections open or being opened (for metrics and tests)."""
        return self._slots.taken

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes
    ) -> list[RecipientResult]:
        """Deliver data (LF line endings) from sender to recipients; one result per recipient."""
        # A lone address is a Sequence too; never send it one character at a time.
        recipients = [recipients] if isinstance(recipients, str) else list(recipients)
        results: list[RecipientResult | None] = [None] * len(recipients)
        if sender and not is_valid_address(sender, utf8=True):
            text = f"the sender address {sender!r} is not a valid SMTP address; nothing was sent"
            return [RecipientResult(r, 553, "5.1.7", text) for r in recipients]
        for index, recipient in enumerate(recipients):
            if recipient.lower() != "postmaster" and not is_valid_address(recipient, utf8=True):
                text = f"{recipient!r} is not a valid SMTP address; it was not sent"
                results[index] = RecipientResult(recipient, 553, "5.1.3", text)
        todo = [index for index, result in enumerate(results) if result is None]
        if todo:
            await self._deliver(_Job(sender, recipients, todo, data, results))
        return [result for result in results if result is not None]

    async def close(self) -> None:
        """QUIT idle sessions and wait until every connection is closed.

        Sends waiting for a connection fail at once with code 0; sends already on a
        connection finish their transaction first.
        """
        if not self._closed:
            self._closed = True
            self._slots.fail_waiters(
                lambda: _SessionError(
                    f"the SMTP client for {self.destination} was closed"
                    " before a connection was free"
                )
            )
            idle, self._idle = self._idle, []
            for conn in idle:
                conn.cancel_idle_timer()
                self._start_quit(conn)
        await self._slots.drained()

    # ----------------------------------------------------------------- one send

    async def _deliver(self, job: _Job) -> None:
        conn: _Connection | None = None
        try:
            # A reused session may have been timed out by the server while it sat idle;
            # when it fails before MAIL was answered, the next try takes a new connection.
            for attempt in range(self._slots_limit + 1):
                conn = await self._acquire()
                try:
                    await self._transaction(conn, job)
                    break
                except _StaleSession as stale:
                    if attempt == self._slots_limit:
                        raise
                    log.info(
                        "SMTP session with {destination} was gone before reuse ({reason});"
                        " trying a new connection",
                        destination=self.destination,
                        reason=stale.text,
                    )
                    conn.broken = True
                    self._release(conn)
                    conn = None
        except _SessionError as error:
            if conn is not None:
                conn.broken = True
            if error.reply is None:
                log.warn(
                    "SMTP delivery to {destination} failed: {reason}",
                    destination=self.destination,
                    reason=error.text,
                )
            else:
                log.info(
                    "SMTP server {destination} ended the session: {code} {reason}",
                    destination=self.destination,
                    code=error.reply.code,
                    reason=error.text,
                )
            job.settle(error.result_for)
        except CancelledError:
            if conn is not None:
                conn.broken = True
            raise
        except Exception as exc:
            if conn is not None:
                conn.broken = True
            log.failure(
                "SMTP client error while delivering to {destination}",
                destination=self.destination,
            )
            text = f"internal error in the SMTP client: {exc}"
            job.settle(lambda recipient: RecipientResult(recipient, 0, "", text))
        finally:
            if conn is not None:
                self._release(conn)

    async def _transaction(self, conn: _Connection, job: _Job) -> None:
        sender, recipients, todo, data, results = (
            job.sender,
            job.recipients,
            job.todo,
            job.data,
            job.results,
        )
        params = ""
        data = _wire_data(data)
        if "SIZE" in conn.extensions:
            params += f" SIZE={message_size(data)}"
        if "8BITMIME" in conn.extensions and not data.isascii():
            params += " BODY=8BITMIME"
        mail = f"MAIL FROM:<{sender}>{params}\r\n".encode()
        rcpts = [f"RCPT TO:<{recipients[index]}>\r\n".encode() for index in todo]
        reused = conn.messages > 0
        conn.messages += 1
        pipelining = "PIPELINING" in conn.extensions
        try:
            if pipelining:
                conn.protocol.write(mail + b"".join(rcpts) + b"DATA\r\n")
                mail_reply = await self._read(conn, "the reply to MAIL FROM")
            else:
                mail_reply = await self._command(conn, mail, "the reply to MAIL FROM")
        except _SessionError as error:
            # Nothing of this message was taken yet: safe to send it on another session.
            if reused and (error.reply is None or error.reply.code == 421):
                raise _StaleSession(error.text, error.reply) from None
            raise
        accepted: list[int] = []
        for index, rcpt in zip(todo, rcpts, strict=True):
            if not pipelining and not mail_reply.positive:
                results[index] = _result(recipients[index], mail_reply)
                continue
            if pipelining:
                reply = await self._read(conn, "the reply to RCPT TO")
            else:
                reply = await self._command(conn, rcpt, "the reply to RCPT TO")
            if not mail_reply.positive:
                # Under PIPELINING the RCPT replies to a refused MAIL are only 503s.
                results[index] = _result(recipients[index], mail_reply)
            elif reply.positive:
                accepted.append(index)
            else:
                results[index] = _result(recipients[index], reply)
        if not pipelining and not accepted:
            conn.needs_rset = mail_reply.positive
            return
        if pipelining:
            data_reply = await self._read(conn, "the reply to DATA")
        else:
            data_reply = await self._command(conn, b"DATA\r\n", "the reply to DATA")
        if not accepted:
            if data_reply.code == 354:
                # RFC 2920 3.1: DATA was accepted with no valid recipient; end it empty.
                conn.protocol.write(b".\r\n")
                await self._read(conn, "the reply to the end of an empty message")
            else:
                conn.needs_rset = mail_reply.positive
            return
        if data_reply.code != 354 and data_reply.code // 100 not in (4, 5):
            # A 2xx (or other) reply to DATA: the message was not sent, whatever it says.
            raise _SessionError(
                f"{self.destination} answered DATA with {data_reply.code} {data_reply.text};"
                " the message was not sent"
            )
        if data_reply.code != 354:
            for index in accepted:
                results[index] = _result(recipients[index], data_reply)
            conn.needs_rset = True
            return
        conn.protocol.write(encode_message(data))
        # RFC 5321 4.5.3.2.6: wait long (10 minutes against the usual 5) for the reply
        # after the data, since giving up then may deliver the message twice.
        final = await self._read(
            conn, "the reply to the end of the message", 2 * self._command_timeout
        )
        for index in accepted:
            results[index] = _result(recipients[index], final)

    # ----------------------------------------------------------------- replies

    async def _command(self, conn: _Connection, line: bytes, what: str) -> Reply:
        conn.protocol.write(line)
        return await self._read(conn, what)

    async def _read(self, conn: _Connection, what: str, timeout: float | None = None) -> Reply:
        """The next reply; raises _SessionError for a 421, a timeout, a loss or garbage."""
        timeout = self._command_timeout if timeout is None else timeout
        waiting = conn.protocol.next_reply()
        waiting.addTimeout(timeout, self._reactor)
        try:
            reply = await waiting
        except TimeoutError:
            conn.protocol.abort()
            raise _SessionError(f"timed out after {timeout:g}s waiting for {what}") from None
        except _ConnectionLost as exc:
            raise _SessionError(
                f"connection to {self.destination} lost while waiting for {what}{exc}"
            ) from None
        except _MalformedReply as exc:
            raise _SessionError(
                f"{self.destination} sent a malformed reply while we waited for {what}: {exc}"
            ) from None
        if reply.code == 421:
            raise _SessionError.from_reply(reply)
        return reply

    # ----------------------------------------------------------------- opening a session

    async def _open(self) -> _Connection:
        """Connect and get past the greeting, EHLO and STARTTLS; the slot is already taken."""
        connecting = self._endpoint.connect(_ClientFactory())
        connecting.addTimeout(self._connect_timeout, self._reactor)
        try:
            protocol = cast(_SmtpClientProtocol, await connecting)
        except CancelledError:
            self._slots.free()
            raise
        except Exception as exc:
            self._slots.free()
            raise self._connect_error(exc) from None
        conn = _Connection(protocol)
        if protocol.lost:
            self._slots.free()
            raise _SessionError(f"connection to {self.destination} was lost as it opened")
        protocol.on_lost = partial(self._connection_lost, conn)
        try:
            await self._handshake(conn)
        except BaseException:
            conn.broken = True
            if not conn.quitting:
                conn.protocol.abort()
            raise
        return conn

    def _connect_error(self, exc: Exception) -> _SessionError:
        return _SessionError(connect_failure(exc, self.destination, self._connect_timeout))

    async def _handshake(self, conn: _Connection) -> None:
        greeting = await self._read(conn, "the greeting")
        if not greeting.positive:
            self._start_quit(conn)
            raise _SessionError.from_reply(greeting)
        await self._hello(conn)
        # An endpoint that wraps the connection in TLS itself (port 465) needs no STARTTLS.
        conn.tls = bool(ISSLTransport.providedBy(conn.protocol.transport))
        offered = "STARTTLS" in conn.extensions
        if conn.tls:
            return
        if self._tls_context is not None and offered:
            reply = await self._command(conn, b"STARTTLS\r\n", "the reply to STARTTLS")
            if reply.code == 220:
                if conn.protocol.has_unread_input:
                    # Bytes sent before the handshake could be injected commands (CVE-2011-0411).
                    raise _SessionError(
                        f"{self.destination} sent data after its reply to STARTTLS;"
                        " the session was dropped"
                    )
                conn.protocol.start_tls(self._tls_context)
                conn.tls = True
                await self._hello(conn)
                return
            if self._tls == "require":
                self._start_quit(conn)
                raise _SessionError(
                    f"{self.destination} refused STARTTLS ({reply.code} {reply.text}),"
                    " and tls is set to require"
                )
        elif self._tls == "require":
            self._start_quit(conn)
            raise _SessionError(
                f"{self.destination} does not offer STARTTLS, and tls is set to require;"
                " the message was not sent"
            )

    async def _hello(self, conn: _Connection) -> None:
        reply = await self._command(conn, b"EHLO " + self._helo + b"\r\n", "the reply to EHLO")
        if reply.positive:
            conn.extensions = parse_ehlo_extensions(reply)
            return
        if 500 <= reply.code < 600:
            reply = await self._command(conn, b"HELO " + self._helo + b"\r\n", "the reply to HELO")
            if reply.positive:
                conn.extensions = {}
                return
        self._start_quit(conn)
        raise _SessionError.from_reply(reply)

    # ----------------------------------------------------------------- the pool

    async def _acquire(self) -> _Connection:
        while True:
            conn = await self._reserve()
            if conn is None:
                return await self._open()
            if not conn.needs_rset:
                return conn
            # The last transaction stopped halfway; clear the server's state before reuse.
            try:
                reply = await self._command(conn, b"RSET\r\n", "the reply to RSET")
            except _SessionError:
                reply = None
            if reply is not None and reply.positive:
                conn.needs_rset = False
                return conn
            conn.broken = True
            self._release(conn)

    async def _reserve(self) -> _Connection | None:
        """An idle connection, or None when a slot was reserved to open a new one."""
        if self._closed:
            raise _SessionError(f"the SMTP client for {self.destination} is closed")
        while self._idle:
            conn = self._idle.pop()  # most recently used, so that extra sessions age out
            conn.cancel_idle_timer()
            if conn.protocol.lost or conn.protocol.has_unread_input:
                # Unsolicited input on an idle session is a server's goodbye (a 421).
                conn.broken = True
                conn.protocol.abort()
                continue
            return conn
        if self._slots.reserve():
            return None
        return await self._slots.wait()

    def _release(self, conn: _Connection) -> None:
        if conn.broken or conn.protocol.lost:
            conn.protocol.abort()  # the slot comes back in _connection_lost
            return
        if self._closed or conn.messages >= self._max_messages:
            self._start_quit(conn)
            return
        waiter = self._slots.next_waiter()
        if waiter is not None:
            waiter.callback(conn)
            return
        self._idle.append(conn)
        conn.idle_call = self._clock.callLater(self._idle_timeout, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.idle_call = None
        if conn in self._idle:
            self._idle.remove(conn)
            self._start_quit(conn)

    def _connection_lost(self, conn: _Connection) -> None:
        conn.cancel_idle_timer()
        if conn in self._idle:
            self._idle.remove(conn)
        self._slots.free()

    def _start_quit(self, conn: _Connection) -> None:
        if conn.quitting or conn.protocol.lost:
            return
        conn.quitting = True
        quitting = Deferred.fromCoroutine(self._quit(conn))
        quitting.addErrback(
            lambda failure: log.failure(
                "SMTP client error while closing a session with {destination}",
                failure=failure,
                destination=self.destination,
            )
        )

    async def _quit(self, conn: _Connection) -> None:
        try:
            await self._command(conn, b"QUIT\r\n", "the reply to QUIT")
        except _SessionError:
            pass
        finally:
            conn.protocol.lose()
