"""The ``nntp-poll`` listener: follows newsgroups on a news server and routes each new article.

For servers that will not feed the gateway, it pulls: every ``interval`` it
connects, and for each group sends GROUP, OVER (XOVER, or probing numbers
when neither is known) and ARTICLE for the articles past its high-water
mark, and hands each to ``gateway.submit``.

The high-water mark, one per (server, group), is kept in the spool's state
table and is written in the same SQLite transaction that stores the article,
so the mark moves exactly when the article is safe: a crash or ``kill -9``
at any moment neither loses an article nor hands one on twice.  A mark moves
past an article only on a delivered verdict (or a permanent refusal, which is
logged: one bad article must not stop the group); a temporary verdict stops
the group until the next poll.  A group whose numbers went backwards
(renumbered or re-created) is found again by the Message-ID of the last
article handed on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.listening import Listener, ListeningPort, message_metric
from gateway.message import Article
from gateway.ports import GatewayPort, Metric, Status
from gateway.protocols.nntp.client import (
    NntpSession,
    NntpSessionError,
    describe_endpoint,
    open_session,
)
from gateway.protocols.nntp.config import NntpPollerConfig

__all__ = ["Mark", "NntpPoller", "mark_key"]

log = Logger(namespace="gateway.nntp.poller")

# Longest wait between attempts while the server is unreachable.
_MAX_BACKOFF = 300.0
# Once the waits between attempts are at their longest, a failure that repeats with
# the same reason is logged again only after this long, so a news server that is not
# there (yet) does not fill the log.
_REPEAT_LOG = 3600.0


@dataclass(frozen=True)
class Mark:
    """The last article number handed on in a group, and its Message-ID ("" if unknown)."""

    number: int
    msgid: str = ""

    def encode(self) -> str:
        return f"{self.number} {self.msgid}".rstrip()

    @classmethod
    def decode(cls, text: str) -> Mark | None:
        number, _, msgid = text.partition(" ")
        try:
            return cls(int(number), msgid.strip())
        except ValueError:
            return None


def mark_key(connect: str, group: str) -> str:
    """The spool state key of a group's high-water mark on one server."""
    return f"nntp-poll {connect} {group}"


class NntpPoller(Listener[NntpPollerConfig]):
    """One ``nntp-poll`` listener: a loop that polls its groups until stopped.

    It opens no socket: ``open`` starts the loop and keeps the poller itself
    as its "port", whose ``stopListening`` stops it.
    """

    def __init__(
        self,
        config: NntpPollerConfig,
        gateway: GatewayPort,
        reactor: Any,
        *,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """``endpoint`` replaces the one made from ``connect`` (for tests)."""
        super().__init__(config, gateway, reactor)
        self.endpoint = endpoint
        self.rejected = 0  # articles refused for good (skipped)
        self.tempfail = 0  # articles not taken for now (tried again at the next poll)
        self.polls = 0  # completed poll rounds (tests wait on it)
        self.failures = 0  # consecutive rounds that could not reach the server
        self._running: Deferred[None] | None = None
        self._sleep: Deferred[None] | None = None
        self._stopping = False
        self._submitting = False
        self._missing: set[str] = set()  # groups reported missing, so the log says it once
        self._failure_logged: tuple[str, float] | None = None  # last reason logged, and when
        self._done: list[Deferred[None]] = []

    @property
    def server(self) -> str:
        return str(self.config.connect)

    # ----------------------------------------------------------------- life cycle

    async def open(self) -> None:
        self.ports.append(await self.start_polling())
        log.info(
            "listener {listener} ({protocol}) started",
            listener=self.name,
            protocol=self.config.protocol,
        )

    async def listen_on(self, description: str) -> ListeningPort:
        raise ValueError("an nntp-poll listener opens no socket; it connects to 'connect'")

    def metrics(self) -> Iterable[Metric]:
        yield message_metric(self.name, self.accepted, self.rejected, self.tempfail)

    async def start_polling(self) -> NntpPoller:
        if self._running is None:
            self._stopping = False
            self._running = Deferred.fromCoroutine(self._loop())
            self._running.addErrback(self._crashed)
        return self

    def _crashed(self, failure: Failure) -> None:
        if not isinstance(failure.value, CancelledError):
            log.failure(
                "the NNTP poller {listener} stopped on an error",
                failure,
                listener=self.config.name,
            )

    def stopListening(self) -> Deferred[None]:
        """Stop after the article being submitted (if any); fires once stopped."""
        self._stopping = True
        running = self._running
        if running is None or running.called:
            return Deferred.fromCoroutine(_nothing())
        done: Deferred[None] = Deferred()
        self._done.append(done)
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        elif not self._submitting:
            running.cancel()  # waiting on the news server: nothing to finish
        return done

    def reconfigure(self, config: NntpPollerConfig) -> None:
        """New groups or settings: used from the next poll, which starts now."""
        self.config = config
        self._missing.clear()
        self.failures = 0
        self._failure_logged = None
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()

    # ----------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    await self._poll_once()
                    if self.failures:
                        log.info(
                            "NNTP poller {listener}: {server} answers again after {count}"
                            " failed poll(s)",
                            listener=self.config.name,
                            server=self.server,
                            count=self.failures,
                        )
                    self.failures = 0
                    self._failure_logged = None
                    delay = float(self.config.interval)
                except Exception as exc:
                    # Nothing stops the poller for good: the server, the spool or a bug
                    # may be fixed, so it backs off and tries again.
                    self.failures += 1
                    interval = max(float(self.config.interval), 0.1)
                    longest = max(interval, _MAX_BACKOFF)
                    delay = min(interval * 2 ** (self.failures - 1), longest)
                    if isinstance(exc, NntpSessionError):
                        self._log_failure(exc.text, delay, delay >= longest)
                    else:
                        log.failure(
                            "NNTP poller {listener}: error while polling; next attempt in"
                            " {delay:g}s",
                            listener=self.config.name,
                            delay=delay,
                        )
                self.polls += 1
                if self._stopping:
                    break
                self._sleep = task.deferLater(cast(IReactorTime, self.reactor), delay, _noop)
                try:
                    await self._sleep
                except CancelledError:
                    pass
                finally:
                    self._sleep = None
        finally:
            self._running = None
            done, self._done = self._done, []
            for deferred in done:
                deferred.callback(None)

    def _log_failure(self, reason: str, delay: float, longest: bool) -> None:
        """Warn of a failed poll; once the waits are ``longest``, the same reason once an hour."""
        now = float(self.reactor.seconds())
        last = self._failure_logged
        if longest and last is not None and last[0] == reason:
            if now - last[1] < _REPEAT_LOG:
                return
            self._failure_logged = (reason, now)
            log.warn(
                "NNTP poller {listener}: still failing after {count} poll(s): {reason};"
                " next attempt in {delay:g}s",
                listener=self.config.name,
                count=self.failures,
                reason=reason,
                delay=delay,
            )
            return
        self._failure_logged = (reason, now)
        log.warn(
            "NNTP poller {listener}: {reason}; next attempt in {delay:g}s",
            listener=self.config.name,
            reason=reason,
            delay=delay,
        )

    async def _poll_once(self) -> None:
        config = self.config
        endpoint = self.endpoint
        if endpoint is None:
            endpoint = clientFromString(self.reactor, str(config.connect))  # type: ignore[no-untyped-call]
        session = await open_session(
            self.reactor,
            endpoint,
            connect_timeout=float(config.connect_timeout),
            timeout=float(config.timeout),
            mode="reader",
            user=config.user,
            password=config.password,
            server=describe_endpoint(endpoint),
        )
        try:
            for group in config.groups:
                if self._stopping:
                    break
                await self._poll_group(session, group)
        finally:
            await session.quit()

    # ----------------------------------------------------------------- one group

    async def _load_mark(self, group: str) -> Mark | None:
        text = await self.gateway.get_state(mark_key(self.server, group))
        if text is None:
            return None
        mark = Mark.decode(text)
        if mark is None:
            log.error(
                "NNTP poller {listener}: the stored mark {text!r} of {group} is unreadable;"
                " starting the group afresh",
                listener=self.config.name,
                text=text,
                group=group,
            )
        return mark

    async def _save_mark(self, group: str, mark: Mark) -> None:
        await self.gateway.set_state(mark_key(self.server, group), mark.encode())

    async def _select(self, session: NntpSession, group: str) -> tuple[int, int, int] | None:
        """GROUP: (count, low, high), or None when the group cannot be read now."""
        reply = await session.group(group)
        if reply.code == 211:
            try:
                count, low, high = (int(x) for x in reply.text.split()[:3])
            except ValueError:
                log.warn(
                    "NNTP poller {listener}: {server} sent a malformed GROUP reply: {reply}",
                    listener=self.config.name,
                    server=session.server,
                    reply=str(reply),
                )
                return None
            if group in self._missing:
                self._missing.discard(group)
                log.info(
                    "NNTP poller {listener}: group {group} is there again",
                    listener=self.config.name,
                    group=group,
                )
            return count, low, high
        if reply.code == 480:
            raise NntpSessionError(
                f"{session.server} wants authentication to read {group} ({reply});"
                " set user and password on the listener"
            )
        if group not in self._missing:
            self._missing.add(group)
            log.warn(
                "NNTP poller {listener}: cannot select {group} on {server}: {reply};"
                " trying again at each poll",
                listener=self.config.name,
                group=group,
                server=session.server,
                reply=str(reply),
            )
        return None

    async def _poll_group(self, session: NntpSession, group: str) -> None:
        selected = await self._select(session, group)
        if selected is None:
            return
        count, low, high = selected
        mark = await self._load_mark(group)
        if mark is None:
            start = high if self.config.start == "new" or count == 0 else low - 1
            mark = Mark(max(start, 0))
            await self._save_mark(group, mark)
            log.info(
                "NNTP poller {listener}: following {group} from article {first}",
                listener=self.config.name,
                group=group,
                first=mark.number + 1,
            )
        mark = await self._check_numbering(session, group, mark, low, high)
        while mark.number < high and not self._stopping:
            advanced = await self._fetch_batch(session, group, mark, high)
            if advanced is None or advanced == mark:
                return
            mark = advanced

    async def _check_numbering(
        self, session: NntpSession, group: str, mark: Mark, low: int, high: int
    ) -> Mark:
        """The mark, moved when the group's numbers no longer match it (renumbered)."""
        renumbered = high < mark.number
        if not renumbered and mark.msgid and low <= mark.number <= high:
            reply = await session.stat(mark.number)
            if reply.code == 223:
                words = reply.text.split()
                renumbered = len(words) > 1 and words[1] != mark.msgid
        if not renumbered:
            return mark
        found = await self._find(session, mark.msgid, low, high) if mark.msgid else None
        if found is not None:
            new = Mark(found, mark.msgid)
        elif not mark.msgid and self.config.start == "new":
            new = Mark(high)  # nothing to find it by: as on first sight, only what comes next
        else:
            new = Mark(max(low - 1, 0))
        log.warn(
            "NNTP poller {listener}: the article numbers of {group} changed (now {low}-{high},"
            " our mark was {old}); {how}",
            listener=self.config.name,
            group=group,
            low=low,
            high=high,
            old=mark.number,
            how=(
                f"the last article handed on is now number {found}; going on after it"
                if found is not None
                else f"the last article handed on is not there; going on after {new.number}"
            ),
        )
        await self._save_mark(group, new)
        return new

    async def _find(self, session: NntpSession, msgid: str, low: int, high: int) -> int | None:
        """The number of ``msgid`` in the selected group, by walking its overview."""
        step = max(self.config.batch, 100)
        first = max(low, 1)
        while first <= high:
            last = min(high, first + step - 1)
            reply = await session.over(first, last)
            if reply.code != 224:
                return None
            for number, overview_id in _overview(reply.block or b""):
                if overview_id == msgid:
                    return number
            first = last + 1
        return None

    async def _fetch_batch(
        self, session: NntpSession, group: str, mark: Mark, high: int
    ) -> Mark | None:
        """Hand on the articles after ``mark`` up to one batch; the new mark, None to stop."""
        first = mark.number + 1
        last = min(high, mark.number + self.config.batch)
        reply = await session.over(first, last)
        if reply.code == 224:
            numbers = [number for number, _ in _overview(reply.block or b"")]
            numbers = sorted(n for n in set(numbers) if first <= n <= last)
        elif reply.code == 423:
            numbers = []  # none left in the range (expired or cancelled)
        elif reply.code in (412, 480):
            raise NntpSessionError(f"{session.server} refused OVER on {group}: {reply}")
        else:
            numbers = list(range(first, last + 1))  # no overview: probe each number
        for number in numbers:
            if self._stopping:
                break
            reply = await session.article(number)
            if reply.code in (423, 430):
                mark = Mark(number)  # gone between OVER and ARTICLE
                continue
            if reply.code != 220 or reply.block is None:
                log.warn(
                    "NNTP poller {listener}: {server} answered ARTICLE {number} in {group}"
                    " with {reply}; trying again at the next poll",
                    listener=self.config.name,
                    server=session.server,
                    number=number,
                    group=group,
                    reply=str(reply),
                )
                await self._save_mark(group, mark)
                return None
            article = Article.from_bytes(
                reply.block, listener=self.config.name, client=session.server
            )
            msgid = article.message_id or ""
            candidate = Mark(number, msgid)
            self._submitting = True
            try:
                verdict = await self.gateway.submit(
                    article, state={mark_key(self.server, group): candidate.encode()}
                )
            finally:
                self._submitting = False
            if verdict.status is Status.TEMPORARY:
                self.tempfail += 1
                log.warn(
                    "NNTP poller {listener}: article {number} {msgid} of {group} not taken"
                    " ({detail}); trying again at the next poll",
                    listener=self.config.name,
                    number=number,
                    msgid=msgid,
                    group=group,
                    detail=verdict.detail,
                )
                await self._save_mark(group, mark)
                return None
            if verdict.status is Status.PERMANENT:
                self.rejected += 1
                log.error(
                    "NNTP poller {listener}: article {number} {msgid} of {group} refused for"
                    " good ({detail}); skipped",
                    listener=self.config.name,
                    number=number,
                    msgid=msgid,
                    group=group,
                    detail=verdict.detail,
                )
            else:
                self.accepted += 1
            mark = candidate
        if not self._stopping:
            mark = Mark(last, mark.msgid) if mark.number < last else mark
        # Usually already stored with the article; needed after skips, drops and refusals.
        await self._save_mark(group, mark)
        return mark


def _overview(block: bytes) -> list[tuple[int, str]]:
    """(number, Message-ID) of each OVER line; malformed lines are skipped."""
    out = []
    for line in block.split(b"\n"):
        fields = line.split(b"\t")
        if len(fields) < 5:
            continue
        try:
            number = int(fields[0])
        except ValueError:
            continue
        out.append((number, fields[4].decode("utf-8", "replace").strip()))
    return out


def _noop() -> None:
    return None


async def _nothing() -> None:
    return None
