"""The ``nntp`` destination: hands articles to a news server by POST, IHAVE or streaming.

Replies map to outcomes as a news peer reads them: 240, 235 and 239
delivered; 441, 435 and 438 that say the server already has the Message-ID
count as delivered too (INN answers a duplicate POST with ``441 435
Duplicate``), and so do 437 and 439 that say "Duplicate" (an article that
reached the server by another way while it was sent); 436, 431, a 441 whose
text starts with a temporary code (``441 436 ...``), any other 4xx and no
reply at all are temporary; other 437, 439 and 441 and the 5xx
are permanent, with the server's text kept as the reason.
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint

from gateway.message import Article, Kind, Message
from gateway.ports import Deliverer, Outcome, Reason
from gateway.protocols.nntp.client import NntpClientPool, NntpSessionError, Reply
from gateway.protocols.nntp.config import NntpDestinationConfig

__all__ = ["NntpDestination", "outcome_for"]

_DELIVERED = frozenset({240, 235, 239})
_DUPLICATE = frozenset({435, 438})
_DUPLICATE_TEXT = re.compile(r"^435\b|\bduplicate\b|\balready\b", re.IGNORECASE)
_INNER_TEMPORARY = re.compile(r"(?:400|403|431|436)\b")
_DUPLICATE_WORD = re.compile(r"\bduplicate\b", re.IGNORECASE)


def _is_duplicate_text(text: str) -> bool:
    return _DUPLICATE_TEXT.search(text) is not None


def outcome_for(reply: Reply, server: str) -> Outcome:
    """The outcome of the decisive reply to POST, IHAVE, CHECK or TAKETHIS."""
    said = f"{server} answered {reply}"
    code = reply.code
    if code in _DELIVERED:
        return Outcome.delivered(said)
    if code in _DUPLICATE:
        return Outcome.delivered(f"{said} (the server already has this Message-ID)")
    if code == 441 and _INNER_TEMPORARY.match(reply.text):
        # "441 436 ...": the posting server passes on the temporary failure of
        # the server behind it (INN's nnrpd and innd; the gateway's listener).
        return Outcome.temporary(said)
    if code in (441, 439) and _is_duplicate_text(reply.text):
        # INN says "441 435 Duplicate" to a POST of an article it already has.
        return Outcome.delivered(f"{said} (the server already has this Message-ID)")
    if code == 437 and _DUPLICATE_WORD.search(reply.text):
        # INN's "437 Duplicate": the article arrived by another way while this
        # copy was being sent.
        return Outcome.delivered(f"{said} (the server already has this Message-ID)")
    if code == 480:
        return Outcome.temporary(
            f"{said}: the server wants authentication; set user and password on the destination"
        )
    if code == 440:
        return Outcome.temporary(f"{said}: the server does not allow posting from the gateway")
    if code in (437, 439, 441) or 500 <= code < 600:
        return Outcome.permanent(said, diagnostic=f"nntp; {reply}")
    if 400 <= code < 500:
        return Outcome.temporary(said)
    # 1xx/2xx/3xx we did not ask for: the exchange went wrong, try again later.
    return Outcome.temporary(f"{said}, which is not an answer to an offered article")


class NntpDestination(Deliverer):
    kinds = frozenset({Kind.ARTICLE})

    def __init__(
        self,
        config: NntpDestinationConfig,
        reactor: IReactorCore,
        *,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """``endpoint`` replaces the one made from ``connect`` (for tests)."""
        self.config = config
        self.name = config.name
        if endpoint is None:
            endpoint = clientFromString(reactor, str(config.connect))  # type: ignore[no-untyped-call]
        self.pool = NntpClientPool(
            reactor,
            endpoint,
            mode=config.mode,
            user=config.user,
            password=config.password,
            max_connections=config.max_connections,
            connect_timeout=config.connect_timeout,
            command_timeout=config.timeout,
            idle_timeout=config.idle_timeout,
            destination=str(config.connect),
        )

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, Article):
            return Outcome.permanent(f"NNTP takes articles, not {message.kind}")
        msgid = message.message_id or ""
        if self.config.mode != "post" and not msgid:
            return Outcome.permanent(
                f"the article has no Message-ID, which {self.config.mode.upper()} needs"
                " (mode: post lets the server make one)",
                reason=Reason.BAD_MESSAGE,
            )
        try:
            reply = await self.pool.send(msgid, message.to_bytes())
        except NntpSessionError as exc:
            return Outcome.temporary(exc.text)
        except ValueError as exc:
            return Outcome.permanent(str(exc))
        return outcome_for(reply, self.pool.destination)

    async def close(self) -> None:
        await self.pool.close()
