"""Running under systemd: sd_notify readiness and watchdog pings, and inherited sockets.

``notify()`` is the sd_notify protocol (a datagram to ``$NOTIFY_SOCKET``);
``Notifier`` tells systemd what the gateway is doing and pings the watchdog
from the reactor, so an event loop that blocks stops the pings and systemd
restarts the process.  ``inherited_datagram_socket()`` finds the UDP socket a
``udp:systemd:`` endpoint names among the sockets systemd passed (LISTEN_FDS).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import task
from twisted.python.systemd import ListenFDs


class SocketActivationError(ValueError):
    """An endpoint names a socket systemd did not pass; the message says what it did pass."""


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` ("READY=1", "STATUS=...", several lines) to systemd.

    True if it was sent; False when not run by systemd (no $NOTIFY_SOCKET) or
    the socket cannot take it.  Never raises: systemd's view is a courtesy,
    not a reason to stop serving.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract socket namespace
    elif not address.startswith("/"):
        return False  # unset, or a kind we do not speak (vsock:)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8", "replace"))
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds systemd waits for a WATCHDOG=1 ping (WatchdogSec=), or None when it does not."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a wrapper that exec'd us would match)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """Reports the gateway's state changes to systemd and pings its watchdog.

    ``on_state`` takes the GatewayService's states (ready, reloading,
    stopping); ``start()`` runs a LoopingCall on the reactor that pings at half
    the watchdog interval and refreshes STATUS= when the summary changed.
    """

    status_interval = 10.0  # seconds between STATUS= refreshes without a watchdog

    def __init__(
        self,
        reactor: Any,
        status: Callable[[], str],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.reactor = reactor
        self.status = status
        self.watchdog = watchdog_interval(self.environ)
        self.enabled = bool(self.environ.get("NOTIFY_SOCKET"))
        self._loop: task.LoopingCall | None = None
        self._last_status = ""
        self._failure = ""  # why it could not start: the status from then on

    def send(self, *lines: str) -> bool:
        return self.enabled and notify("\n".join(lines), self.environ)

    def start(self) -> None:
        if not self.enabled:
            return
        interval = self.watchdog / 2 if self.watchdog else self.status_interval
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(interval, now=self.watchdog is not None)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def failed(self, reason: str) -> None:
        """Start-up failed: say why, and keep saying it while the gateway stops."""
        self._failure = f"cannot start: {reason}"
        self._last_status = self._failure
        self.send(f"STATUS={self._failure}")

    def _status(self) -> str:
        return self._failure or self.status()

    def _tick(self) -> None:
        lines = ["WATCHDOG=1"] if self.watchdog else []
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            lines.append(f"STATUS={status}")
        if lines:
            self.send(*lines)

    def on_state(self, state: str) -> None:
        status = self._status()
        self._last_status = status
        if state == "ready":
            self.send("READY=1", f"STATUS={status}")
        elif state == "reloading":
            # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this reload.
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._last_status = "reloading the configuration"
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={self._last_status}")
        elif state == "stopping":
            self.send("STOPPING=1", f"STATUS={status}")
        else:
            self.send(f"STATUS={status}")


# --- sockets passed by systemd ---------------------------------------------------------


def inherited_fds() -> ListenFDs:
    """The sockets systemd passed (LISTEN_FDS, LISTEN_FDNAMES).

    Twisted reads them once, when ``twisted.internet.endpoints`` is imported,
    and removes LISTEN_FDS from the environment, so its reading is the one
    left to use.
    """
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    return fds if isinstance(fds, ListenFDs) else ListenFDs.fromEnvironment()


def _socket_kind(fd: int) -> tuple[int, int]:
    """The address family and type of the socket on ``fd``."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return int(probe.family), int(probe.type)
    finally:
        probe.close()


def inherited_datagram_socket(
    description: str,
    index: int | None,
    name: str | None,
    domain: str | None = None,
    fds: ListenFDs | None = None,
) -> tuple[int, int]:
    """The file descriptor and address family of the UDP socket ``description`` names.

    Raises SocketActivationError with a sentence saying what systemd passed when there is
    no such socket or it is not a UDP socket.
    """
    fds = inherited_fds() if fds is None else fds
    candidates = _find(description, index, name, fds)
    if name is not None:
        # One .socket unit gives all its sockets the same name: take its UDP one.
        datagram = [fd for fd in candidates if _socket_kind(fd)[1] == socket.SOCK_DGRAM]
        if len(datagram) > 1:
            raise SocketActivationError(
                f"{description}: {len(datagram)} UDP sockets are named '{name}'; use index="
            )
        candidates = datagram or candidates
    fd = candidates[0]
    family, kind = _socket_kind(fd)
    if kind != socket.SOCK_DGRAM or family not in (socket.AF_INET, socket.AF_INET6):
        raise SocketActivationError(
            f"{description}: socket {fd} is not a UDP socket; UDP takes a ListenDatagram= line"
            " of the .socket unit (a ListenStream= one takes systemd:domain=INET6:index=N)"
        )
    if domain is not None and family != getattr(socket, "AF_" + domain):
        actual = "INET6" if family == socket.AF_INET6 else "INET"
        raise SocketActivationError(
            f"{description}: socket {fd} is an {actual} socket, not {domain}"
        )
    return fd, family


def inherited_stream_socket(
    description: str, index: int | None, name: str | None, fds: ListenFDs | None = None
) -> int:
    """The file descriptor of the stream socket a ``systemd:`` endpoint names.

    Raises SocketActivationError with a sentence saying what systemd passed
    when there is no such socket or it is not a stream socket.
    """
    fds = inherited_fds() if fds is None else fds
    candidates = _find(description, index, name, fds)
    if name is not None:
        # One .socket unit gives all its sockets the same name: take its stream one.
        stream = [fd for fd in candidates if _socket_kind(fd)[1] == socket.SOCK_STREAM]
        candidates = stream[-1:] or candidates
    _, kind = _socket_kind(candidates[0])
    if kind != socket.SOCK_STREAM:
        raise SocketActivationError(
            f"{description}: socket {candidates[0]} is not a stream socket; TCP takes a"
            " ListenStream= line of the .socket unit (a ListenDatagram= one takes"
            " udp:systemd:index=N)"
        )
    return candidates[0]


def _find(description: str, index: int | None, name: str | None, fds: ListenFDs) -> list[int]:
    descriptors = fds.inheritedDescriptors()
    # ListenFDs maps names to descriptors, so equal names collapse there; keep them all.
    names = [str(n) for n in getattr(fds, "_names", ())]
    if not descriptors:
        passed = (
            "systemd passed no sockets to this process (it needs LISTEN_FDS and"
            " LISTEN_FDNAMES; systemd-socket-activate sets the names only with --fdname):"
            " start it through its .socket unit, or listen on a port of its own"
        )
    else:
        passed = f"systemd passed {len(descriptors)}, named {':'.join(names)}"
    if index is not None:
        if not 0 <= index < len(descriptors):
            raise SocketActivationError(
                f"{description}: there is no inherited socket number {index}; {passed}"
            )
        return [descriptors[index]]
    found = [fd for fd, n in zip(descriptors, names, strict=False) if n == name]
    if not found:
        raise SocketActivationError(
            f"{description}: no inherited socket is named '{name}'; {passed}"
        )
    return found


def server_endpoint(reactor: Any, description: str) -> Any:
    """``serverFromString``, but ``systemd:`` endpoints are ours.

    Twisted's closes the passed socket once it listens on a copy, so a reload
    that reopens the listener could not take it again (or would take whatever
    socket got its number since).  Ours hands Twisted a copy and keeps the
    original, and says clearly when systemd did not pass the socket.
    """
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

    if not description.lower().startswith("systemd:"):
        return serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    from gateway.config import systemd_endpoint_args

    domain, index, name = systemd_endpoint_args(description)
    fd = inherited_stream_socket(description, index, name)
    # Twisted's accept loop runs until the socket would block, but leaves making it
    # non-blocking to us (systemd-socket-activate passes blocking ones).
    os.set_blocking(fd, False)
    family = getattr(socket, f"AF_{domain}")
    return AdoptedStreamServerEndpoint(reactor, os.dup(fd), family)  # type: ignore[no-untyped-call]
