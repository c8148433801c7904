"""The ``news_to_mail`` transform: an article becomes a mail (outgoing gateway, RFC 5537 3.10).

Route options (placeholders from the route's match are already filled in):

``to`` (required)
    The address or addresses for ``To:`` (a string, commas separate several,
    or a list).
``from``
    Replaces ``From:``; the article's own From is kept as
    ``X-Original-From:``.  Without it the article's From stays.
``envelope_from``
    The SMTP envelope sender, where bounces go (default: the address in
    ``from`` if set, else ``news-to-mail@<gateway>``).
``envelope_to``
    The SMTP envelope recipients (default: the addresses in ``to``).
``list_id``
    Adds ``List-Id:`` (RFC 2919); a bare id like ``group.lists.example.test``
    is put in angle brackets, ``Name <group.lists.example.test>`` is taken as
    it is.  An id that is not a label and a domain joined by a dot (no white
    space, at most 255 characters) refuses the article for good, saying so.
``list_post``
    Adds ``List-Post:`` (RFC 2369): one address or URL, a list of them, or a
    string with commas between them; a bare address becomes ``<mailto:...>``,
    each URL is put in angle brackets.  ``NO`` says posting is not allowed.
``gateway``
    The gateway's name, as for ``mail_to_news`` (default: this host's name).

Kept: ``Message-ID``, ``Date``, ``References``, ``Subject``, ``Newsgroups`` and
every other field, the body and its encoding.  Removed, because they describe
the news system's handling and mean nothing (or something wrong) in mail:
``Path``, ``Xref``, ``Injection-Info``, ``Injection-Date``,
every ``NNTP-Posting-*``, ``X-Trace``, ``X-Complaints-To``, ``Approved``,
``Lines``, and the article's ``To`` and ``Cc`` (replaced by the route's ``to``).

Dropped (the transform returns nothing, and the log says why):

* control messages: a ``Control:`` or ``Also-Control:`` field, a Subject
  starting with ``cmsg `` (the old form), or a post to ``control`` groups;
  cancels are control messages too;
* articles that carry ``X-Gateway-Loop: <gateway>``: this gateway made them
  from mail, so sending them back out as mail would loop.

``X-Gateway-Loop: <gateway>`` is added, so ``mail_to_news`` of this gateway
never posts the mail back to news.
"""

from __future__ import annotations

import email.header
import re
from collections.abc import Mapping
from email.utils import formataddr, getaddresses
from typing import Any

from twisted.logger import Logger

from gateway.message import Article, Headers, Kind, MailMessage
from gateway.plugins import Option, Reject, transform
from gateway.ports import Reason
from gateway.transforms.mail_to_news import LOOP_HEADER, gateway_name, loop_seen

__all__ = ["news_to_mail"]

log = Logger(namespace="gateway.transforms.news_to_mail")

_REMOVE = (
    "Path",
    "Xref",
    "Injection-Info",
    "Injection-Date",
    "X-Trace",
    "X-Complaints-To",
    "Approved",
    "Lines",
    "To",
    "Cc",
    "Bcc",
)


def _address_list(value: Any, option: str) -> list[str]:
    """The bare addresses in an option given as a string or a list of strings."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise Reject(
            f"route option '{option}' must be an address or a list of addresses",
            reason=Reason.MISCONFIGURED,
        )
    addresses = [addr for _name, addr in getaddresses(items) if addr and "@" in addr]
    if not addresses:
        raise Reject(
            f"route option '{option}' holds no mail address: {value!r}",
            reason=Reason.MISCONFIGURED,
        )
    return addresses


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    if text.isascii():
        return text
    # Display names outside ASCII become RFC 2047 encoded words: raw UTF-8 in a header
    # needs SMTPUTF8 (RFC 6532) all the way.
    # An address itself outside ASCII can only travel with SMTPUTF8: it is left as it is.
    return ", ".join(
        formataddr((name, addr), charset="utf-8")
        if name and addr.isascii()
        else (f"{name} <{addr}>" if name else addr)
        for name, addr in getaddresses([text])
        if addr
    )


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_LIST_ID = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)+", re.ASCII)
_LIST_ID_FIELD = re.compile(r"(?P<phrase>[^<>]*?)\s*<\s*(?P<id>[^<>]*?)\s*>", re.DOTALL)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[!-~]+", re.ASCII)


def list_id_value(option: str) -> str:
    """The List-Id field for the ``list_id`` option: ``[phrase] <label.namespace>`` (RFC 2919)."""
    text = option.strip()
    found = _LIST_ID_FIELD.fullmatch(text)
    phrase, ident = (found.group("phrase").strip(), found.group("id")) if found else ("", text)
    if (
        not _LIST_ID.fullmatch(ident)
        or len(ident) > 255
        or any(c in phrase for c in "<>\r\n")
        or (_QUOTED.fullmatch(phrase) is None and any(c in phrase for c in '@,;:"'))
    ):
        raise Reject(
            f"route option 'list_id' is {option!r}: a List-Id is an optional name and an id"
            " like <dev.lists.example.test>, a list label and a domain joined by a dot, at"
            " most 255 characters (RFC 2919)",
            reason=Reason.MISCONFIGURED,
        )
    if phrase and not phrase.isascii():
        phrase = email.header.Header(phrase, "utf-8").encode()
    return f"{phrase} <{ident}>" if phrase else f"<{ident}>"


def list_post_value(option: Any) -> str:
    """The List-Post field: URLs in angle brackets, commas between them, or NO (RFC 2369).

    A bare address becomes ``<mailto:address>``.
    """
    if isinstance(option, (list, tuple)):
        items = [str(item).strip() for item in option]
    else:
        text = str(option).strip()
        if text.upper() == "NO":
            return "NO"
        items = (
            [m.group(0) for m in re.finditer(r"<[^<>]*>", text)]
            if text.startswith("<")
            else [part.strip() for part in text.split(",")]
        )
    urls: list[str] = []
    for item in items:
        url = item[1:-1].strip() if item.startswith("<") and item.endswith(">") else item
        if "@" in url and not url.lower().startswith("mailto:") and ":" not in url:
            url = "mailto:" + url
        if not _URL.fullmatch(url) or "<" in url or ">" in url:
            raise Reject(
                f"route option 'list_post' holds {item!r}: List-Post takes mail addresses or"
                " URLs (each written <mailto:list@example.test> in the field, commas between"
                " them) or NO (RFC 2369)",
                reason=Reason.MISCONFIGURED,
            )
        urls.append(f"<{url}>")
    if not urls:
        raise Reject(
            "route option 'list_post' holds no address or URL (RFC 2369)",
            reason=Reason.MISCONFIGURED,
        )
    return ", ".join(urls)


def control_reason(article: Article) -> str | None:
    """Why ``article`` is a control message, or None when it is an ordinary article."""
    headers = article.headers
    for name in ("Control", "Also-Control"):
        value = headers.get(name)
        if value is not None:
            verb = value.split(None, 1)[0].lower() if value.split() else ""
            return "a cancel" if verb == "cancel" else f"a control message ({name}: {value})"
    subject = headers.get("Subject") or ""
    if subject.lower().startswith("cmsg "):
        return f"a control message (Subject: {subject})"
    groups = [g.lower() for g in article.newsgroups]
    if groups and all(g == "control" or g.startswith("control.") for g in groups):
        return "a post to the control groups"
    return None


@transform(
    "news_to_mail",
    accepts=[Kind.ARTICLE],
    produces=Kind.MAIL,
    options=[
        Option("to", str | list[str], required=True, help="address(es) for To:"),
        Option("from", str, help="replaces From: (the article's is kept as X-Original-From:)"),
        Option("envelope_from", str, help="the SMTP envelope sender, where bounces go"),
        Option("envelope_to", str | list[str], help="the envelope recipients (those of 'to')"),
        Option("list_id", str, help="adds List-Id: (RFC 2919)"),
        Option("list_post", str | list[str], help="adds List-Post: (RFC 2369), or NO"),
        Option("gateway", str, help="the gateway's name (this host's name)"),
    ],
)
def news_to_mail(article: Article, options: Mapping[str, Any]) -> MailMessage | None:
    gateway = gateway_name(options)
    msgid = article.message_id or ""
    if loop_seen(article.headers, gateway):
        log.info(
            "article {id} {msgid} not gated to mail: it carries {header}: {gateway}, so it came"
            " from mail through this gateway",
            id=article.id,
            msgid=msgid,
            header=LOOP_HEADER,
            gateway=gateway,
        )
        return None
    reason = control_reason(article)
    if reason is not None:
        log.info(
            "article {id} {msgid} not gated to mail: it is {reason}",
            id=article.id,
            msgid=msgid,
            reason=reason,
        )
        return None
    if "to" not in options:
        raise Reject(
            "the route sets no 'to' option, so the article has no mail recipient",
            reason=Reason.MISCONFIGURED,
        )
    to_text = _header_text(options["to"])
    recipients = (
        _address_list(options["envelope_to"], "envelope_to")
        if options.get("envelope_to")
        else _address_list(options["to"], "to")
    )
    headers = article.headers
    for name in _REMOVE:
        headers = headers.remove(name)
    headers = Headers(tuple(f for f in headers if not f[0].lower().startswith("nntp-posting-")))
    headers = headers.add("To", to_text)
    from_option = options.get("from")
    if from_option:
        headers = headers.rename("From", "X-Original-From")
        headers = headers.add("From", _header_text(from_option))
    if options.get("envelope_from"):
        envelope_from = _address_list(options["envelope_from"], "envelope_from")[0]
    elif from_option:
        envelope_from = _address_list(from_option, "from")[0]
    else:
        envelope_from = f"news-to-mail@{gateway}"
    list_id = options.get("list_id")
    if list_id:
        headers = headers.set("List-Id", list_id_value(str(list_id)))
    list_post = options.get("list_post")
    if list_post:
        headers = headers.set("List-Post", list_post_value(list_post))
    headers = headers.add(LOOP_HEADER, gateway)
    return MailMessage(
        id=article.id,
        listener=article.listener,
        client=article.client,
        received=article.received,
        headers=headers,
        body=article.body,
        sender=envelope_from,
        recipients=tuple(recipients),
    )
