"""The ``mail_to_news`` transform: a mail becomes a netnews article, gated as RFC 5537 3.10 says.

Route options (placeholders from the route's match are already filled in):

``newsgroups`` (required)
    The group or groups to post to: a string (commas separate several) or a
    list.  Each name is checked against RFC 5536 3.1.4; a bad or reserved name
    refuses the mail for good (SMTP 553 5.1.3) with the reason.
``approved``
    Posts carry ``Approved:`` with this value, so a moderated group takes them
    directly.  Without it any ``Approved:`` of the mail is removed and a post to
    a moderated group goes where the news server sends it: its moderator.
``gateway``
    The gateway's name (default: this host's name).  It is the path identity
    in ``Path:``, the value of the loop-prevention header, and the right-hand
    side of Message-IDs the gateway has to make.
``sender``
    The address in the ``Sender:`` the gateway adds (default
    ``mail-to-news@<gateway>``).  A ``Sender:`` the mail had becomes
    ``Original-Sender:``.
``followup_to``
    ``Followup-To:`` for the article (checked like ``newsgroups``; ``poster``
    allowed).  A ``Followup-To:`` of the mail is otherwise removed.
``inject``
    ``true`` when the article goes straight into a news feed (an ``nntp``
    destination in ``ihave`` or ``stream`` mode) instead of through a news
    server's POST, whose server would inject it.  The gateway is then the
    injecting agent (RFC 5537 3.5) and adds what one adds:
    ``Injection-Date:`` (when the gateway received the mail, so a retry makes
    the same article), ``.POSTED`` after its name in ``Path:``
    (``<gateway>!.POSTED!not-for-mail``) and ``Injection-Info: <gateway>``
    with ``posting-host`` set to the mail client's address when it is known.
    Without it (POST), those fields are the news server's to add.

What the transform does to the header:

* Message-ID: kept when it is valid for netnews (RFC 5536 3.1.3, at most 250
  octets), so the same mail gated twice, or by two gateways, is one article.
  Comments and folding around it, which mail allows, are dropped: the
  article's field is the bare ``<id@host>``.
  Otherwise a Message-ID is derived from a hash of the mail's stable content
  (originator fields, Subject, Date, references, the original Message-ID,
  body, groups), so a retry of the same mail posts nothing new; the invalid one
  is kept as ``X-Original-Message-ID:``.
* ``Newsgroups:`` from the route, folded after commas when a long crosspost
  would make a line over 998 octets (news servers refuse such lines);
  ``Path: <gateway>!not-for-mail`` replaces any ``Path:`` from outside.
* Removed, because a news server must not receive them from a gateway, or
  they describe another system's handling: ``Approved`` (unless the route sets
  it), ``Xref``, ``Injection-Info``, ``Injection-Date``, every
  ``NNTP-Posting-*`` (Host, Date, ...), ``X-Trace``, ``X-Complaints-To``, ``Received``,
  ``Return-Path``, ``Path``, ``Distribution``, ``Lines``, ``Bcc``,
  ``Cancel-Key`` and ``Followup-To`` (unless the route sets it).
* Renamed, so they cannot act as control messages yet stay readable:
  ``Control`` to ``X-Original-Control``, ``Also-Control`` to
  ``X-Original-Also-Control``, ``Supersedes`` to ``X-Original-Supersedes``.
* ``References:`` is made from ``In-Reply-To:`` when the mail has none, and
  shortened to fit 998 octets (RFC 5537 3.4.4): the first id and the newest
  ones stay, the oldest after the first go.  The first and the last three
  always stay; if they are so long that they do not fit one line, the field
  is folded between them.
* ``Date:``, the body, ``Content-Transfer-Encoding`` and RFC 2047 encoded
  words are left as they are.  Fields every article must have (RFC 5536 3.1)
  are made when the mail lacks them: ``Date:`` from the time the gateway
  received it, ``From:`` from the envelope sender (no sender at all refuses
  the mail, 550 5.6.0) and ``Subject: (no subject)``; a retry makes the same
  ones.  A news server refuses a Date too far in the
  past or the future; that refusal is permanent and the dead letter keeps the
  server's reason.
* Loop prevention: ``X-Gateway-Loop: <gateway>`` is added; a mail that already
  carries it with this gateway's name was gated by this gateway before (news
  to mail to news) and is dropped, which the log records.

Crossposting: the transform is registered with ``one_copy=True``, so every
recipient of a mail that takes its route travels in one copy, and a
``newsgroups: '{group}'`` filled differently for each recipient becomes their
groups joined with "," (``g1@news...`` and ``g2@news...`` give ``g1,g2``): one
article crossposted to both.  (As two copies they would share a Message-ID
and the news server would keep only the first.)  A route may also name several
groups itself: ``newsgroups: [g1, g2]``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.logger import Logger

from gateway.message import Article, Headers, Kind, MailMessage, local_hostname
from gateway.plugins import Option, Reject, transform
from gateway.ports import Reason

__all__ = [
    "LOOP_HEADER",
    "fold_groups",
    "gateway_name",
    "is_valid_message_id",
    "loop_seen",
    "mail_to_news",
    "message_id_core",
    "newsgroup_problem",
    "shorten_references",
]

log = Logger(namespace="gateway.transforms.mail_to_news")

LOOP_HEADER = "X-Gateway-Loop"
MAX_MESSAGE_ID = 250
MAX_LINE = 998

# RFC 5322 atext; RFC 5536 3.1.3 builds id-left and id-right from it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# no-fold-quote and no-fold-literal without '>' (RFC 5536 3.1.3 removes it from both).
_NO_FOLD_QUOTE = r'"(?:[!#-=?-\[\]-~]|\\[!-=?-~])*"'
_NO_FOLD_LITERAL = r"\[(?:[!-=?-Z^-~]|\\[!-=?-~])*\]"
_MSG_ID = re.compile(
    rf"<(?:{_DOT_ATOM}|{_NO_FOLD_QUOTE})@(?:{_DOT_ATOM}|{_NO_FOLD_LITERAL})>", re.ASCII
)
_MSG_ID_ANYWHERE = re.compile(r"<[^<>\s]+>")

_MAX_HOST_NAME = 253
_PATH_IDENTITY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")

_REMOVE = (
    "Xref",
    "Injection-Info",
    "Injection-Date",
    "X-Trace",
    "X-Complaints-To",
    "Received",
    "Return-Path",
    "Path",
    "Distribution",
    "Lines",
    "Bcc",
    "Cancel-Key",
    "Newsgroups",
)
_RENAME = {
    "Control": "X-Original-Control",
    "Also-Control": "X-Original-Also-Control",
    "Supersedes": "X-Original-Supersedes",
}
# The parts of a mail that stay the same when it is sent again (trace fields do not).
_STABLE_FIELDS = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)


# --- names and ids --------------------------------------------------------------------


def is_valid_message_id(value: str) -> bool:
    """Whether ``value`` (surrounding white space allowed) is a netnews msg-id (RFC 5536 3.1.3)."""
    core = value.strip()
    return len(core.encode("utf-8")) <= MAX_MESSAGE_ID and _MSG_ID.fullmatch(core) is not None


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def message_id_core(value: str) -> str | None:
    """The netnews msg-id-core in a mail's Message-ID value, or None when it has none.

    Mail allows comments and folding around the id (RFC 5322 3.6.4: ``[CFWS] msg-id
    [CFWS]``); the netnews Message-ID field carries the bare msg-id-core (RFC 5536 3.1.3),
    so the id is taken out of them when everything around it is white space and comments.
    """
    text = value.strip()
    if is_valid_message_id(text):
        return text
    found = _MSG_ID.search(text)
    if found is None or not is_valid_message_id(found.group(0)):
        return None
    rest = text[: found.start()] + " " + text[found.end() :]
    for _ in range(10):  # nested comments, bounded
        shorter = _COMMENT.sub(" ", rest)
        if shorter == rest:
            break
        rest = shorter
    return found.group(0) if not rest.strip() else None


def _component_ok(component: str) -> bool:
    return bool(component) and all(
        (ch.isascii() and (ch.isalnum() or ch in "+-_")) or (not ch.isascii() and ch.isalnum())
        for ch in component
    )


def newsgroup_problem(name: str, *, followup: bool = False) -> str | None:
    """Why ``name`` cannot be a group to post to (RFC 5536 3.1.4 and its reserved names), or None.

    ``followup`` allows ``poster``, which Followup-To may name instead of a group.
    """
    if followup and name == "poster":
        return None
    if not name:
        return "the newsgroup name is empty"
    components = name.split(".")
    if not all(_component_ok(c) for c in components):
        return (
            f"'{name}' is not a valid newsgroup name: components separated by single dots,"
            " each made of letters, digits, '+', '-' and '_' (RFC 5536 3.1.4)"
        )
    first = components[0].lower()
    if name.lower() in ("control", "junk", "poster", "to", "example") or first in (
        "control",
        "to",
        "example",
    ):
        return f"'{name}' is a reserved newsgroup name (RFC 5536 3.1.4) and cannot be posted to"
    for component in components:
        if component.lower() in ("all", "ctl"):
            return f"'{name}' has the reserved component '{component}' (RFC 5536 3.1.4)"
        if component.isdigit():
            return (
                f"'{name}' has the all-digit component '{component}', which news servers"
                " cannot tell from an article number (RFC 5536 3.1.4)"
            )
    return None


def _group_list(value: Any, option: str) -> list[str]:
    items: Iterable[Any]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [part for item in value for part in str(item).split(",")]
    else:
        raise Reject(
            f"route option '{option}' must be a group name or a list of them",
            reason=Reason.MISCONFIGURED,
        )
    return list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _checked_groups(value: Any, option: str, *, followup: bool = False) -> list[str]:
    groups = _group_list(value, option)
    if not groups:
        raise Reject(
            f"route option '{option}' names no newsgroup (a placeholder matched nothing?)",
            reason=Reason.BAD_ADDRESS,
        )
    for group in groups:
        problem = newsgroup_problem(group, followup=followup)
        if problem is not None:
            raise Reject(problem, reason=Reason.BAD_ADDRESS)
    return groups


def gateway_name(options: Mapping[str, Any]) -> str:
    """The gateway's path identity from the route options, or this host's name."""
    name = str(options.get("gateway") or local_hostname())
    if len(name) > _MAX_HOST_NAME or not _PATH_IDENTITY.match(name):
        raise ValueError(
            f"route option 'gateway' is {name!r}: it must be a host name (letters, digits,"
            " dots, '-' and '_', at most 253 of them) because it goes into Path: and Message-IDs"
        )
    return name


def loop_seen(headers: Headers, gateway: str) -> bool:
    """Whether this gateway already gated the message (its name is in a loop header)."""
    wanted = gateway.lower()
    return any(v.strip().lower() == wanted for v in headers.get_all(LOOP_HEADER))


# --- References -----------------------------------------------------------------------


def shorten_references(ids: list[str], limit: int = MAX_LINE) -> list[str]:
    """The ids whose ``References: `` line fits ``limit`` octets (RFC 5537 3.4.4).

    The first id (the thread's start) and the newest ids stay; the oldest
    after the first are removed until the line fits.  The first and the last
    three are never removed: when even they do not fit (ids near the 250-octet
    limit), they are all kept and the field is folded between them.
    """

    def length(kept: list[str]) -> int:
        return len("References: ") + len(" ".join(kept).encode("utf-8"))

    kept = list(ids)
    while len(kept) > 4 and length(kept) > limit:
        del kept[1]
    return kept


def _references(headers: Headers) -> Headers:
    raw = headers.get("References")
    if raw is None:
        reply_to = headers.get("In-Reply-To") or ""
        ids = [i for i in _MSG_ID_ANYWHERE.findall(reply_to) if is_valid_message_id(i)]
        if not ids:
            return headers
        return headers.set("References", _fold_ids(shorten_references(ids)))
    ids = [i for i in _MSG_ID_ANYWHERE.findall(raw) if is_valid_message_id(i)]
    longest_line = max((len(line) for line in _raw_field(headers, "References")), default=0)
    if len("References: ") + len(" ".join(ids).encode("utf-8")) <= MAX_LINE and (
        longest_line <= MAX_LINE and len(ids) == len(raw.split())
    ):
        return headers
    kept = shorten_references(ids)
    if not kept:
        return headers.remove("References")
    return headers.set("References", _fold_ids(kept))


def _fold_ids(ids: list[str]) -> str:
    """The ids on one line when it fits 998 octets, else one id a line (RFC 5322 2.1.1)."""
    if len("References: ") + len(" ".join(ids).encode("utf-8")) <= MAX_LINE:
        return " ".join(ids)
    return "\n ".join(ids)


def fold_groups(name: str, groups: list[str]) -> str:
    """``groups`` as the value of a ``name`` field, folded after commas if one line is too long.

    News servers refuse a header line over 998 octets (INN's nnrpd: "441 Header line too
    long"); RFC 5536 3.1.4 allows folding white space after each comma, so a long crosspost
    is folded there into lines of at most 78 octets where the names allow (RFC 5322 2.1.1).
    """
    one_line = ",".join(groups)
    if len(name) + 2 + len(one_line.encode("utf-8")) <= MAX_LINE:
        return one_line
    lines: list[str] = []
    line = ""
    width = len(name) + 2  # "Name: " on the first line, one space on the next ones
    for group in groups:
        piece = group + ","
        if line and width + len(line.encode("utf-8")) + len(piece.encode("utf-8")) > 78:
            lines.append(line)
            line, width = "", 1
        line += piece
    lines.append(line)
    return "\n ".join(lines)[:-1]  # no comma after the last group


def raw_value(headers: Headers, name: str) -> bytes | None:
    """The raw bytes of the only field called ``name``; None when it is absent or repeated."""
    wanted = name.lower()
    values = [value for key, value in headers if key.lower() == wanted]
    return values[0] if len(values) == 1 else None


def _raw_field(headers: Headers, name: str) -> list[bytes]:
    wanted = name.lower()
    lines: list[bytes] = []
    for key, value in headers:
        if key.lower() == wanted:
            parts = value.split(b"\n")
            lines.append(key.encode("ascii") + b":" + parts[0])
            lines.extend(parts[1:])
    return lines


# --- Message-ID -----------------------------------------------------------------------


def derived_message_id(msg: MailMessage, groups: list[str], gateway: str) -> str:
    """A Message-ID made from the mail's stable content: the same mail always gets the same one."""
    digest = hashlib.sha256()
    for name in _STABLE_FIELDS:
        for value in msg.headers.get_all(name):
            digest.update(name.lower().encode() + b":" + value.encode("utf-8") + b"\n")
    digest.update(b"newsgroups:" + ",".join(groups).encode("utf-8") + b"\n\n")
    digest.update(msg.body)
    token = base64.b32encode(digest.digest()[:20]).decode("ascii").rstrip("=").lower()
    left = f"{token}.mail2news"
    # RFC 5536 3.1.3: at most 250 octets. A very long gateway name gives up leading labels
    # (the id stays under the gateway's domain), never the 250-octet limit.
    room = MAX_MESSAGE_ID - len(left) - 3
    right = gateway
    while len(right) > room and "." in right:
        right = right.split(".", 1)[1]
    if len(right) > room:
        right = right[-room:].lstrip("-_.") or "gateway"
    return f"<{left}@{right}>"


# --- mandatory fields -----------------------------------------------------------------


def _mandatory_fields(msg: MailMessage, headers: Headers) -> Headers:
    """Date, From and Subject, which every article has (RFC 5536 3.1), where the mail lacks them.

    Each is made from what stays the same when the mail is tried again (the time the
    gateway received it, the envelope sender), so a retry gives the same article.
    """
    if not (headers.get("From") or "").strip():
        if not msg.sender:
            raise Reject(
                "the mail has no From: and no envelope sender, so the article would have no"
                " author; a news server refuses that (RFC 5536 3.1.2)",
                reason=Reason.BAD_MESSAGE,
            )
        headers = headers.remove("From").add("From", msg.sender)
    if not (headers.get("Date") or "").strip():
        received = datetime.fromtimestamp(msg.received, UTC)
        headers = headers.remove("Date").add("Date", format_datetime(received))
    if not (headers.get("Subject") or "").strip():
        headers = headers.remove("Subject").add("Subject", "(no subject)")
    return headers


def _flag(options: Mapping[str, Any], name: str) -> bool:
    value = options.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    # A configuration mistake, not the mail's: a temporary failure, so the mail waits
    # for the route to be mended instead of being refused.
    raise ValueError(f"the route's option {name!r} must be true or false, not {value!r}")


def _client_address(client: str) -> str:
    """The IP address in a message's ``client`` ("host:port", "[v6]:port" or a bare host)."""
    if not client:
        return ""
    if client.startswith("["):
        host = client[1:].partition("]")[0]
    elif client.count(":") == 1:
        host = client.partition(":")[0]
    else:
        host = client
    # Only characters a quoted parameter value may hold unescaped.
    return host if re.fullmatch(r"[0-9A-Za-z.:_-]+", host) else ""


# --- the transform --------------------------------------------------------------------


@transform(
    "mail_to_news",
    accepts=[Kind.MAIL],
    produces=Kind.ARTICLE,
    one_copy=True,
    options=[
        Option("newsgroups", str | list[str], required=True, help="the group(s) to post to"),
        Option("approved", str, help="Approved: for posts to moderated groups"),
        Option("gateway", str, help="the gateway's name in Path: (this host's name)"),
        Option("sender", str, help="the Sender: address (mail-to-news@<gateway>)"),
        Option("followup_to", str | list[str], help="Followup-To: for the article"),
        Option("inject", bool, help="true when the article goes straight into a news feed"),
    ],
)
def mail_to_news(msg: MailMessage, options: Mapping[str, Any]) -> Article | None:
    gateway = gateway_name(options)
    if loop_seen(msg.headers, gateway):
        log.info(
            "message {id} not gated to news: it carries {header}: {gateway}, so this gateway"
            " gated it before",
            id=msg.id,
            header=LOOP_HEADER,
            gateway=gateway,
        )
        return None
    if "newsgroups" not in options:
        raise Reject(
            "the route sets no 'newsgroups' option, so the mail has no group to go to",
            reason=Reason.MISCONFIGURED,
        )
    groups = _checked_groups(options["newsgroups"], "newsgroups")
    headers = msg.headers
    for name in _REMOVE:
        headers = headers.remove(name)
    headers = Headers(tuple(f for f in headers if not f[0].lower().startswith("nntp-posting-")))
    for old, new in _RENAME.items():
        headers = headers.rename(old, new)

    headers = _mandatory_fields(msg, headers)

    message_id = headers.get("Message-ID")
    core = message_id_core(message_id) if message_id is not None else None
    if core is None:
        derived = derived_message_id(msg, groups, gateway)
        if message_id is not None:
            headers = headers.rename("Message-ID", "X-Original-Message-ID")
        headers = headers.add("Message-ID", derived)
    elif raw_value(headers, "Message-ID") != b" " + core.encode("ascii"):
        # One field, unfolded, without comments (RFC 5536 3.1.3).
        headers = headers.set("Message-ID", core)

    approved = options.get("approved")
    headers = headers.remove("Approved")
    if approved:
        headers = headers.add("Approved", str(approved))
    headers = headers.remove("Followup-To")
    if options.get("followup_to"):
        headers = headers.add(
            "Followup-To",
            fold_groups(
                "Followup-To",
                _checked_groups(options["followup_to"], "followup_to", followup=True),
            ),
        )

    headers = headers.rename("Original-Sender", "X-Original-Original-Sender")
    headers = headers.rename("Sender", "Original-Sender")
    headers = headers.add("Sender", str(options.get("sender") or f"mail-to-news@{gateway}"))
    headers = _references(headers)
    headers = headers.add("Newsgroups", fold_groups("Newsgroups", groups))
    if _flag(options, "inject"):
        # The injecting agent's part (RFC 5537 3.5; fields of RFC 5536 3.2.8 and 3.2.9).
        received = datetime.fromtimestamp(msg.received, UTC)
        headers = headers.add("Injection-Date", format_datetime(received))
        info = gateway
        client = _client_address(msg.client)
        if client:
            info += f'; posting-host="{client}"'
        headers = headers.add("Injection-Info", info)
        headers = headers.add("Path", f"{gateway}!.POSTED!not-for-mail", first=True)
    else:
        headers = headers.add("Path", f"{gateway}!not-for-mail", first=True)
    headers = headers.add(LOOP_HEADER, gateway)
    return Article(
        id=msg.id,
        listener=msg.listener,
        client=msg.client,
        received=msg.received,
        headers=headers,
        body=msg.body,
    )
