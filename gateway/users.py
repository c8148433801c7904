"""Users who may log in to a listener (SMTP AUTH, NNTP AUTHINFO): names and password hashes.

A users file has one ``name:hash`` line per user (``#`` comments, blank lines
ignored), the hash an Argon2id string that ``gateway passwd`` writes::

    alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$...

Listeners may also list users inline (``users: {name: hash}``). Passwords in
clear are refused, in the file and inline, with the line that holds one.
The file is read again at the next login after it changed, so adding a user
needs no reload; a file that has become unreadable keeps the users read last.

Checking a password costs tens of milliseconds and 64 MiB (that is the point
of Argon2): it runs in the reactor's thread pool, at most ``PARALLEL`` at a
time, and an unknown user costs the same as a wrong password, so timing does
not tell which names exist.
"""

from __future__ import annotations

import enum
import functools
import hmac
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger(namespace="gateway.users")

# Argon2id with RFC 9106's second recommended parameters (argon2-cffi's defaults).
_HASHER = PasswordHasher()
PARALLEL = 2
# A failed login is answered this much later (as Dovecot's auth_failure_delay).
FAILURE_DELAY = 1.0
# A good login is remembered this long, for this many logins (Dovecot's auth_cache_ttl and
# auth_cache_size): a client's next connections need no Argon2 check.
CACHE_TTL = 600.0
CACHE_SIZE = 4096
HASH_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")


class UsersError(ValueError):
    """A users file or an inline entry that cannot be used; says where."""

    key = ""  # the configuration key the problem is about, when there is one


def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` with a fresh salt, for a users file."""
    return _HASHER.hash(password)


def is_hash(value: str) -> bool:
    return value.startswith(HASH_PREFIXES)


def check_password(hashed: str, password: str) -> bool:
    """Whether ``password`` is the one ``hashed`` was made from (blocking: run in a thread)."""
    try:
        return _HASHER.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy() -> str:
    """A hash to check unknown users against, so that they cost what a known one does."""
    return hash_password("no user has this password: it only keeps the timing even")


def _check(hashed: str | None, password: str) -> bool:
    # In the thread: the stand-in hash for an unknown user is made there too (once).
    return check_password(hashed or _dummy(), password)


def parse_users(text: str, where: str) -> dict[str, str]:
    """``name:hash`` lines as a dict; UsersError names ``where`` and the line of a bad one."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, hashed = line.partition(":")
        if not colon or not name or any(c.isspace() for c in name):
            raise UsersError(f"{where}:{number}: expected 'name:hash' (a name without spaces)")
        if not is_hash(hashed):
            raise UsersError(
                f"{where}:{number}: the password of '{name}' is not an Argon2 hash; write the"
                f" line with 'gateway passwd -f {where} {name}'"
            )
        if name in users:
            raise UsersError(f"{where}:{number}: '{name}' is listed twice")
        users[name] = hashed
    return users


def read_users_file(path: str | Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersError(f"cannot read the users file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsersError(f"the users file {path} is not UTF-8 text") from None
    return parse_users(text, str(path))


def check_inline(users: Mapping[str, str]) -> None:
    """Inline ``users:`` must hold hashes too."""
    for name, hashed in users.items():
        if not is_hash(hashed):
            raise ValueError(
                f"the password of user '{name}' is not an Argon2 hash; make one with"
                f" 'gateway passwd {name}' and put it here (or in a users_file)"
            )


def check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or ":" in name or name.startswith("#"):
        raise UsersError(f"a user name has no spaces or colons and does not start with #: {name!r}")


def check_settings(users: Mapping[str, str], users_file: str | None, require_auth: bool) -> None:
    """A listener's login settings, checked when the configuration is read (ValueError)."""
    if require_auth and not users and users_file is None:
        raise ValueError("require_auth needs 'users' or 'users_file' to authenticate against")
    check_inline(users)
    if users_file is not None:
        try:
            read_users_file(users_file)  # a bad line is an error at check time
        except UsersError as exc:
            exc.key = "users_file"  # reported at the line that names the file
            raise


def write_user(path: Path, name: str, password: str) -> bool:
    """Add ``name`` to the users file at ``path`` or change its password (True: it was new).

    The file is replaced at once (written beside it, then renamed), keeps its
    comments and other users, and is made readable by its owner only.
    """
    check_name(name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    entry = f"{name}:{hash_password(password)}"
    new = True
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0] == name and not line.lstrip().startswith("#"):
            lines[index] = entry
            new = False
    if new:
        lines.append(entry)
    parse_users("\n".join(lines), str(path))  # refuse to write a file that would not load
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return new


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class Login(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # a wrong name or password, answered FAILURE_DELAY late
    LIMITED = "limited"  # the client failed too often: not even checked


class _Counts(Protocol):
    """What a login needs of the listener's Guard (its rates and counters)."""

    auth_failures: int

    def over(self, limit: str, host: str, user: str = "") -> float: ...
    def throttle(self, limit: str, host: str, user: str = "") -> float: ...


class Users:
    """The users of one listener: inline ones and those of its users file."""

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.name = name  # the listener, for the log
        self._inline: dict[str, str] = {}
        self._path: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.users: dict[str, str] = {}
        self._limit = DeferredSemaphore(PARALLEL)
        self._now: Any = getattr(reactor, "seconds", time.monotonic)
        self._key = os.urandom(32)  # keys the cache of good logins (never written anywhere)
        self._good: dict[bytes, float] = {}  # login token -> until when it is good
        self._checking: dict[bytes, list[Deferred[bool]]] = {}  # checks in progress

    @property
    def available(self) -> bool:
        """Logging in is offered: some users are configured (the file may be empty for now)."""
        return bool(self._inline) or self._path is not None

    def configure(
        self, inline: Mapping[str, str], path: str | None, *, strict: bool = True
    ) -> None:
        """Take the settings and read the file; a bad file raises UsersError when ``strict``
        (at start), else is logged and the users read before stay."""
        self._inline = dict(inline)
        self._path = path
        self._stamp = None
        try:
            self.users = self._load()
        except UsersError as exc:
            if strict:
                raise
            log.error(
                "listener {listener}: {error}; the previous users stay in force",
                listener=self.name,
                error=str(exc),
            )

    def _load(self) -> dict[str, str]:
        users = dict(self._inline)
        if self._path is not None:
            self._stamp = _stamp(self._path)
            users.update(read_users_file(self._path))
        return users

    def refresh(self) -> None:
        """Read the users file again when it changed, so that edits need no reload."""
        if self._path is None or _stamp(self._path) == self._stamp:
            return
        try:
            self.users = self._load()
        except UsersError as exc:
            log.error(
                "listener {listener}: {error}; the previous users stay in force",
                listener=self.name,
                error=str(exc),
            )

    async def log_in(
        self, guard: _Counts, host: str, user: str, password: str
    ) -> tuple[Login, float]:
        """One login attempt from ``host``, as every listener with logins takes it: refused
        unchecked past the client's auth_failure_rate (with the seconds to wait), a
        failure counted against that rate and answered FAILURE_DELAY late."""
        wait = guard.over("auth_failure_rate", host)
        if wait:
            log.info(
                "listener {listener}: {client} failed to log in too often; refused",
                listener=self.name,
                client=host,
            )
            return Login.LIMITED, wait
        if await self.verify(user, password):
            log.info(
                "listener {listener}: {client} authenticated as {user}",
                listener=self.name,
                client=host,
                user=user,
            )
            return Login.OK, 0.0
        guard.throttle("auth_failure_rate", host)
        guard.auth_failures += 1
        log.info(
            "listener {listener}: authentication of {client} as {user} failed",
            listener=self.name,
            client=host,
            user=user,
        )
        await deferLater(self.reactor, FAILURE_DELAY)
        return Login.FAILED, 0.0

    async def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s (False for an unknown user, after as long).

        A good login is remembered for CACHE_TTL seconds, as Dovecot's auth cache does
        (under an HMAC with a key made at start: the password itself is not kept), and
        the same login checked by several connections at once is checked once: a client
        that opens many connections (an FTP client's parallel transfers, a mail program)
        costs one Argon2 check, not one per connection. A changed password or users file
        changes the stored hash, and with it the key of the cache.
        """
        self.refresh()
        hashed = self.users.get(user)
        if hashed is None:
            await self._argon2(None, password)  # as long as a known user's check takes
            return False
        token = hmac.new(
            self._key,
            "\0".join((user, password, hashed)).encode("utf-8", "surrogatepass"),
            "sha256",
        ).digest()
        expiry = self._good.get(token)
        if expiry is not None and expiry > self._now():
            return True
        waiting = self._checking.get(token)
        if waiting is not None:
            follower: Deferred[bool] = Deferred()
            waiting.append(follower)
            return await follower
        followers: list[Deferred[bool]] = []
        self._checking[token] = followers
        try:
            good = await self._argon2(hashed, password)
        except BaseException as exc:
            del self._checking[token]
            for follower in followers:
                follower.errback(exc)
            raise
        del self._checking[token]
        if good:
            if len(self._good) >= CACHE_SIZE:
                self._good.pop(next(iter(self._good)))  # the oldest
            self._good[token] = self._now() + CACHE_TTL
        for follower in followers:
            follower.callback(good)
        return good

    async def _argon2(self, hashed: str | None, password: str) -> bool:
        pool = getattr(self.reactor, "getThreadPool", None)
        if pool is None:  # a reactor without threads (a test clock): check here
            return _check(hashed, password)
        await self._limit.acquire()
        try:
            good: bool = await deferToThreadPool(self.reactor, pool(), _check, hashed, password)
        finally:
            self._limit.release()
        return good
