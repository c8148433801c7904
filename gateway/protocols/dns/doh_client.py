"""Queries to a DNS-over-HTTPS server (RFC 8484), never over more than ``connections`` connections.

With the h2 package installed and a server that offers it (ALPN), queries are HTTP/2 streams
multiplexed over at most ``connections`` connections, opened one at a time as the streams the
server allows fill up. Otherwise they go over HTTP/1.1 keep-alive connections from a pool of that
size, one query in flight on each. The HTTP/2 shell is a thin layer over h2's state machine,
which does the framing, HPACK and flow control.
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.client_tls import UnverifiedTls, is_ip, load_trust_root
from gateway.protocols._bodies import BytesProducer
from gateway.protocols.dns.client import UpstreamError
from gateway.protocols.dns.wire import Question, WireError, parse_response_question, with_id

try:
    import h2.config  # type: ignore[import-not-found, unused-ignore]
    import h2.connection  # type: ignore[import-not-found, unused-ignore]
    import h2.errors  # type: ignore[import-not-found, unused-ignore]
    import h2.events  # type: ignore[import-not-found, unused-ignore]
    import h2.exceptions  # type: ignore[import-not-found, unused-ignore]
    import h2.settings  # type: ignore[import-not-found, unused-ignore]

    H2_AVAILABLE = True
except ImportError:  # the optional h2 extra is not installed: HTTP/1.1 only
    H2_AVAILABLE = False

__all__ = ["H2_AVAILABLE", "DohUpstream"]

log = Logger(namespace="gateway.dns.doh_client")

DNS_MESSAGE = b"application/dns-message"
# A DNS message is at most 65535 octets; error pages from a misconfigured server may be a little
# longer, and anything longer still is refused rather than buffered.
_MAX_BODY = 65535 + 4096
# Streams per HTTP/2 connection when the server allows more (or says nothing).
_MAX_STREAMS = 100
# Idle pooled HTTP/1.1 connections are kept this long; servers usually close them sooner.
_IDLE_KEEPALIVE = 120
# How long close() waits for connections to close cleanly before aborting them.
_CLOSE_GRACE = 1.0


class _Retryable(UpstreamError):
    """The connection went away before the answer: the query may be sent again, once."""


@dataclass(frozen=True)
class _Reply:
    status: int
    content_type: bytes
    body: bytes


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


def _tls_problem(reasons: Sequence[object], origin: str) -> str | None:
    """A sentence about a TLS failure among ``reasons`` (exceptions or Failures), or None."""
    for reason in reasons:
        value = reason.value if isinstance(reason, Failure) else reason
        if isinstance(value, SSL.Error):
            # pyOpenSSL's args: a list of (library, function, reason) from OpenSSL's error queue.
            queue = value.args[0] if value.args and isinstance(value.args[0], list) else []
            detail = "; ".join(str(e[-1]) for e in queue if isinstance(e, tuple) and e)
            return (
                f"{origin}: TLS handshake failed: {detail or value or 'no reason given'}; set ca: "
                "to the CA file that signed the server's certificate, or verify: false for a "
                "test server"
            )
        if type(value).__name__ in ("VerificationError", "CertificateError"):
            return (
                f"{origin}: TLS handshake failed: the server's certificate is not for this host "
                f"({value}); put a name the certificate holds in the URL"
            )
    return None


def _describe(exc: BaseException, origin: str) -> UpstreamError:
    """The UpstreamError for a failed request; retryable when a kept-alive connection died."""
    if isinstance(exc, UpstreamError):
        return exc
    reasons: list[object] = list(getattr(exc, "reasons", []) or []) or [exc]
    tls = _tls_problem(reasons, origin)
    if tls is not None:
        return UpstreamError(tls)
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(f"{origin} refused the connection; is the DoH server running?")
    if isinstance(exc, DNSLookupError):
        return UpstreamError(f"cannot resolve the host name of {origin}: {exc}")
    if isinstance(exc, ConnectTimeoutError | ConnectingCancelledError):
        return UpstreamError(f"no connection to {origin} in time")
    if isinstance(exc, ConnectError):
        return UpstreamError(f"cannot connect to {origin}: {exc}")
    values = [r.value if isinstance(r, Failure) else r for r in reasons]
    if all(isinstance(v, ConnectionClosed) for v in values):
        return _Retryable(f"{origin} closed the connection before answering")
    return UpstreamError(f"request to {origin} failed: {'; '.join(str(v) for v in values)}")


class _BodyReader(Protocol):
    """Collects a response body of at most _MAX_BODY octets."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > _MAX_BODY:
            self._abort()
            self.done.errback(UpstreamError(f"the answer is bigger than {_MAX_BODY} octets"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(
                _Retryable(f"the connection closed during the answer: {reason.value}")
            )

    def _abort(self) -> None:
        # A half-read response leaves the connection unusable; closing it keeps it out of the pool.
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


# --------------------------------------------------------------------------- HTTP/2


@dataclass
class _Stream:
    deferred: Deferred[_Reply]
    unsent: bytes
    status: int = 0
    content_type: bytes = b""
    body: bytearray = field(default_factory=bytearray)


@implementer(IHandshakeListener)
class _H2Protocol(Protocol):
    """One HTTP/2 connection: moves bytes between the TLS transport and h2's state machine.

    ``negotiated`` fires with the ALPN protocol once the TLS handshake is done; only b"h2" makes
    the connection usable. Every stream still open when the connection goes fails with
    _Retryable; ``on_change`` is called whenever streams or usability change.
    """

    def __init__(self, authority: bytes, on_change: Callable[[], None]) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.authority = authority
        self.on_change = on_change
        self.negotiated: Deferred[bytes | None] = Deferred(lambda _: self._abort())
        self.streams: dict[int, _Stream] = {}
        self.max_streams = _MAX_STREAMS
        self.usable = False
        self.gone = False
        self._lost: list[Deferred[None]] = []

    # --- transport events

    def handshakeCompleted(self) -> None:
        protocol = getattr(self.transport, "negotiatedProtocol", None)
        if protocol == b"h2":
            self.h2.initiate_connection()
            # A resolver has no use for pushed responses.
            self.h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
            self._flush()
            self.usable = True
        if not self.negotiated.called:
            self.negotiated.callback(protocol)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warn("HTTP/2 protocol error from {authority}: {error}", authority=self.authority,
                     error=exc)  # fmt: skip
            self._flush()
            self._abort()
            return
        for event in events:
            self._event(event)
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.usable = False
        self.gone = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.deferred.errback(_Retryable("the HTTP/2 connection closed before the answer"))
        if not self.negotiated.called:
            self.negotiated.errback(reason)
        lost, self._lost = self._lost, []
        for waiter in lost:
            waiter.callback(None)
        self.on_change()

    # --- h2 events

    def _event(self, event: object) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                for name, value in event.headers or ():
                    if name == b":status":
                        stream.status = int(value)
                    elif name == b"content-type":
                        stream.content_type = bytes(value)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.deferred.callback(
                    _Reply(stream.status, stream.content_type, bytes(stream.body))
                )
                self._changed()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                code = event.error_code
                error = _Retryable if code == h2.errors.ErrorCodes.REFUSED_STREAM else UpstreamError
                stream.deferred.errback(error(f"the server reset the HTTP/2 stream ({code!s})"))
                self._changed()
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in [s for s, stream in self.streams.items() if stream.unsent]:
                self._send_body(stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            allowed = self.h2.remote_settings.max_concurrent_streams
            self.max_streams = max(1, min(_MAX_STREAMS, allowed))
            self.on_change()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY. h2 accepts no frame after it, so even the streams the server says it will
            # finish cannot be read: they all go again, on another connection.
            self.usable = False
            streams, self.streams = self.streams, {}
            for stream in streams.values():
                stream.deferred.errback(
                    _Retryable(f"the server closed the HTTP/2 connection ({event.error_code!s})")
                )
            self._changed()

    def _data(self, event: Any) -> None:
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        stream.body += event.data
        if len(stream.body) > _MAX_BODY:
            del self.streams[event.stream_id]
            self._reset(event.stream_id)
            stream.deferred.errback(UpstreamError(f"the answer is bigger than {_MAX_BODY} octets"))
            self._changed()

    # --- requests

    def has_room(self) -> bool:
        return self.usable and len(self.streams) < self.max_streams

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Deferred[_Reply]:
        """Send one request on a new stream; its Deferred fires with the whole reply.

        Cancelling it resets the stream, and the connection goes on serving the others.
        """
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers, end_stream=not body)
        except h2.exceptions.H2Error as exc:
            # Stream IDs used up, or the connection is closing: the next query takes another one.
            self.usable = False
            self.on_change()
            return defer.fail(_Retryable(f"cannot open an HTTP/2 stream: {exc}"))

        def cancel(_: Deferred[_Reply]) -> None:
            if self.streams.pop(stream_id, None) is not None:
                self._reset(stream_id)
                self._changed()

        deferred: Deferred[_Reply] = Deferred(cancel)
        self.streams[stream_id] = _Stream(deferred, body)
        if body:
            self._send_body(stream_id)
        self._flush()
        return deferred

    def _send_body(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        while stream.unsent:
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                return  # the rest goes when the server opens the window (WindowUpdated)
            chunk, stream.unsent = stream.unsent[:window], stream.unsent[window:]
            self.h2.send_data(stream_id, chunk, end_stream=not stream.unsent)

    def _reset(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.H2Error:
            pass  # already closed on the server's side
        self._flush()

    def _changed(self) -> None:
        if not self.usable and not self.streams and not self.gone:
            self.close()
        self.on_change()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        transport: Any = self.transport
        if data and transport is not None:
            transport.write(data)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def close(self) -> Deferred[None]:
        """Say goodbye (GOAWAY) and close; the Deferred fires once the connection is gone."""
        if self.gone or self.transport is None:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost.append(waiter)
        self.usable = False
        transport: Any = self.transport
        if transport is not None:
            try:
                self.h2.close_connection()
            except h2.exceptions.H2Error:
                pass
            self._flush()
            transport.loseConnection()
        return waiter


# --------------------------------------------------------------------------- the upstream


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, make: Callable[[Sequence[bytes]], IStreamClientEndpoint]) -> None:
        self._make = make

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._make([b"http/1.1"])


@implementer(IStreamClientEndpoint)
class _ClientEndpoint:
    """TCP, then TLS when there is a creator; tells its owner of every connection it makes.

    The owner counts them and can abort them at close. TLS is wrapped here rather than with
    wrapClientTLS so that the TLS layer's write timer runs on our reactor.
    """

    def __init__(self, tcp: Any, creator: Any, reactor: Any, opened: Callable[[Any], None]) -> None:
        self._tcp = tcp
        self._creator = creator
        self._reactor = reactor
        self._opened = opened

    def connect(self, factory: Any) -> Deferred[Any]:
        if self._creator is None:
            connecting: Deferred[Any] = self._tcp.connect(factory)
        else:
            tls = TLSMemoryBIOFactory(self._creator, True, factory, clock=self._reactor)
            connecting = self._tcp.connect(tls).addCallback(lambda proto: proto.wrappedProtocol)

        def opened(protocol: Any) -> Any:
            self._opened(protocol)
            return protocol

        return connecting.addCallback(opened)


class DohUpstream:
    """A DNS-over-HTTPS server to forward queries to, by POST or GET (RFC 8484 §4.1).

    Queries are sent with ID 0 (one URL per question, friendly to HTTP caches); the answer comes
    back as the server sent it, after a check that it answers the question asked. Any failure,
    including an HTTP status other than 200, raises UpstreamError.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        method: str = "POST",
        ca_file: str | None = None,
        verify: bool = True,
        connections: int = 4,
        timeout: float = 5.0,
        http2: bool = True,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"a DoH URL looks like https://dns.example/dns-query, not {url!r}")
        if method.upper() not in ("POST", "GET"):
            raise ValueError(f"the DoH method is POST or GET, not {method!r}")
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        self.reactor = reactor
        self.url = url
        self.method = method.upper().encode()
        self.connections = connections
        self.timeout = timeout
        self.verify = verify
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host_text = f"[{self._host}]" if ":" in self._host else self._host
        self._origin = f"{parts.scheme}://{host_text}:{self._port}"
        self._authority = (host_text if default_port else f"{host_text}:{self._port}").encode()
        self._path = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode()
        self._trust_root = load_trust_root(ca_file) if ca_file and verify else None

        # Until the first connection's ALPN says otherwise, try HTTP/2 when we can speak it.
        self._mode = "unknown" if (http2 and H2_AVAILABLE and self._tls) else "http/1.1"
        self._h2: list[_H2Protocol] = []
        self._connecting = 0
        self._waiters: list[Deferred[None]] = []

        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._pool.maxPersistentPerHost = connections
        self._pool.cachedConnectionTimeout = _IDLE_KEEPALIVE
        # We retry ourselves, POST included: a DNS query is idempotent.
        self._pool.retryAutomatically = False
        self._agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            reactor, _Endpoints(self._endpoint), self._pool
        )
        # One request in flight per HTTP/1.1 connection, so the pool never needs more of them.
        self._http11_slots = DeferredSemaphore(connections)
        self._closed = False
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        self.queries = 0
        self.connections_opened = 0  # TCP connections made so far, for tests and metrics

    @property
    def protocol(self) -> str:
        """ "h2" or "http/1.1" once known, "unknown" before the first connection."""
        return self._mode

    # --- public API

    async def resolve(self, data: bytes, question: Question) -> bytes:
        """The server's answer to ``data`` (sent with ID 0, so the answer has ID 0).

        Raises UpstreamError on any failure: no connection, TLS, HTTP status, content type,
        timeout, or an answer to another question.
        """
        if self._closed:
            raise UpstreamError(f"{self.url}: the upstream is closed")
        self.queries += 1
        attempt = Deferred.fromCoroutine(self._attempts(with_id(data, 0), question))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        timer = self.reactor.callLater(self.timeout, expire)
        try:
            return await attempt
        except Exception:
            # Cancelling surfaces in many wrappings (ConnectingCancelledError,
            # ResponseNeverReceived...): the timer is what tells a timeout.
            if expired:
                raise UpstreamError(f"no answer from {self.url} within {self.timeout:g}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def close(self) -> Deferred[None]:
        """Close every connection; queries still waiting fail with UpstreamError."""
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(UpstreamError(f"{self.url}: the upstream is closing"))
        closing: list[Deferred[Any]] = [
            self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        ]
        closing += [connection.close() for connection in list(self._h2)]
        # A TLS close waits for the server's close_notify, which some servers only send when
        # their idle timer fires: after a moment, stop waiting.
        timer = self.reactor.callLater(_CLOSE_GRACE, self._abort_all)
        done = defer.gatherResults(closing, consumeErrors=True)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        return done.addBoth(finished)

    def _abort_all(self) -> None:
        for protocol in list(self._opened):
            transport = getattr(protocol, "transport", None)
            if transport is not None and not getattr(protocol, "gone", False):
                transport.abortConnection()
        self._opened.clear()

    def _note_connection(self, protocol: Any) -> None:
        self.connections_opened += 1
        self._opened.add(protocol)

    # --- one query

    async def _attempts(self, query: bytes, question: Question) -> bytes:
        try:
            reply = await self._send(query)
        except _Retryable as exc:
            # A kept-alive connection may close just as a query goes out on it: once more.
            log.debug("retrying a query to {url}: {error}", url=self.url, error=exc)
            reply = await self._send(query)
        return self._check(reply, question)

    async def _send(self, query: bytes) -> _Reply:
        if self.method == b"GET":
            encoded = base64.urlsafe_b64encode(query).rstrip(b"=")
            path = self._path + (b"&" if b"?" in self._path else b"?") + b"dns=" + encoded
            body = b""
        else:
            path, body = self._path, query
        if self._mode != "http/1.1":
            reply = await self._via_h2(path, body)
            if reply is not None:
                return reply
        return await self._via_http11(path, body)

    def _check(self, reply: _Reply, question: Question) -> bytes:
        if reply.status != 200:
            raise UpstreamError(f"HTTP {reply.status} from {self.url}")
        content_type = _media_type(reply.content_type)
        if content_type != DNS_MESSAGE:
            shown = content_type.decode("latin-1") or "none"
            raise UpstreamError(
                f"{self.url} answered with content type {shown}, not application/dns-message; "
                "is the URL the server's DoH endpoint?"
            )
        try:
            _, qname, qtype, qclass = parse_response_question(reply.body)
        except WireError as exc:
            raise UpstreamError(f"{self.url} sent a malformed DNS answer: {exc}") from None
        if (qname, qtype, qclass) != (question.qname, question.qtype, question.qclass):
            raise UpstreamError(
                f"{self.url} answered another question ({qname} type {qtype} class {qclass} "
                f"instead of {question.qname} type {question.qtype} class {question.qclass})"
            )
        return reply.body

    # --- HTTP/1.1

    async def _via_http11(self, path: bytes, body: bytes) -> _Reply:
        await self._http11_slots.acquire()
        try:
            headers = Headers({b"accept": [DNS_MESSAGE]})
            producer = None
            if body:
                headers.setRawHeaders(b"content-type", [DNS_MESSAGE])
                producer = BytesProducer(body)
            url = self._origin.encode() + path
            try:
                response: Any = await self._agent.request(self.method, url, headers, producer)
            except CancelledError:
                raise
            except Exception as exc:
                raise _describe(exc, self._origin) from None
            reader = _BodyReader()
            response.deliverBody(reader)
            content = await reader.done
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            return _Reply(response.code, content_type, content)
        finally:
            self._http11_slots.release()

    def _creator(self, protocols: Sequence[bytes]) -> Any:
        if not self.verify:
            return UnverifiedTls(self._host, protocols)
        return optionsForClientTLS(
            self._host, trustRoot=self._trust_root, acceptableProtocols=list(protocols)
        )

    def _endpoint(self, protocols: Sequence[bytes]) -> Any:
        endpoint: Any
        timeout = max(1, int(self.timeout + 0.999))
        if is_ip(self._host) and ":" in self._host:
            endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                self.reactor, self._host, self._port, timeout=timeout
            )
        elif is_ip(self._host):
            endpoint = TCP4ClientEndpoint(self.reactor, self._host, self._port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, self._host, self._port, timeout=timeout)
        creator = self._creator(protocols) if self._tls else None
        return _ClientEndpoint(endpoint, creator, self.reactor, self._note_connection)

    # --- HTTP/2

    async def _via_h2(self, path: bytes, body: bytes) -> _Reply | None:
        """The reply over HTTP/2, or None when the server turned out to speak HTTP/1.1 only."""
        headers = [
            (b":method", self.method),
            (b":scheme", b"https"),
            (b":authority", self._authority),
            (b":path", path),
            (b"accept", DNS_MESSAGE),
        ]
        if body:
            headers += [(b"content-type", DNS_MESSAGE), (b"content-length", b"%d" % len(body))]
        while True:
            if self._closed:
                raise UpstreamError(f"{self.url}: the upstream is closing")
            if self._mode == "http/1.1":
                return None
            usable = [c for c in self._h2 if c.has_room()]
            if usable:
                # The emptiest connection: streams spread, and the server's limits are respected.
                connection = min(usable, key=lambda c: len(c.streams))
                return await connection.request(headers, body)
            if self._connecting == 0 and len(self._h2) < self.connections:
                await self._open_h2()
                continue
            waiter: Deferred[None] = Deferred(self._waiters.remove)
            self._waiters.append(waiter)
            await waiter

    async def _open_h2(self) -> None:
        """Open one more connection; learn from its ALPN whether the server speaks HTTP/2.

        A failure fails the queries that were waiting for it too: they would only try the same
        server again at once.
        """
        self._connecting += 1
        connection = _H2Protocol(self._authority, self._wake)
        try:
            endpoint = self._endpoint([b"h2", b"http/1.1"])
            await connectProtocol(endpoint, connection)  # type: ignore[no-untyped-call]
            negotiated = await connection.negotiated
        except (CancelledError, ConnectingCancelledError):
            # This query timed out while connecting: a waiting one, with time left, tries again.
            self._connecting -= 1
            self._wake()
            raise
        except Exception as exc:
            self._connecting -= 1
            error = _describe(exc, self._origin)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(UpstreamError(str(error)))
            raise error from None
        self._connecting -= 1
        if negotiated == b"h2":
            self._mode = "h2"
            self._h2.append(connection)
            log.debug("HTTP/2 connection {n} to {origin}", n=len(self._h2), origin=self._origin)
        else:
            # This connection offered only HTTP/1.1; the pool makes its own from now on.
            self._mode = "http/1.1"
            connection.close()
        self._wake()

    def _wake(self) -> None:
        """Let waiting queries go: as many as there are free streams, or one to open a connection.

        Waking only that many keeps a burst of thousands of queries linear, not quadratic.
        """
        self._h2 = [c for c in self._h2 if not c.gone]
        if self._closed or self._mode == "http/1.1":
            ready = len(self._waiters)
        else:
            ready = sum(c.max_streams - len(c.streams) for c in self._h2 if c.usable)
            if self._connecting == 0 and len(self._h2) < self.connections:
                ready += 1
        ready = min(ready, len(self._waiters))
        waiters, self._waiters = self._waiters[:ready], self._waiters[ready:]
        for waiter in waiters:
            waiter.callback(None)
