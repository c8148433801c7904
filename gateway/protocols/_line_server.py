"""What the line-based server shells (SMTP, NNTP) share: the connection's flow and timers.

``LineServerProtocol`` moves bytes between a transport and a sans-io server
codec and asks a handler whenever the codec has a request; each protocol's
subclass says what its requests, answers and refusals are.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar, cast

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.listening import Admission, Guard

__all__ = [
    "Clock",
    "DelayedCall",
    "IdleTimer",
    "LineServerProtocol",
    "await_",
    "describe_peer",
    "drain_sessions",
]

log = Logger()

# Input kept while the client reads no replies, before reading from it stops too.
# Reading goes on below it: a TLS transport buffers writes (and pauses its
# producer) until its handshake is done, and the handshake needs reading.
READ_AHEAD = 64 * 1024

_T = TypeVar("_T")
_S = TypeVar("_S", bound="_Session")


class DelayedCall(Protocol):
    # Structural views of the zope interfaces, so that mypy checks calls without a zope plugin.
    def cancel(self) -> None: ...
    def active(self) -> bool: ...
    def reset(self, secondsFromNow: float) -> None: ...


class Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall: ...


class IdleTimer:
    """Calls ``on_idle`` once ``timeout`` seconds pass without a ``restart``.

    The timeout is given at each ``restart`` rather than once, so a listener
    that is reconfigured applies its new idle timeout to the connections it
    already has from their next activity on.
    """

    def __init__(self, clock: Clock, on_idle: Callable[[], object]) -> None:
        self._clock = clock
        self._on_idle = on_idle
        self._call: DelayedCall | None = None

    @property
    def running(self) -> bool:
        """Started and neither stopped nor fired since."""
        return self._call is not None

    def restart(self, timeout: float) -> None:
        """Start the timer, or start it again from now if it is running."""
        if self._call is not None and self._call.active():
            self._call.reset(timeout)
        else:
            self._call = self._clock.callLater(timeout, self._fire)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self._on_idle()


async def await_(awaitable: Awaitable[_T]) -> _T:
    """A coroutine for any awaitable, for ``Deferred.fromCoroutine``."""
    return await awaitable


def describe_peer(host: str, port: int) -> str:
    """``host:port`` for log lines, with an IPv6 address in brackets."""
    if not host:
        return "an unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Session(Protocol):
    @property
    def busy(self) -> bool: ...


async def drain_sessions(
    sessions: Collection[_S],
    reactor: Any,  # an IReactorTime (zope interfaces are opaque to mypy)
    timeout: float,
    close: Callable[[_S], object],
) -> None:
    """Close the idle sessions now, and the busy ones once they are idle or ``timeout``
    seconds have passed (``sessions`` shrinks as they go: a factory's open connections)."""
    deadline = reactor.seconds() + timeout
    while sessions:
        for session in list(sessions):
            if not session.busy:
                close(session)
        if not sessions or reactor.seconds() >= deadline:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    for session in list(sessions):
        close(session)


class _Reply(Protocol):
    def to_bytes(self) -> bytes: ...


class _Codec(Protocol):
    """The sans-io server codec a shell drives (smtp.codec.ServerCodec, nntp.codec.ServerCodec)."""

    @property
    def pending(self) -> object | None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def transferring(self) -> bool:
        """Message content is arriving (SMTP DATA, an NNTP article)."""
        ...

    tls: bool  # TLS is active (or about to be: STARTTLS was answered)
    discarded_after_starttls: int  # octets pipelined behind STARTTLS, thrown away

    def greeting(self) -> _Reply: ...
    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> object | None: ...
    def close(self) -> None: ...
    def timeout(self) -> _Reply: ...
    def abort(self) -> _Reply: ...


class _Factory(Protocol):
    @property
    def clock(self) -> Clock: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def transfer_timeout(self) -> float: ...
    @property
    def session_timeout(self) -> float: ...
    @property
    def guard(self) -> Guard[Any]: ...
    @property
    def tls(self) -> Any:
        """The listener's ServerTls (None without a tls: block): what STARTTLS starts."""


class _Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def startTLS(self, contextFactory: object) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getPeer(self) -> object: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


@implementer(IPushProducer)
class LineServerProtocol(TwistedProtocol):
    """One server connection of a line-based protocol, driven by a sans-io codec.

    Flow rules, the same for every protocol:

    * The connection is the push producer of its own transport. When the
      client stops reading replies and the transport's write buffer fills, the
      transport pauses it: it answers nothing more until the buffer drains, and
      stops reading once ``READ_AHEAD`` octets of commands wait. A client that
      pipelines commands without reading the answers costs bounded memory.
    * While a handler call is outstanding, reading stops once input waits
      behind its answer; a client that waits for each reply (most do) is never
      paused and resumed, which would cost two system calls per request.
    * The idle timer runs only while the client, not the handler, is expected
      to act, and only a whole request restarts it: a client that trickles a
      command a byte at a time must still finish it within ``idle_timeout``.
      While message content arrives, each read restarts it (as Postfix's
      smtpd_timeout), and the whole transfer must end within
      ``transfer_timeout``; the whole session within ``session_timeout`` (0:
      no limit). On expiry the codec's timeout reply is sent and the
      connection closes (aborted when the client reads nothing, as the reply
      would never drain).
    * A handler that raises or fails answers the request with the protocol's
      "try again later"; one that returns something that is not a reply too.
    """

    kind = ""  # "SMTP", "NNTP": for log lines

    def __init__(self, factory: _Factory, codec: _Codec) -> None:
        self._factory = factory
        self._codec = codec
        self._open = False  # connected and not closing: the only state in which we write
        self._waiting = False  # a handler call is outstanding
        self._pumping = False
        self._paused = False  # reading from the transport is paused
        self._write_blocked = False  # the transport's write buffer is full
        self._idle = IdleTimer(factory.clock, self._timed_out)
        self._transfer_timer = IdleTimer(factory.clock, self._transfer_timed_out)
        self._session_timer = IdleTimer(factory.clock, self._session_timed_out)
        self._peer_host = ""
        self._peer_port = 0
        self._tls = False

    # --- what each protocol says ---

    def _refusal(self, admission: Admission) -> tuple[bytes, bool] | None:
        """Asked once connected, with the listener guard's admission: None to greet the
        client, or a refusal to send instead and whether to close at once (else the codec
        answers what the client says next)."""
        raise NotImplementedError

    def _handle_event(self, event: object) -> None:
        """Write what the codec has to send (closing if it says so), or ask the handler."""
        raise NotImplementedError

    def _ask(self, event: Any) -> object:
        """The handler's result for a request: a reply, or an awaitable of one."""
        raise NotImplementedError

    def _answer(self, result: object, event: Any) -> None:
        """Give the handler's result to the codec; anything but a reply answers try-later."""
        raise NotImplementedError

    def _local_error(self, event: Any) -> object:
        """The try-later reply to ``event`` when its handler failed."""
        raise NotImplementedError

    def _describe(self, event: Any) -> str:
        """The request, for log lines."""
        raise NotImplementedError

    def _in_progress(self) -> bool:
        """The codec is inside a transaction or a transfer."""
        raise NotImplementedError

    # --- Twisted ---

    @property
    def peer(self) -> str:
        return describe_peer(self._peer_host, self._peer_port)

    @property
    def busy(self) -> bool:
        """A transaction, a transfer or a handler call is in progress."""
        return self._open and (self._in_progress() or self._waiting)

    def _transport(self) -> _Transport:
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        self._open = True
        self._transport().registerProducer(self, True)
        address = self._transport().getPeer()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self._peer_host, self._peer_port = address.host, address.port
        self._tls = bool(ISSLTransport.providedBy(self.transport))
        self._codec.tls = self._tls
        refusal = self._refusal(self._factory.guard.connect(self, self._peer_host))
        if refusal is None:
            self._write(self._codec.greeting().to_bytes())
        else:
            data, close = refusal
            if close:
                self._codec.close()
                self._write(data)
                self._close()
                return
            self._write(data)
        self._arm_timer()
        if self._factory.session_timeout > 0:
            self._session_timer.restart(self._factory.session_timeout)

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            self._codec.receive_data(data)
        except Exception:
            self._crash()
            return
        if not self._waiting and self._codec.transferring:
            # Content is progress; a trickled command line is not (see the class).
            self._arm_timer()
        self._pump()

    def _start_tls(self) -> None:
        """After the protocol's go-ahead (SMTP 220, NNTP 382): TLS from the next octet on.

        The codec has thrown away what the client sent behind the command already,
        so nothing sent in the clear is taken as sent under TLS.
        """
        discarded = self._codec.discarded_after_starttls
        if discarded:
            log.info(
                "{kind} client {peer} sent {octets} octets behind STARTTLS; thrown away",
                kind=self.kind,
                peer=self.peer,
                octets=discarded,
            )
            self._codec.discarded_after_starttls = 0
        self._transport().startTLS(self._factory.tls)
        self._tls = True

    def close_with(self, reply: _Reply) -> None:
        """Send ``reply`` (a 421 or a 400, say) and close, whatever the session is doing."""
        self._write(reply.to_bytes())
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.guard.disconnect(self)
        if self._in_progress() or self._waiting:
            log.debug(
                "{kind} connection from {peer} lost during a transaction: {reason}",
                kind=self.kind,
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        self._open = False
        self._idle.stop()
        self._transfer_timer.stop()
        self._session_timer.stop()
        self._codec.close()

    # --- IPushProducer ---

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: answer nothing more until it drains."""
        self._write_blocked = True
        self._update_flow()

    def resumeProducing(self) -> None:
        """The client read what was written: go on with the commands buffered meanwhile."""
        if not self._write_blocked:
            return
        self._write_blocked = False
        if not self._waiting:
            self._arm_timer()  # the client is reading: that is activity
        self._pump()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    # --- the loop ---

    def _pump(self) -> None:
        # Re-entered when a handler's Deferred has already fired inside _call_handler;
        # the outer loop then picks up the answer, which keeps replies in order.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._open and not self._waiting and not self._write_blocked:
                event = self._codec.next_event()
                if event is None:
                    break
                self._handle_event(event)
                if self._open and not self._waiting:
                    self._arm_timer()  # a whole request: the client is active
            self._update_transfer()
            self._update_flow()
        except Exception:
            self._crash()
        finally:
            self._pumping = False

    def _crash(self) -> None:
        log.failure(
            "{kind} server error on the connection from {peer}", kind=self.kind, peer=self.peer
        )
        self._write(self._codec.abort().to_bytes())
        self._close()

    def _call_handler(self, event: object) -> None:
        try:
            result = self._ask(event)
        except Exception:
            log.failure(
                "{kind} handler failed on {request} for {peer}",
                kind=self.kind,
                request=self._describe(event),
                peer=self.peer,
                level=LogLevel.error,
            )
            self._try_later(event)
            return
        if inspect.isawaitable(result):
            self._waiting = True
            deferred: Deferred[Any] = Deferred.fromCoroutine(await_(result))
            deferred.addCallbacks(
                self._handler_done,
                self._handler_failed,
                callbackArgs=(event,),
                errbackArgs=(event,),
            )
            return
        self._answer(result, event)

    def _try_later(self, event: object) -> None:
        self._answer(self._local_error(event), event)

    def _handler_done(self, result: object, event: object) -> None:
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return  # the client went away; nothing may be written or delivered for it
        try:
            self._answer(result, event)
        except Exception:
            self._crash()
            return
        self._pump()

    def _handler_failed(self, failure: Failure, event: object) -> None:
        log.failure(
            "{kind} handler failed on {request} for {peer}",
            failure=failure,
            kind=self.kind,
            request=self._describe(event),
            peer=self.peer,
            level=LogLevel.error,
        )
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return
        try:
            self._try_later(event)
        except Exception:
            self._crash()
            return
        self._pump()

    # --- transport and time ---

    def _write(self, data: bytes) -> None:
        if self._open:
            self._transport().write(data)

    def _close(self, *, abort: bool = False) -> None:
        """Close after what was written is sent; ``abort`` drops it and closes now."""
        if not self._open:
            return
        self._open = False
        self._idle.stop()
        self._transfer_timer.stop()
        self._session_timer.stop()
        self._codec.close()
        # A transport closes only once its producer is gone (TLS waits for that,
        # TCP when the producer is paused as its buffer drains).
        self._transport().unregisterProducer()
        if abort:
            self._transport().abortConnection()
        else:
            self._transport().loseConnection()

    def _update_flow(self) -> None:
        if not self._open:
            return
        if self._waiting:
            self._idle.stop()
        elif not self._idle.running:
            self._arm_timer()
        buffered = self._codec.buffered
        pause = (self._waiting and buffered > 0) or (self._write_blocked and buffered >= READ_AHEAD)
        if pause and not self._paused:
            self._paused = True
            self._transport().pauseProducing()
        elif not pause and self._paused:
            self._paused = False
            self._transport().resumeProducing()

    def _arm_timer(self) -> None:
        # The factory's timeout is read each time: a reconfigured listener changes it.
        if self._open:
            self._idle.restart(self._factory.idle_timeout)

    def _update_transfer(self) -> None:
        """Start the transfer deadline when content begins to arrive, stop it when it ends."""
        transferring = self._open and self._codec.transferring
        if transferring and not self._transfer_timer.running:
            if self._factory.transfer_timeout > 0:
                self._transfer_timer.restart(self._factory.transfer_timeout)
        elif not transferring and self._transfer_timer.running:
            self._transfer_timer.stop()

    def _transfer_timed_out(self) -> None:
        if not self._open or not self._codec.transferring:
            return
        self._give_up(f"took more than {self._factory.transfer_timeout}s to send a message")

    def _session_timed_out(self) -> None:
        if not self._open:
            return
        if self._waiting:
            # A message is being handled: its answer goes out, then the session ends.
            self._session_timer.restart(1.0)
            return
        self._give_up(f"was connected for more than {self._factory.session_timeout}s")

    def _give_up(self, why: str) -> None:
        log.info(
            "{kind} client {peer} {why}; closing the connection",
            kind=self.kind,
            peer=self.peer,
            why=why,
        )
        self._write(self._codec.timeout().to_bytes())
        self._close(abort=self._write_blocked)

    def _timed_out(self) -> None:
        if not self._open or self._waiting:
            return
        log.info(
            "{kind} client {peer} sent nothing for {timeout}s; closing the connection",
            kind=self.kind,
            peer=self.peer,
            timeout=self._factory.idle_timeout,
        )
        self._write(self._codec.timeout().to_bytes())
        # A client that reads nothing would keep the connection open until the
        # write buffer drains, that is forever.
        self._close(abort=self._write_blocked)
