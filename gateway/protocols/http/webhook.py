"""The ``webhook`` destination: each spooled mail or article is POSTed as JSON to a URL.

This is the gateway's ``mail_to_http`` conversion. It is a destination, not a
transform, because the spool keeps mail as mail: the message is turned into
JSON only when it is delivered, and a failed POST is retried from the spool
like any other delivery. A route sends mail to a web hook simply by naming a
``webhook`` destination in ``to``::

    destinations:
      hook:
        protocol: webhook
        url: https://hooks.example.test/mail
        secret: s3cret                # X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>
        attachment_limit: 1MiB        # larger attachments are listed without their content

The body is one JSON object (``application/json; charset=utf-8``)::

    {"id": "gateway queue id", "kind": "mail" | "article",
     "received": "2026-01-02T03:04:05+00:00", "listener": "mail-in",
     "envelope": {"sender": "a@x.test", "recipients": ["b@y.test"]},   (null for articles)
     "newsgroups": ["comp.lang.python"],                               (articles only)
     "message_id": "<...>", "subject": "decoded subject", "date": "Date as written",
     "date_iso": "2026-01-02T03:04:05+01:00" or null,
     "from": {"name": "Ann", "address": "ann@x.test"} or null,
     "to": [{"name": "", "address": "b@y.test"}], "cc": [...],
     "headers": [["Subject", "decoded value"], ...],                  (every field, in order)
     "text": "the text/plain parts" or null, "html": "the text/html parts" or null,
     "attachments": [{"name": "a.pdf", "type": "application/pdf", "size": 1234,
                      "disposition": "attachment", "content_id": null,
                      "included": true, "content": "base64..."}]}

Header values are decoded (RFC 2047); text parts are decoded from their
transfer encoding and charset. Each request also carries ``Idempotency-Key``
(the gateway's id of the message), so a receiver can recognise a retry.

Outcomes: a 2xx answer is delivered; 3xx and 4xx (except 408 and 429) are
permanent (dead letter, and a bounce for mail); 5xx, 408, 429, timeouts and
connection failures are temporary, and a ``Retry-After`` (seconds or an HTTP
date) sets the wait before the next try, up to the destination's ``retry_max``.
"""

from __future__ import annotations

import base64
import email.headerregistry
import email.message
import email.policy
import email.utils
import json
import mimetypes
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.client_tls import UnverifiedTls, load_trust_root
from gateway.message import Article, FileMessage, Kind, MailMessage, Message
from gateway.ports import FileProblem, FileSink, Outcome, tidy_name
from gateway.protocols._bodies import BytesProducer, FileProducer
from gateway.protocols.http.config import WebhookDestinationConfig
from gateway.signing import sign, sign_file

__all__ = [
    "WebhookDestination",
    "message_document",
    "outcome_for_status",
    "parse_retry_after",
]

log = Logger(namespace="gateway.http.webhook")

# How much of an error answer's body goes into the reason (dead letter, bounce).
_REASON_CHARS = 200
# A response body is read and thrown away so the connection can be reused, but only up to this.
_MAX_DISCARD = 1024 * 1024
_IDLE_KEEPALIVE = 120
_USER_AGENT = b"gateway-webhook/1"
# A Retry-After longer than this (about 31 years) is taken as this; the destination's
# retry_max caps the wait anyway.
_MAX_RETRY_AFTER = 10**9

# --------------------------------------------------------------------------- Retry-After


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``now`` (epoch seconds) per a Retry-After value; None if unusable.

    The value is delay-seconds or an HTTP date (RFC 9110 section 10.2.3); a date
    in the past means no wait.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Any number of digits is valid; beyond a year it only means "much later".
        return float(int(text)) if len(text) <= 9 else float(_MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:
            # HTTP dates are GMT; an obsolete form without a zone is taken as GMT as well.
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# --------------------------------------------------------------------------- outcomes


def _short(body: bytes) -> str:
    text = body[: _REASON_CHARS * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def outcome_for_status(
    url: str, status: int, phrase: str, body: bytes, retry_after: float | None
) -> Outcome:
    """What an HTTP answer means for the delivery (see the module docstring)."""
    said = f"HTTP {status}{' ' + phrase if phrase else ''} from {url}"
    snippet = _short(body)
    detail = f"{said}: {snippet}" if snippet else said
    if 200 <= status < 300:
        return Outcome.delivered(said)
    if status in (408, 429) or 500 <= status < 600:
        return Outcome.temporary(detail, retry_after=retry_after)
    if 300 <= status < 500:
        if 300 <= status < 400:
            detail += "; the web hook does not follow redirects: put the new URL in the destination"
        return Outcome.permanent(detail, diagnostic=f"http; {status} {phrase}".rstrip())
    return Outcome.temporary(f"{detail} (not a valid HTTP status)")


# --------------------------------------------------------------------------- JSON


_UNSTRUCTURED = "X-Gateway-Decode"  # any name the header registry treats as free text


def decode_field(value: str) -> str:
    """A header value with RFC 2047 encoded words decoded; the text itself if that fails."""
    try:
        return str(email.policy.default.header_factory(_UNSTRUCTURED, value))
    except Exception:  # the email package is lenient, but a header is never worth a failure
        return value


def _addresses(name: str, values: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for value in values:
        try:
            header = email.policy.default.header_factory(name, value)
            found = [(a.display_name, a.addr_spec) for a in getattr(header, "addresses", ())]
        except Exception:
            found = []
        if not found:
            found = [(n, a) for n, a in email.utils.getaddresses([value]) if a or n]
        out.extend({"name": n, "address": a} for n, a in found)
    return out


def _decode_text(data: bytes, charset: str | None) -> str:
    for candidate in (charset or "us-ascii", "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


class _Parts:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.text: list[str] = []
        self.html: list[str] = []
        self.attachments: list[dict[str, Any]] = []

    def walk(self, part: email.message.Message) -> None:
        ctype = part.get_content_type()
        if part.get_content_maintype() == "message" and part.is_multipart():
            # A forwarded message (message/rfc822) is one attachment, not more text.
            inner = part.get_payload(0)
            data = inner.as_bytes() if isinstance(inner, email.message.Message) else b""
            self.attach(part, data, default_name="message.eml")
            return
        if part.is_multipart():
            for sub in part.get_payload():
                if isinstance(sub, email.message.Message):
                    self.walk(sub)
            return
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        disposition = part.get_content_disposition()
        if (
            ctype in ("text/plain", "text/html")
            and disposition != "attachment"
            and part.get_filename() is None
        ):
            text = _decode_text(data, part.get_content_charset())
            (self.text if ctype == "text/plain" else self.html).append(text)
            return
        self.attach(part, data)

    def attach(
        self, part: email.message.Message, data: bytes, default_name: str | None = None
    ) -> None:
        try:
            name = part.get_filename()
        except Exception:
            name = None
        included = len(data) <= self.limit
        cid = part.get("Content-ID")
        self.attachments.append(
            {
                "name": decode_field(name) if name else default_name,
                "type": part.get_content_type(),
                "size": len(data),
                "disposition": part.get_content_disposition() or "attachment",
                "content_id": str(cid).strip() if cid else None,
                "included": included,
                "content": base64.b64encode(data).decode("ascii") if included else None,
            }
        )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def message_document(message: MailMessage | Article, *, attachment_limit: int) -> dict[str, Any]:
    """The JSON object for one mail or article (see the module docstring)."""
    headers: list[list[str]] = []
    for name, raw in message.headers:
        text = raw.replace(b"\r", b"").replace(b"\n", b"").strip().decode("utf-8", "replace")
        headers.append([name, decode_field(text)])
    parsed = email.message_from_bytes(message.to_bytes(), policy=email.policy.compat32)
    parts = _Parts(attachment_limit)
    parts.walk(parsed)
    h = message.headers
    date = h.get("Date")
    date_iso = None
    if date:
        try:
            date_iso = email.utils.parsedate_to_datetime(date).isoformat()
        except (TypeError, ValueError, IndexError, OverflowError):
            # Huge numbers in a Date overflow; the field is still given as written.
            date_iso = None
    subject = h.get("Subject")
    senders = _addresses("From", h.get_all("From"))
    doc: dict[str, Any] = {
        "id": message.id,
        "kind": str(message.kind),
        "received": _iso(message.received),
        "listener": message.listener,
        "envelope": (
            {"sender": message.sender, "recipients": list(message.recipients)}
            if isinstance(message, MailMessage)
            else None
        ),
    }
    if isinstance(message, Article):
        doc["newsgroups"] = list(message.newsgroups)
    doc.update(
        {
            "message_id": message.message_id,
            "subject": decode_field(subject) if subject is not None else None,
            "date": date,
            "date_iso": date_iso,
            "from": senders[0] if senders else None,
            "to": _addresses("To", h.get_all("To")),
            "cc": _addresses("Cc", h.get_all("Cc")),
            "headers": headers,
            "text": "\n".join(parts.text) if parts.text else None,
            "html": "\n".join(parts.html) if parts.html else None,
            "attachments": parts.attachments,
        }
    )
    return doc


def encode_document(doc: Mapping[str, Any]) -> bytes:
    # Lone surrogates (from undecodable bytes) would make invalid UTF-8: escape them instead.
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def preview(config: WebhookDestinationConfig, message: Message) -> Any:
    """The JSON body the destination would POST for ``message``, as ``gateway test`` checks
    it (ValueError for a message it does not take)."""
    if not isinstance(message, MailMessage | Article):
        raise ValueError(f"a web hook takes mail and articles, not {message.kind}")
    body = encode_document(message_document(message, attachment_limit=int(config.attachment_limit)))
    return json.loads(body)


# --------------------------------------------------------------------------- the HTTP shell


@implementer(IPolicyForHTTPS)
class _TlsPolicy:
    def __init__(self, verify: bool, trust_root: Any) -> None:
        self.verify = verify
        self.trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        host = hostname.decode("ascii")
        if not self.verify:
            return UnverifiedTls(host)
        # Without a CA file: the system's trust store.
        return optionsForClientTLS(host, trustRoot=self.trust_root)


class _Snippet(Protocol):
    """Keeps the start of a response body, reads on to the end so the connection can be reused."""

    def __init__(self) -> None:
        self.kept = b""
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if len(self.kept) < _REASON_CHARS * 4:
            self.kept += data[: _REASON_CHARS * 4 - len(self.kept)]
        self.size += len(data)
        if self.size > _MAX_DISCARD:
            # Not worth reading: close this connection instead of reusing it.
            self._abort()
            self.done.callback(self.kept)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            # The status line decided the outcome; a body cut short changes nothing.
            self.done.callback(self.kept)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


class _Stale(Exception):
    """A kept-alive connection closed as the request went out: safe to send once more."""


def _reasons(exc: BaseException) -> list[BaseException]:
    found = getattr(exc, "reasons", None)
    if not found:
        return [exc]
    out: list[BaseException] = []
    for reason in found:
        value = reason.value if isinstance(reason, Failure) else reason
        if isinstance(value, BaseException):
            out.append(value)
    return out or [exc]


def _describe(exc: BaseException, origin: str) -> str:
    reasons = _reasons(exc)
    for value in reasons:
        if isinstance(value, SSL.Error):
            queue = value.args[0] if value.args and isinstance(value.args[0], list) else []
            detail = "; ".join(str(e[-1]) for e in queue if isinstance(e, tuple) and e)
            return (
                f"{origin}: TLS handshake failed: {detail or value or 'no reason given'}; set ca:"
                " to the CA file that signed the server's certificate, or verify: false for a"
                " test server"
            )
        if type(value).__name__ in ("VerificationError", "CertificateError"):
            return f"{origin}: the server's certificate is not for this host ({value})"
    value = reasons[0]
    if isinstance(value, ConnectionRefusedError):
        return f"{origin} refused the connection; is the web hook's server running?"
    if isinstance(value, DNSLookupError):
        return f"cannot resolve the host name of {origin}: {value}"
    if isinstance(value, ConnectTimeoutError | ConnectingCancelledError):
        return f"no connection to {origin} in time"
    if isinstance(value, ConnectError):
        return f"cannot connect to {origin}: {value}"
    if all(isinstance(v, ConnectionClosed) for v in reasons):
        return f"{origin} closed the connection before answering"
    return f"request to {origin} failed: {'; '.join(str(v) or type(v).__name__ for v in reasons)}"


class WebhookDestination(FileSink):
    """POSTs spooled mail and articles as JSON, and sends uploaded files (PUT or POST), over a
    pool of keep-alive connections."""

    def __init__(
        self,
        config: WebhookDestinationConfig,
        reactor: Any,
        *,
        clock: Any = time.time,
    ) -> None:
        parts = urlsplit(config.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not config.url.isascii():
            raise ValueError(
                f"destination '{config.name}': the web hook URL must look like"
                f" https://host/path, not {config.url!r}"
            )
        self.config = config
        self.name = config.name
        self.kinds: frozenset[Kind] = config.kinds
        self.reactor = reactor
        self.clock = clock
        self.url = config.url
        # What reasons and logs show: a query may hold a token, and a permanent failure's
        # reason goes back to the mail's sender in the bounce.
        self.shown_url = urlunsplit(parts._replace(query="", fragment=""))
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self._origin = (
            f"{parts.scheme}://{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        )
        trust_root = load_trust_root(config.ca) if config.ca and config.verify else None
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._pool.maxPersistentPerHost = max(1, config.concurrency)
        self._pool.cachedConnectionTimeout = _IDLE_KEEPALIVE
        # A POST is not idempotent: this module decides itself when sending again is safe.
        self._pool.retryAutomatically = False
        self._agent = Agent(  # type: ignore[no-untyped-call]
            reactor,
            contextFactory=_TlsPolicy(config.verify, trust_root),
            connectTimeout=max(1.0, float(config.timeout)),
            pool=self._pool,
        )
        self._extra = [(str(k), str(v)) for k, v in config.headers.items()]
        for name, value in [*self._extra, (config.signature_header, "")]:
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or re.search(
                r"[\r\n\0]", value
            ):
                raise ValueError(
                    f"destination '{config.name}': header {name!r} is not a valid HTTP header"
                )
        self.requests = 0  # for tests and metrics

    def request_headers(self, message: Message, body: bytes) -> Headers:
        headers = self._headers(message, "application/json; charset=utf-8")
        if self.config.secret:
            self._sign(headers, sign(self.config.secret, body))
        return headers

    def _headers(self, message: Message, content_type: str) -> Headers:
        """What every request carries: its type, who sends it, the message's id (a receiver
        recognises a retry by it) and the destination's own header fields."""
        headers = Headers(
            {
                b"content-type": [content_type.encode("ascii")],
                b"user-agent": [_USER_AGENT],
                b"idempotency-key": [message.id.encode("ascii", "replace")],
            }
        )
        for name, value in self._extra:
            headers.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))
        return headers

    def _sign(self, headers: Headers, signature: str) -> None:
        headers.setRawHeaders(
            self.config.signature_header.encode("latin-1"), [signature.encode("ascii")]
        )

    async def deliver(self, message: Message) -> Outcome:
        if isinstance(message, FileMessage) and message.append:
            return Outcome.permanent("a web service cannot be asked to add to a file (APPE)")
        if isinstance(message, FileMessage) and message.path:
            return await self._deliver_file(message)
        if not isinstance(message, MailMessage | Article):
            return Outcome.permanent(
                f"a web hook takes mail, articles and uploaded files, not {message.kind}"
            )
        try:
            body = encode_document(
                message_document(message, attachment_limit=int(self.config.attachment_limit))
            )
        except Exception as exc:
            log.failure("converting message {id} to JSON failed", id=message.id)
            return Outcome.permanent(f"the message cannot be turned into JSON: {exc}")
        headers = self.request_headers(message, body)
        return await self._send(b"POST", self.url, body, headers, stall=False)

    async def _deliver_file(self, message: FileMessage) -> Outcome:
        """An uploaded file, streamed from the spool: PUT at the URL plus its name, or POSTed
        to the URL as the one part of a multipart/form-data body."""
        try:
            name = tidy_name(message.name)
        except FileProblem as exc:
            return Outcome.permanent(exc.detail)
        leaf = name.rpartition("/")[2]
        kind = mimetypes.guess_type(leaf)[0] or "application/octet-stream"
        url: str = self.url
        prefix, suffix = b"", b""
        if self.config.method == "PUT":
            parts = urlsplit(self.url)
            path = parts.path.rstrip("/") + "/" + quote(name)
            url = urlunsplit(parts._replace(path=path))
            headers = self._headers(message, kind)
        else:
            boundary = f"gateway-{message.id}-{os.urandom(8).hex()}"
            quoted = leaf.replace("\\", "\\\\").replace('"', '\\"')
            prefix = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file";'
                f' filename="{quoted}"\r\nContent-Type: {kind}\r\n\r\n'
            ).encode("utf-8", "replace")
            suffix = f"\r\n--{boundary}--\r\n".encode("ascii")
            headers = self._headers(message, f"multipart/form-data; boundary={boundary}")
        if self.config.secret:
            signature = await deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                sign_file,
                self.config.secret,
                prefix,
                message.path,
                suffix,
            )
            self._sign(headers, signature)

        def body(progress: Callable[[], None]) -> FileProducer:
            return FileProducer(self.reactor, message.path, prefix, suffix, progress)

        method = self.config.method.encode("ascii")
        return await self._send(method, url, body, headers, stall=True)

    async def _send(
        self,
        method: bytes,
        url: str,
        body: bytes | Callable[[Callable[[], None]], FileProducer],
        headers: Headers,
        *,
        stall: bool,
    ) -> Outcome:
        """One request, answered within ``timeout``: the whole of it, or with ``stall`` (a
        file streamed from the spool, ``body`` making its producer) between two blocks of
        the body and then for the answer, so that a large file may take its time."""
        timeout = float(self.config.timeout)
        timer: Any = None

        def progress() -> None:
            if stall and timer is not None and timer.active():
                timer.reset(timeout)

        sent: Any = body if isinstance(body, bytes) else (lambda: body(progress))
        self.requests += 1
        attempt = Deferred.fromCoroutine(self._post(sent, headers, method, url))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()  # what it raises then may be wrapped (ResponseNeverReceived)

        timer = self.reactor.callLater(timeout, expire)
        shown = urlunsplit(urlsplit(url)._replace(query="", fragment=""))
        try:
            status, phrase, retry_after, snippet = await attempt
        except Exception as exc:
            if expired and stall:
                return Outcome.temporary(f"{shown} stalled for {timeout:g}s")
            if expired:
                return Outcome.temporary(f"no answer from {shown} within {timeout:g}s")
            if stall and isinstance(exc, OSError):  # the spooled file could not be read
                return Outcome.temporary(f"cannot read the spooled file: {exc.strerror or exc}")
            return Outcome.temporary(_describe(exc, self._origin))
        finally:
            if timer.active():
                timer.cancel()
        return outcome_for_status(shown, status, phrase, snippet, retry_after)

    async def _post(
        self, body: Any, headers: Headers, method: bytes = b"POST", url: str = ""
    ) -> tuple[int, str, float | None, bytes]:
        """``body`` is the bytes, or a function that makes a new body producer each time."""
        try:
            return await self._once(body, headers, method, url)
        except _Stale:
            pass
        try:
            return await self._once(body, headers, method, url)
        except _Stale as exc:
            raise exc.__cause__ or exc from None

    async def _once(
        self, body: Any, headers: Headers, method: bytes, url: str
    ) -> tuple[int, str, float | None, bytes]:
        producer: Any = BytesProducer(body) if isinstance(body, bytes) else body()
        try:
            response: Any = await self._agent.request(
                method,
                (url or self.url).encode("ascii", "strict"),
                headers,
                producer,
            )
        except CancelledError:
            raise
        except (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived) as exc:
            values = _reasons(exc)
            if isinstance(exc, RequestNotSent) or (
                values and all(isinstance(v, ConnectionDone | ConnectionClosed) for v in values)
            ):
                raise _Stale() from exc
            raise
        reader = _Snippet()
        response.deliverBody(reader)
        snippet = await reader.done
        retry = response.headers.getRawHeaders(b"retry-after")
        retry_after = parse_retry_after(retry[0].decode("latin-1"), self.clock()) if retry else None
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        return int(response.code), phrase, retry_after, snippet

    async def close(self) -> None:
        await self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
