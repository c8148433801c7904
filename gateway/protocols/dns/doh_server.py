"""DNS over HTTPS (RFC 8484) and the JSON form browsers and scripts use, as a twisted.web Site.

The site only translates between HTTP and DNS messages: every query, whatever its form, goes to
the same DnsHandler as UDP and TCP ones, with transport "doh". Over TLS the site speaks HTTP/2
by itself (ALPN) when the h2 package is installed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import secrets
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from gateway.protocols.dns.server import DnsHandler
from gateway.protocols.dns.wire import NOERROR, NXDOMAIN, WireError, inspect_response

try:  # HTTP/2 comes with the h2 extra
    from h2.exceptions import StreamClosedError, StreamIDTooLowError

    _H2_STREAM_ERRORS: tuple[type[BaseException], ...] = (StreamClosedError, StreamIDTooLowError)
except ImportError:  # pragma: no cover - without h2 there are no HTTP/2 streams
    _H2_STREAM_ERRORS = ()


class StreamGone(Exception):
    """The client reset an HTTP/2 stream while its request was being answered.

    twisted.web answers a request whose stream the h2 state machine has closed
    already (HEADERS then RST_STREAM in one read, the "rapid reset" of
    CVE-2023-44487): writing the answer then fails inside twisted.web, which
    logs it as critical twice. The request raises this instead, and the
    listener closes the connection: a client that resets streams it just
    opened gets no more from this connection.
    """


def stream_gone(error: BaseException) -> bool:
    """Whether ``error`` says the client reset the stream being answered."""
    return isinstance(error, (StreamGone, *_H2_STREAM_ERRORS))


__all__ = [
    "DNS_JSON",
    "DNS_MESSAGE",
    "answer_json",
    "cache_control",
    "decode_dns_parameter",
    "doh_site",
]

log = Logger(namespace="gateway.dns.doh")

DNS_MESSAGE = b"application/dns-message"
DNS_JSON = b"application/dns-json"
_TEXT = b"text/plain; charset=utf-8"

# Idle HTTP connections are closed after this long; clients reconnect when they need to.
_IDLE_TIMEOUT = 60.0

# base64url (RFC 4648 §5) with optional padding, as RFC 8484 §4.1 writes the dns parameter.
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*={0,2}")

# The JSON form's answer to these would not be one DNS message (zone transfers) or is not a
# question at all (OPT, TSIG, TKEY).
_REFUSED_JSON_TYPES = frozenset(
    {
        dns.rdatatype.OPT,
        dns.rdatatype.TKEY,
        dns.rdatatype.TSIG,
        dns.rdatatype.IXFR,
        dns.rdatatype.AXFR,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
    }
)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def decode_dns_parameter(value: bytes) -> bytes:
    """The DNS message in a GET request's ``dns`` parameter: base64url, padding optional.

    Raises ValueError with a sentence for the client when ``value`` is not base64url.
    """
    if not _BASE64URL.fullmatch(value):
        raise ValueError("the dns parameter is not base64url (A-Z a-z 0-9 - _, RFC 8484 §4.1)")
    stripped = value.rstrip(b"=")
    if len(stripped) % 4 == 1:
        raise ValueError("the dns parameter is not base64url: its length is impossible")
    try:
        return base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the dns parameter is not base64url: {exc}") from None


def cache_control(answer: bytes) -> bytes:
    """The Cache-Control value for a DNS answer (RFC 8484 §5.1).

    max-age is the smallest TTL of any record (so no more than the smallest in the answer
    section); an answer with an SOA in the authority section (NXDOMAIN or NODATA, also at the
    end of a CNAME chain) is also held to min(SOA TTL, SOA MINIMUM) (RFC 2308 §5). Only
    NOERROR and NXDOMAIN answers that are not truncated may be cached (RFC 2308 §7 leaves
    SERVFAIL to a few seconds at most, others are not answers at all). An answer without
    records, or one that cannot be read, gets max-age=0: a number, so clients that compute
    expiry from max-age keep working, and zero, so nothing caches it.
    """
    try:
        info = inspect_response(answer)
    except WireError:
        return b"max-age=0"
    if info.truncated or info.rcode not in (NOERROR, NXDOMAIN):
        return b"max-age=0"
    ttl = info.min_ttl
    if info.negative_ttl is not None:
        ttl = info.negative_ttl if ttl is None else min(ttl, info.negative_ttl)
    return b"max-age=%d" % (ttl or 0)


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


def _accepts_json(request: server.Request) -> bool:
    accept = request.getHeader(b"accept") or b""
    return any(_media_type(part) == DNS_JSON for part in accept.split(b","))


def _client(request: server.Request) -> tuple[str, int]:
    address = request.getClientAddress()  # type: ignore[no-untyped-call]
    return (str(getattr(address, "host", "")), int(getattr(address, "port", 0)))


def _single(args: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = args.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise _HttpError(http.BAD_REQUEST, f"give the {name.decode()} parameter once")
    return values[0]


def _flag(args: dict[bytes, list[bytes]], name: bytes) -> bool:
    value = _single(args, name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in (b"1", b"true"):
        return True
    if lowered in (b"", b"0", b"false"):
        return False
    raise _HttpError(http.BAD_REQUEST, f"{name.decode()} must be 0, 1, true or false")


def _json_rrtype(value: bytes | None) -> int:
    if value is None:
        return int(dns.rdatatype.A)
    text = value.decode("ascii", "replace").strip()
    try:
        rdtype = int(text) if text.isdigit() else int(dns.rdatatype.from_text(text.upper()))
    except (dns.exception.DNSException, ValueError):
        rdtype = -1
    if not 0 < rdtype <= 0xFFFF:
        raise _HttpError(
            http.BAD_REQUEST,
            f"unknown record type {text!r}: give a name such as A, AAAA, MX or a number 1-65535",
        )
    if rdtype in _REFUSED_JSON_TYPES:
        raise _HttpError(http.BAD_REQUEST, f"type {text} cannot be asked for here")
    return rdtype


def _json_name(value: bytes | None) -> dns.name.Name:
    if value is None or not value.strip():
        raise _HttpError(http.BAD_REQUEST, "missing name parameter: ?name=www.example.com&type=A")
    try:
        return dns.name.from_text(value.decode("utf-8").strip())
    except (UnicodeDecodeError, dns.exception.DNSException, ValueError) as exc:
        raise _HttpError(http.BAD_REQUEST, f"not a valid DNS name: {exc}") from None


def _name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True) if len(name) > 1 else "."


def answer_json(answer: bytes) -> dict[str, Any]:
    """A DNS answer in the JSON form of Cloudflare's and Google's resolvers."""
    message = dns.message.from_wire(answer)
    flags = message.flags
    result: dict[str, Any] = {
        "Status": int(message.rcode()),
        "TC": bool(flags & dns.flags.TC),
        "RD": bool(flags & dns.flags.RD),
        "RA": bool(flags & dns.flags.RA),
        "AD": bool(flags & dns.flags.AD),
        "CD": bool(flags & dns.flags.CD),
        "Question": [
            {"name": _name_text(rrset.name), "type": int(rrset.rdtype)}
            for rrset in message.question
        ],
    }
    for key, section in (
        ("Answer", message.answer),
        ("Authority", message.authority),
        ("Additional", message.additional),
    ):
        records = [
            {
                "name": _name_text(rrset.name),
                "type": int(rrset.rdtype),
                "TTL": int(rrset.ttl),
                "data": rdata.to_text(),
            }
            for rrset in section
            for rdata in rrset
        ]
        if records:
            result[key] = records
    return result


class _DohRequest(server.Request):
    """A request whose body is kept in memory and refused once it exceeds the site's max_size.

    A body announced too big with ``Expect: 100-continue`` is refused before it is sent: 413,
    then the connection closes. Any other too big body is read and thrown away as it arrives,
    and answered 413 once complete, so the connection stays usable.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        self.max_size: int = getattr(channel.site, "max_size", 65535)
        self.too_big = False
        self.answered_early = False
        self._received = 0

    def render(self, resrc: Any) -> None:
        request: Any = self  # twisted.web's Request is not typed
        # twisted.web names itself and its version in Server: a scanner need not know.
        request.setHeader(b"server", b"gateway")
        hsts = getattr(request.channel.site, "hsts", b"")
        if hsts and request.isSecure():
            request.setHeader(b"strict-transport-security", hsts)
        base: Any = server.Request
        base.render(request, resrc)

    def processingFailed(self, reason: Failure) -> Any:
        error = reason.value
        if error is not None and stream_gone(error):
            raise StreamGone(str(error)) from error
        return super().processingFailed(reason)  # type: ignore[no-untyped-call]

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > self.max_size:
            self.too_big = True
            self._refuse_before_body()

    def _refuse_before_body(self) -> None:
        # HTTP/2 streams are answered when they end: the connection carries other streams.
        if not isinstance(self.channel, http.HTTPChannel):
            return
        channel: Any = self.channel
        expect = self.requestHeaders.getRawHeaders(b"expect")
        if not expect or expect[0].lower() != b"100-continue":
            return
        # Without the header the channel sends no "100 Continue", so the body never comes.
        self.requestHeaders.removeHeader(b"expect")
        body = b"The query is bigger than %d bytes.\n" % self.max_size
        channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: " + _TEXT
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )  # fmt: skip
        self.answered_early = True
        channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_big:
            return
        self._received += len(data)
        if self._received > self.max_size:
            self.too_big = True
            self.content = io.BytesIO()
            return
        content: Any = self.content
        content.write(data)


class _DohResource(Resource):
    isLeaf = True

    def __init__(
        self,
        handler: DnsHandler,
        path: bytes,
        max_size: int,
        throttle: Callable[[str], float] | None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.handler = handler
        self.path = path
        self.max_size = max_size
        self.throttle = throttle

    def render(self, request: server.Request) -> bytes | int:
        if getattr(request, "answered_early", False):
            return server.NOT_DONE_YET
        json_mode = False
        try:
            json_mode = self._wants_json(request)
            if self.throttle is not None:
                wait = self.throttle(_client(request)[0])
                if wait:
                    raise _HttpError(
                        429,
                        "too many queries, slow down",
                        {b"retry-after": b"%d" % max(1, math.ceil(wait))},
                    )
            return self._route(request, json_mode)
        except _HttpError as exc:
            return _error(request, exc, json_mode)
        except Exception:
            log.failure("DoH request {method} {uri} failed", method=request.method, uri=request.uri)
            return _error(
                request, _HttpError(http.INTERNAL_SERVER_ERROR, "internal error"), json_mode
            )

    def _wants_json(self, request: server.Request) -> bool:
        if request.method != b"GET" or request.path != self.path:
            return False
        args = request.args or {}
        return b"dns" not in args and (b"name" in args or _accepts_json(request))

    def _route(self, request: server.Request, json_mode: bool) -> bytes | int:
        if request.path != self.path:
            raise _HttpError(
                http.NOT_FOUND, f"Not found: DNS over HTTPS is served at {self.path.decode()}"
            )
        if request.method not in (b"GET", b"POST"):
            raise _HttpError(http.NOT_ALLOWED, "use GET or POST", {b"allow": b"GET, POST"})
        if getattr(request, "too_big", False):
            raise self._too_big()
        if request.method == b"POST":
            if _media_type(request.getHeader(b"content-type")) != DNS_MESSAGE:
                raise _HttpError(
                    http.UNSUPPORTED_MEDIA_TYPE,
                    "POST a DNS message with Content-Type: application/dns-message",
                )
            assert request.content is not None
            data = request.content.read(self.max_size + 1)
            return self._wire(request, data)
        args = request.args or {}
        if json_mode:
            return self._json(request, args)
        if b"name" in args:
            raise _HttpError(http.BAD_REQUEST, "give either dns= or name=, not both")
        value = _single(args, b"dns")
        if value is None:
            raise _HttpError(
                http.BAD_REQUEST,
                "missing dns parameter: GET ?dns=<base64url DNS message>, or ?name=...&type=...",
            )
        try:
            data = decode_dns_parameter(value)
        except ValueError as exc:
            raise _HttpError(http.BAD_REQUEST, str(exc)) from None
        return self._wire(request, data)

    def _too_big(self) -> _HttpError:
        return _HttpError(
            http.REQUEST_ENTITY_TOO_LARGE, f"The query is bigger than {self.max_size} bytes."
        )

    # --- application/dns-message

    def _wire(self, request: server.Request, data: bytes) -> bytes | int:
        if len(data) > self.max_size:
            raise self._too_big()
        if len(data) < 12:
            raise _HttpError(http.BAD_REQUEST, "the DNS message is shorter than its header")
        return self._ask(request, data, self._wire_answer, json_mode=False)

    def _wire_answer(self, request: server.Request, answer: bytes | None) -> bytes:
        if answer is None:
            raise _HttpError(http.BAD_REQUEST, "not a DNS query")
        _set_headers(
            request, {b"content-type": DNS_MESSAGE, b"cache-control": cache_control(answer)}
        )
        return answer

    # --- application/dns-json

    def _json(self, request: server.Request, args: dict[bytes, list[bytes]]) -> bytes | int:
        name = _json_name(_single(args, b"name"))
        rdtype = _json_rrtype(_single(args, b"type"))
        do = _flag(args, b"do")
        cd = _flag(args, b"cd")
        query = dns.message.make_query(
            name,
            dns.rdatatype.RdataType.make(rdtype),
            use_edns=0,
            payload=1232,
            want_dnssec=do,
            id=secrets.randbits(16),
        )
        if cd:
            query.flags |= dns.flags.CD
        return self._ask(request, query.to_wire(), self._json_answer, json_mode=True)

    def _json_answer(self, request: server.Request, answer: bytes | None) -> bytes:
        if answer is None:
            raise _HttpError(http.BAD_GATEWAY, "no answer to the query")
        try:
            body = answer_json(answer)
        except (dns.exception.DNSException, ValueError) as exc:
            raise _HttpError(http.BAD_GATEWAY, f"the answer could not be read: {exc}") from None
        _set_headers(request, {b"content-type": DNS_JSON, b"cache-control": cache_control(answer)})
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    # --- asking the handler

    def _ask(
        self,
        request: server.Request,
        data: bytes,
        respond: Callable[[server.Request, bytes | None], bytes],
        *,
        json_mode: bool,
    ) -> bytes | int:
        result = self.handler.answer(data, _client(request), "doh")
        if not isinstance(result, Deferred):
            return respond(request, result)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def deliver(answer: bytes | None) -> None:
            if gone:
                return
            try:
                body = respond(request, answer)
            except _HttpError as exc:
                body = _error(request, exc, json_mode)
            except Exception:
                log.failure("DoH response to {client} failed", client=_client(request))
                error = _HttpError(http.INTERNAL_SERVER_ERROR, "internal error")
                body = _error(request, error, json_mode)
            _send(request, body)

        def failed(failure: Failure) -> None:
            log.failure(
                "DNS handler failed on a DoH query from {client}", failure, client=_client(request)
            )
            if not gone:
                error = _HttpError(http.INTERNAL_SERVER_ERROR, "the query could not be answered")
                _send(request, _error(request, error, json_mode))

        result.addCallbacks(deliver, failed)
        result.addErrback(lambda f: log.failure("DoH response to {uri} failed", f, uri=request.uri))
        return server.NOT_DONE_YET


def _set_headers(request: server.Request, headers: dict[bytes, bytes]) -> None:
    for name, value in headers.items():
        request.setHeader(name, value)  # type: ignore[no-untyped-call]


def _send(request: server.Request, body: bytes) -> None:
    # Not chunked: the length is known, as when render() returns the body.
    _set_headers(request, {b"content-length": b"%d" % len(body)})
    request.write(body)  # type: ignore[no-untyped-call]
    request.finish()  # type: ignore[no-untyped-call]


def _error(request: server.Request, error: _HttpError, json_mode: bool) -> bytes:
    request.setResponseCode(error.status)
    _set_headers(request, error.headers)
    if json_mode:
        body = json.dumps({"error": str(error)}).encode() + b"\n"
    else:
        body = str(error).encode() + b"\n"
    _set_headers(
        request, {b"cache-control": b"no-store", b"content-type": DNS_JSON if json_mode else _TEXT}
    )
    return body


class _DohSite(server.Site):
    noisy = False
    requestFactory = _DohRequest
    displayTracebacks = False

    def __init__(self, resource: _DohResource, *, max_size: int, reactor: Any, hsts: float) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, parsePOSTFormSubmission=False, timeout=_IDLE_TIMEOUT, reactor=reactor
        )
        self.max_size = max_size
        self.hsts = b"max-age=%d" % int(hsts) if hsts > 0 else b""

    def log(self, request: Any) -> None:
        # One access-log line per DNS query would drown every other message.
        pass


def doh_site(
    handler: DnsHandler,
    *,
    path: str = "/dns-query",
    max_size: int = 65535,
    reactor: IReactorTime | None = None,
    hsts: float = 0.0,
    throttle: Callable[[str], float] | None = None,
) -> server.Site:
    """A web site answering DNS over HTTPS at ``path`` (RFC 8484) and its JSON form.

    GET ``?dns=`` (base64url) and POST ``application/dns-message`` carry DNS messages; GET
    ``?name=&type=`` (or ``Accept: application/dns-json``) is answered in JSON. Queries bigger
    than ``max_size`` get 413. Listen on it with any stream endpoint ("ssl:..." for HTTPS);
    ``reactor`` times out idle connections (the global one if None). Over HTTPS, answers
    carry ``Strict-Transport-Security: max-age=<hsts>`` unless ``hsts`` is 0.
    ``throttle(client)`` says how long a client over its query rate must wait (429).
    """
    if not path.startswith("/"):
        raise ValueError(f"the DoH path must start with '/', got {path!r}")
    if not 12 <= max_size <= 65535:
        raise ValueError(f"max_size must be 12-65535 bytes (a DNS message's range), got {max_size}")
    resource = _DohResource(handler, path.encode("utf-8"), max_size, throttle)
    return _DohSite(resource, max_size=max_size, reactor=reactor, hsts=hsts)
