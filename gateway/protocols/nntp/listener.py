"""The NNTP listener: the gateway's side of the NNTP server.

The protocol code in ``server.py`` parses the conversation; this module makes
the decisions: who may connect, whose credentials are good, which offered
articles are wanted, and what to answer once an article is handled.

Answers follow the verdict of ``GatewayService.submit``; success is sent only
once the article is in the spool:

========  =========  ========================  =================
command   delivered  temporary failure         permanent refusal
========  =========  ========================  =================
POST      240        441 436 (retry)           441
IHAVE     235        436                       437
TAKETHIS  239        400, connection closed    439
========  =========  ========================  =================

TAKETHIS has only 239 and 439 (RFC 4644), and 439 tells the peer never to
send the article again.  A temporary failure (spool full, a transform that
failed) therefore answers 400 and closes the connection: the peer keeps
every article it has not seen acknowledged and offers it again later.

Duplicates: message-ids of articles this listener accepted are kept in
memory (the newest ``remember`` of them, lost on restart), so a second offer
gets 435 (IHAVE) or 438 (CHECK) and a second copy 437 / 439 / 441.  An
article whose message-id is being handled on another connection makes
IHAVE and CHECK answer 436 / 431 (try later); a copy that arrives anyway
waits for the first one's verdict.  Destinations have their own duplicate
window for what this record forgets.

A relayed article (IHAVE, TAKETHIS) must carry the Message-ID of its
command, in the ``<left@right>`` form of RFC 5536 (offers of other forms get
435 / 438), and the header fields RFC 5536 requires; an article with two
Message-ID, Subject, Date, ... fields is refused (posted ones too).  One whose Path already
holds this listener's ``hostname`` is refused as a loop, the others get it
put in front of Path (RFC 5537 section 3.3).

POST injects the article as RFC 5537 section 3.5 asks: it adds Message-ID
and Date when missing, puts this listener's path identity with ".POSTED"
in front of Path, and adds Injection-Date and Injection-Info; an article that
carries Injection-Date or Injection-Info was injected already and is refused.
"""

from __future__ import annotations

import email.utils
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.listening import StreamListener, duration_metric, message_metric, retry_after
from gateway.message import Article, new_message_id
from gateway.ports import GatewayPort, Metric, Status, Verdict
from gateway.protocols._line_server import drain_sessions
from gateway.protocols.nntp.codec import Response, is_message_id
from gateway.protocols.nntp.config import NntpListenerConfig
from gateway.protocols.nntp.server import NntpServerFactory, NntpSession
from gateway.stats import Histogram
from gateway.users import Login, Users

log = Logger(namespace="gateway.nntp.listener")

# Header fields a relayed article (IHAVE, TAKETHIS) must have (RFC 5536 section 3.1).
_TRANSIT_REQUIRED = ("From", "Newsgroups", "Subject", "Date", "Path")
# Header fields a posted article must have; the rest are added by injection.
_POST_REQUIRED = ("From", "Newsgroups", "Subject")
# Header fields an article may carry at most once (RFC 5322 section 3.6, RFC 5536 section 3).
_SINGLE_FIELD_NAMES = (
    "Message-ID",
    "Date",
    "From",
    "Subject",
    "Newsgroups",
    "Path",
    "Sender",
    "Reply-To",
    "References",
    "Followup-To",
    "Control",
    "Supersedes",
    "Approved",
    "Distribution",
    "Expires",
    "Organization",
    "Summary",
    "Injection-Date",
    "Injection-Info",
    "Xref",
)
_SINGLE_FIELDS = {name.lower(): name for name in _SINGLE_FIELD_NAMES}
_NEWSGROUP = re.compile(r"[A-Za-z0-9+_-]+(?:\.[A-Za-z0-9+_-]+)*\Z")


def article_syntax_problem(data: bytes) -> str:
    """Why an article (LF line endings) is not one a news server takes, in INN's words; or "".

    As innd does: a header line must be a field ("Name: value") or a continuation
    line, with no space before the colon and a space after it; NUL is allowed
    nowhere; and an empty line must separate the header from the body. Mail's
    reading (a bad line ends the header) would make a bad article look good.
    """
    end = data.find(b"\n\n")
    if data.startswith(b"\n"):
        end = 0
    header = data if end < 0 else data[: end + 1]
    if b"\x00" in header:
        return "Nul character in header"
    for line in header.split(b"\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        text = line.decode("utf-8", "replace")[:200]
        colon = line.find(b":")
        if colon <= 0:
            return f'No colon-space in "{text}" header field'
        name = line[:colon]
        if name != name.rstrip(b" \t"):
            shown = name.rstrip().decode("utf-8", "replace")[:200]
            return f'Space before colon in "{shown}" header field'
        if colon + 1 < len(line) and line[colon + 1 : colon + 2] not in (b" ", b"\t"):
            return f'No colon-space in "{text}" header field'
    if end < 0:
        return "No body"
    if b"\x00" in data[end:]:
        return "Nul character in body"
    return ""


class RecentIds:
    """The newest ``limit`` message-ids seen, in memory; older ones are forgotten."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 0)
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        self.resize(self.limit)

    def resize(self, limit: int) -> None:
        self.limit = max(limit, 0)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)


class _Answers:
    """The responses of one command for each outcome."""

    def __init__(self, ok: int, temporary: int, permanent: int, *, with_id: bool) -> None:
        self.ok = ok
        self.temporary = temporary
        self.permanent = permanent
        self.with_id = with_id  # RFC 4644 responses start with the message-id

    def make(self, code: int, message_id: str, text: str) -> Response:
        if self.with_id:
            return Response(code, f"{message_id} {text}".strip())
        return Response(code, text)


_ANSWERS = {
    "POST": _Answers(240, 441, 441, with_id=False),
    "IHAVE": _Answers(235, 436, 437, with_id=False),
    "TAKETHIS": _Answers(239, 400, 439, with_id=True),
}


def refusal(verdict: Verdict) -> str:
    """The answer to a POST the gateway refuses (for route tests and dry runs)."""
    return f"{_ANSWERS['POST'].permanent} {verdict.detail}"


class NntpListener(StreamListener[NntpListenerConfig]):
    """One configured NNTP listener: its server factory, and the server's NntpHandler."""

    def __init__(self, config: NntpListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.users = Users(reactor, config.name)
        self.recent = RecentIds(config.remember)
        # Message-ids being handled now, with who waits for each one's verdict.
        self._inflight: dict[str, list[Deferred[None]]] = {}
        # For /metrics: articles by the answer they got, and the time to that answer.
        self.rejected = 0
        self.tempfail = 0
        self.duration = Histogram()
        self.configure(config)
        self._factory = NntpServerFactory(
            self,
            reactor=reactor,
            hostname=config.hostname,
            max_size=config.max_size,
            idle_timeout=config.idle_timeout,
            transfer_timeout=config.transfer_timeout,
            session_timeout=config.session_timeout,
            posting=config.posting,
            auth_available=self.auth_available,
            auth_required=config.require_auth,
            guard=self.guard,
            tls=self.tls,
        )

    # ----------------------------------------------------------------- Listener

    def factory(self) -> NntpServerFactory:
        return self._factory

    def reconfigure(self, config: NntpListenerConfig) -> None:
        super().reconfigure(config)
        self.configure(config, strict=False)
        factory = self._factory
        factory.hostname = config.hostname
        factory.max_size = config.max_size
        factory.idle_timeout = config.idle_timeout
        factory.transfer_timeout = config.transfer_timeout
        factory.session_timeout = config.session_timeout
        factory.tls = self.tls
        factory.posting = config.posting
        factory.auth_available = self.auth_available
        factory.auth_required = config.require_auth

    async def drain(self, timeout: float) -> None:
        """Close idle sessions now; give busy ones ``timeout`` seconds to finish their article."""
        response = Response(400, f"{self.config.hostname} service shutting down")
        await drain_sessions(
            self.guard.connections,
            self.reactor,
            timeout,
            lambda session: session.close_with(response),
        )

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        yield message_metric(self.name, self.accepted, self.rejected, self.tempfail)
        yield duration_metric(self.name, self.duration)

    def configure(self, config: NntpListenerConfig, *, strict: bool = True) -> None:
        """Take new settings and read the users file again.

        A users file that cannot be read raises UsersError when ``strict`` (at
        start); on a reload it is logged and the previous users stay in force.
        """
        self.config = config
        self.recent.resize(config.remember)
        self.users.configure(config.users, config.users_file, strict=strict)

    @property
    def auth_available(self) -> bool:
        """AUTHINFO is offered when users are configured (a users file may be empty for now)."""
        return self.users.available

    # ----------------------------------------------------------------- handler

    def on_connect(self, session: NntpSession) -> Response | None:
        if self.gateway.stopping:
            return Response(400, f"{self.config.hostname} service shutting down")
        return None

    async def on_auth(self, session: NntpSession, user: str, password: str) -> Response:
        host = session.peer_host
        login, wait = await self.users.log_in(self.guard, host, user, password)
        if login is Login.OK:
            return Response(281, "Authentication accepted")
        if login is Login.LIMITED:
            return Response(
                400, f"Too many failed logins from {host}, try again in {retry_after(wait)} seconds"
            )
        return Response(481, "Authentication failed")

    def on_offer(self, session: NntpSession, command: str, message_id: str) -> Response:
        ihave = command == "IHAVE"
        if self.gateway.stopping:
            if ihave:
                return Response(436, "Service shutting down, try again later")
            return Response(431, f"{message_id} service shutting down, try again later")
        if not is_message_id(message_id, strict=True):
            # RFC 5536 3.1.3: such an article would be refused once it arrived.
            if ihave:
                return Response(435, "Bad Message-ID: expected <left@right>")
            return Response(438, f"{message_id} bad Message-ID: expected <left@right>")
        if message_id in self.recent:
            if ihave:
                return Response(435, "Duplicate: article already received")
            return Response(438, f"{message_id} duplicate: article already received")
        if message_id in self._inflight:
            if ihave:
                return Response(436, "Article in progress on another connection, try later")
            return Response(431, f"{message_id} in progress on another connection, try later")
        if ihave:
            return Response(335, "Send it; end with <CR-LF>.<CR-LF>")
        return Response(238, message_id)

    async def on_article(
        self, session: NntpSession, command: str, message_id: str, data: bytes
    ) -> Response:
        answers = _ANSWERS[command]
        clock = self.gateway.seconds
        started = clock()
        qid = new_message_id()
        article = Article.from_bytes(
            data,
            id=qid,
            listener=self.config.name,
            client=session.peer_host,
            user=session.user or "",
        )
        problem = article_syntax_problem(data)
        if problem:
            if command == "POST":
                message_id = article.message_id or ""
        elif command == "POST":
            problem, article = self._inject(session, article, qid)
            message_id = article.message_id or ""
        else:
            problem, article = self._relay(article, message_id)
        if problem:
            self.rejected += 1
            log.info(
                "listener {listener} refused {command} {msgid} from {client}: {reason}",
                listener=self.config.name,
                command=command,
                msgid=message_id,
                client=session.peer_host,
                reason=problem,
            )
            return answers.make(answers.permanent, message_id, problem)
        while message_id in self._inflight:
            waiter: Deferred[None] = Deferred()
            self._inflight[message_id].append(waiter)
            await waiter
        if message_id in self.recent:
            self.rejected += 1
            return answers.make(
                answers.permanent, message_id, "Duplicate: article already received"
            )
        self._inflight[message_id] = []
        try:
            verdict = await self.gateway.submit(article)
            if verdict.status is Status.DELIVERED:
                # Before the waiters wake: a copy waiting for this verdict must see it.
                self.recent.add(message_id)
        finally:
            for waiter in self._inflight.pop(message_id, []):
                waiter.callback(None)
        self.duration.observe(clock() - started)
        if verdict.status is Status.DELIVERED:
            self.accepted += 1
            text = "Article received" if command != "POST" else f"Article received {message_id}"
            return answers.make(answers.ok, message_id, text)
        if verdict.status is Status.TEMPORARY:
            self.tempfail += 1
            log.info(
                "listener {listener}: {command} {msgid} from {client} failed for now: {reason}",
                listener=self.config.name,
                command=command,
                msgid=message_id,
                client=session.peer_host,
                reason=verdict.detail,
            )
            text = f"Try again later: {verdict.detail}"
            if command == "POST":
                # 441 is all POST has; the code inside says "temporary" to a
                # program that posts (INN's nnrpd does the same).
                text = f"436 {text}"
            return answers.make(answers.temporary, message_id, text)
        self.rejected += 1
        return answers.make(answers.permanent, message_id, f"Rejected: {verdict.detail}")

    # ----------------------------------------------------------------- article checks

    @staticmethod
    def _check_single_fields(article: Article) -> str:
        seen: set[str] = set()
        for key, _ in article.headers:
            name = _SINGLE_FIELDS.get(key.lower())
            if name is not None:
                if name in seen:
                    return f"Duplicate {name} header field"
                seen.add(name)
        return ""

    @staticmethod
    def _check_newsgroups(article: Article) -> str:
        value = article.headers.get("Newsgroups") or ""
        groups = [g.strip() for g in value.split(",")]
        if not any(groups) or not all(_NEWSGROUP.match(g) for g in groups):
            return f"Bad Newsgroups header field: {value[:100]!r}"
        return ""

    def _relay(self, article: Article, message_id: str) -> tuple[str, Article]:
        """Check a relayed article and put this listener's path identity in front of Path.

        Returns (why it is refused or "", the article).
        """
        problem = self._check_single_fields(article)
        if problem:
            return problem, article
        found = article.message_id
        if found is None:
            return "Article has no Message-ID header field", article
        if found != message_id:
            return f"Message-ID header field {found[:250]} does not match the command's", article
        if not is_message_id(found, strict=True):
            return f"Bad Message-ID {found[:250]!r}: expected <left@right>", article
        for name in _TRANSIT_REQUIRED:
            if name not in article.headers:
                return f"Article has no {name} header field", article
        problem = self._check_newsgroups(article)
        if problem:
            return problem, article
        path = article.headers.get("Path") or ""
        identities = {p.strip() for p in path.split("!")}
        if self.config.hostname in identities:
            return f"Loop: Path already holds {self.config.hostname}", article
        headers = article.headers.set("Path", f"{self.config.hostname}!{path}")
        return "", article.replace_headers(headers)

    def _inject(self, session: NntpSession, article: Article, qid: str) -> tuple[str, Article]:
        """RFC 5537 injection of a posted article: (why it is refused or "", the article)."""
        problem = self._check_single_fields(article)
        if problem:
            return problem, article
        headers = article.headers
        for name in ("Injection-Info", "Injection-Date"):
            if name in headers:
                return f"Article was injected already (it has {name}); relay it with IHAVE", article
        for name in _POST_REQUIRED:
            if name not in headers:
                return f"Article has no {name} header field", article
        problem = self._check_newsgroups(article)
        if problem:
            return problem, article
        message_id = article.message_id
        if message_id is None:
            message_id = f"<{qid.lower()}@{self.config.hostname}>"
            headers = headers.add("Message-ID", message_id)
        elif not is_message_id(message_id, strict=True):
            return f"Bad Message-ID {message_id[:250]!r}: expected <left@right>", article
        now = self.gateway.seconds()
        if "Date" not in headers:
            headers = headers.add("Date", email.utils.formatdate(now, usegmt=True))
        path = headers.get("Path")
        host = session.peer_host or "unknown"
        prefix = f"{self.config.hostname}!.POSTED.{host}!"
        if path is None:
            headers = headers.add("Path", prefix + "not-for-mail", first=True)
        else:
            headers = headers.set("Path", prefix + path)
        headers = headers.add("Injection-Date", email.utils.formatdate(now, usegmt=True))
        info = f'{self.config.hostname}; posting-host="{host}"'
        if session.user is not None:
            account = session.user.replace("\\", "\\\\").replace('"', '\\"')
            info += f'; posting-account="{account}"'
        headers = headers.add("Injection-Info", info)
        return "", article.replace_headers(headers)
