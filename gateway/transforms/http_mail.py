"""``http_to_mail``: a web hook (a POST of JSON or a form) becomes a mail.

The listener hands over the request; this transform checks it, reads the
payload and builds a MIME message from the route's options. The listener
answers ``202`` with the message's id once the mail is in the spool::

    routes:
      - name: deploys
        from: web-in
        match: {path: '^/hooks/(?P<team>[a-z]+)$'}
        transforms: [http_to_mail]
        options:
          from: 'Deploy bot <deploy@example.test>'
          to: ['{team}@example.test', ops@example.test]
          subject: 'Deployed {{repository.name}} ({{@path}})'
          body_field: message            # or: body: "{{user}} says {{text}}"
          secret: s3cret                 # check X-Hub-Signature-256: sha256=<hex>
        to: smarthost

Options:

* ``from`` (required) and ``to`` (required; one address or a list): the
  header fields and the envelope. ``sender`` sets the envelope sender (default:
  the address in ``from``). These take the route's named groups (``{team}``)
  but never fields of the payload, so whoever can POST cannot choose where
  mail goes.
* ``subject`` (default ``Web hook {{@path}}``) and ``body``: templates.
* ``body_field``: the mail's text is this field of the payload. Without
  ``body`` or ``body_field`` the text is the payload pretty-printed as JSON
  (a form as a JSON object of its fields).
* ``secret`` and ``signature_header`` (default ``X-Hub-Signature-256``): the
  request must carry ``sha256=<hex>``, the HMAC-SHA256 of its raw body under the
  secret (GitHub's scheme); it is compared in constant time.
* ``message_id_domain``: the right side of the Message-ID (default: this host's name).

Templates: in routes.yaml, a field of the payload is written in double braces,
``{{name}}``, and a field inside it with dots: ``{{repository.owner.login}}``,
``{{commits.0.id}}`` (a number picks an item of a list). Single braces,
``{team}``, are the route's named groups, filled in first. Text is inserted as
it is, numbers and true/false as JSON writes them, null as nothing, lists and
objects as compact JSON. A form field given several times is a list. ``@``
names are the request's own: ``{{@method}}``, ``{{@path}}``, ``{{@target}}``
(path and query), ``{{@host}}``, ``{{@client}}`` and ``{{@id}}``. Nothing else
is evaluated: a template cannot call code. A brace meant literally is written
``{{{{`` or ``}}}}``. A field the payload lacks refuses the request (400).

What the client gets: a wrong or missing signature 401; a method other than
POST 405; a content type other than JSON (``application/json`` or
``*/*+json``), ``application/x-www-form-urlencoded`` or ``multipart/form-data``
415; a body that does not parse 400 with what is wrong and where. Files
uploaded in a multipart form become attachments of the mail.
"""

from __future__ import annotations

import email.header
import email.message
import email.parser
import email.policy
import email.utils
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.message import Headers, HttpRequest, Kind, MailMessage, local_hostname
from gateway.plugins import Option, Reject, transform
from gateway.ports import Reason
from gateway.signing import signature_matches

__all__ = ["http_to_mail", "render"]

DEFAULT_SIGNATURE_HEADER = "X-Hub-Signature-256"
DEFAULT_SUBJECT = "Web hook {@path}"
_MAX_FORM_FIELDS = 1000

# The policy of the mails built here: LF inside the gateway, and only 7-bit bodies on the
# wire (the email package picks quoted-printable or base64, whichever is shorter).
_POLICY = email.policy.default.clone(linesep="\n", cte_type="7bit", max_line_length=78)


@dataclass
class Payload:
    """A parsed web hook: its data for templates, and files for attachments."""

    data: Any
    source: str  # "JSON" or "form", for messages
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # name, type, content


# --------------------------------------------------------------------------- templates


_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def render(template: str, lookup: Any, what: str, transform: str = "http_to_mail") -> str:
    """Fill ``{path}`` placeholders of ``template`` with ``lookup(path, what)``.

    ``{{`` and ``}}`` stand for literal braces. ``what`` names the option (of
    ``transform``) in messages. A stray brace raises ValueError (a mistake in routes.yaml).
    """
    out: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        out.append(template[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token == "{{":
            out.append("{")
        elif token == "}}":
            out.append("}")
        elif m.group(1) is not None:
            name = m.group(1).strip()
            if not name:
                raise ValueError(
                    f"option {what} of {transform} has an empty placeholder at position"
                    f" {m.start()}; write {{{{field}}}} in routes.yaml"
                )
            out.append(as_text(lookup(name, what)))
        else:
            raise ValueError(
                f"option {what} of {transform} has a lone '{token}' at position {m.start()};"
                " a field is written {{field}} in routes.yaml and a literal brace"
                " {{{{ or }}}}"
            )
    out.append(template[pos:])
    return "".join(out)


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def find(data: Any, path: str, source: str, what: str) -> Any:
    """The field ``path`` (dot-separated names and list indexes) of ``data``, or Reject 400."""
    node = data
    walked: list[str] = []
    for segment in path.split("."):
        if isinstance(node, Mapping) and segment in node:
            node = node[segment]
        elif (
            isinstance(node, list)
            and re.fullmatch(r"-?\d+", segment)
            and -len(node) <= int(segment) < len(node)
        ):
            node = node[int(segment)]
        else:
            where = f" in '{'.'.join(walked)}'" if walked else ""
            missing = "list item" if isinstance(node, list) else "field"
            raise Reject(
                f"the {what} of this web hook needs '{path}', but the posted {source} has no"
                f" {missing} '{segment}'{where}",
                reason=Reason.BAD_MESSAGE,
            )
        walked.append(segment)
    return node


# --------------------------------------------------------------------------- the request


def _header(request: HttpRequest, name: str) -> str | None:
    wanted = name.lower()
    for key, value in request.http_headers:
        if key.lower() == wanted:
            return value
    return None


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    msg = email.message.Message()
    msg["Content-Type"] = value
    params = {k.lower(): str(v) for k, v in msg.get_params(failobj=[], header="Content-Type")[1:]}
    main = value.split(";", 1)[0].strip().lower()
    return main, params


def _parse_json(body: bytes) -> Payload:
    if not body.strip():
        raise Reject("the body is empty; expected a JSON document", reason=Reason.BAD_MESSAGE)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Reject(
            f"the body is not UTF-8 text: byte 0x{body[exc.start]:02x} at offset {exc.start}",
            reason=Reason.BAD_MESSAGE,
        ) from None

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(text.removeprefix("\ufeff"), parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise Reject(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            reason=Reason.BAD_MESSAGE,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise Reject(f"the body is not valid JSON: {exc}", reason=Reason.BAD_MESSAGE) from None
    return Payload(data, "JSON")


def _form_value(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


def _parse_urlencoded(body: bytes) -> Payload:
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Reject(
            f"the form is not URL-encoded: byte 0x{body[exc.start]:02x} at offset {exc.start}"
            " must be percent-encoded",
            reason=Reason.BAD_MESSAGE,
        ) from None
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except UnicodeDecodeError:
        raise Reject(
            "the form holds a percent-encoded value that is not UTF-8", reason=Reason.BAD_MESSAGE
        ) from None
    except ValueError as exc:
        raise Reject(f"the form cannot be read: {exc}", reason=Reason.BAD_MESSAGE) from None
    fields: dict[str, list[str]] = {}
    for key, value in pairs:
        fields.setdefault(key, []).append(value)
    return Payload({k: _form_value(v) for k, v in fields.items()}, "form")


def _raw_part_bodies(body: bytes, boundary: str) -> list[bytes]:
    """The bytes of each part's body in a multipart ``body`` (RFC 2046 5.1.1), in order."""
    dash_boundary = rb"--" + re.escape(boundary.encode("latin-1", "replace"))
    delimiter = re.compile(rb"(?:\A|\r?\n)" + dash_boundary + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    bodies: list[bytes] = []
    previous: re.Match[bytes] | None = None
    for found in delimiter.finditer(body):
        if previous is not None:
            segment = body[previous.end() : found.start()]
            if segment.startswith((b"\r\n", b"\n")):
                bodies.append(segment[2:] if segment.startswith(b"\r\n") else segment[1:])
            else:
                cut = [i for i in (segment.find(b"\r\n\r\n"), segment.find(b"\n\n")) if i >= 0]
                at = min(cut) if cut else len(segment)
                bodies.append(segment[at + (4 if segment[at : at + 4] == b"\r\n\r\n" else 2) :])
        if found.group(1):
            break
        previous = found
    return bodies


def _parse_multipart(body: bytes, content_type: str, params: Mapping[str, str]) -> Payload:
    if not params.get("boundary"):
        raise Reject(
            "the multipart/form-data body has no boundary parameter in its Content-Type",
            reason=Reason.BAD_MESSAGE,
        )
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    parts = parsed.get_payload() if parsed.is_multipart() else None
    if not isinstance(parts, list) or not parts:
        raise Reject(
            "the multipart/form-data body holds no part with the boundary its Content-Type names",
            reason=Reason.BAD_MESSAGE,
        )
    missing_end = any(type(d).__name__ == "CloseBoundaryNotFoundDefect" for d in parsed.defects)
    if missing_end:
        raise Reject(
            "the multipart/form-data body is cut short: its closing boundary is missing",
            reason=Reason.BAD_MESSAGE,
        )
    if len(parts) > _MAX_FORM_FIELDS:
        raise Reject(f"the form has more than {_MAX_FORM_FIELDS} fields", reason=Reason.BAD_MESSAGE)
    fields: dict[str, list[str]] = {}
    files: list[tuple[str, str, bytes]] = []
    raw_bodies: list[bytes] | None = None
    for number, part in enumerate(parts, start=1):
        if not isinstance(part, email.message.Message):
            continue
        name = part.get_param("name", header="Content-Disposition")
        if part.get_content_disposition() != "form-data" or not name:
            raise Reject(
                f"part {number} of the form has no Content-Disposition: form-data; name=...",
                reason=Reason.BAD_MESSAGE,
            )
        name = email.utils.collapse_rfc2231_value(name)
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        if part.is_multipart() or part.get_content_maintype() in ("message", "multipart"):
            # The parser took such a part apart (or failed to); a form field's value is
            # its bytes as sent, so they are taken from the body itself.
            if raw_bodies is None:
                raw_bodies = _raw_part_bodies(body, params["boundary"])
            if number <= len(raw_bodies):
                data = raw_bodies[number - 1]
        filename = part.get_filename()
        if filename is not None:
            files.append((filename, part.get_content_type(), data))
            fields.setdefault(name, []).append(filename)
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            fields.setdefault(name, []).append(data.decode(charset))
        except (LookupError, UnicodeDecodeError):
            raise Reject(
                f"form field '{name}' is not {charset} text", reason=Reason.BAD_MESSAGE
            ) from None
    return Payload({k: _form_value(v) for k, v in fields.items()}, "form", files)


def parse_payload(request: HttpRequest) -> Payload:
    """The request's JSON or form, or Reject with 415 or 400 saying what is wrong."""
    value = _header(request, "Content-Type")
    if not value:
        raise Reject(
            "the request has no Content-Type; send application/json,"
            " application/x-www-form-urlencoded or multipart/form-data",
            reason=Reason.UNSUPPORTED_FORMAT,
        )
    media, params = _media_type(value)
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        charset = params.get("charset", "utf-8").lower()
        if charset not in ("utf-8", "utf8"):
            raise Reject(
                f"JSON must be sent as UTF-8, not {charset}", reason=Reason.UNSUPPORTED_FORMAT
            )
        return _parse_json(request.body)
    if media == "application/x-www-form-urlencoded":
        return _parse_urlencoded(request.body)
    if media == "multipart/form-data":
        return _parse_multipart(request.body, value, params)
    raise Reject(
        f"a web hook takes application/json, application/x-www-form-urlencoded or"
        f" multipart/form-data, not {media or value!r}",
        reason=Reason.UNSUPPORTED_FORMAT,
    )


def check_signature(request: HttpRequest, options: Mapping[str, Any]) -> None:
    secret = options.get("secret")
    if not secret:
        return
    header = str(options.get("signature_header") or DEFAULT_SIGNATURE_HEADER)
    given = _header(request, header)
    if given is None:
        raise Reject(
            f"the request has no {header} header; sign the body with the shared secret"
            " (sha256=<hex of HMAC-SHA256>)",
            reason=Reason.UNAUTHENTICATED,
        )
    if not signature_matches(str(secret), request.body, given):
        raise Reject(
            f"the {header} signature does not match the body", reason=Reason.UNAUTHENTICATED
        )


# --------------------------------------------------------------------------- the mail


def address_list(value: Any, option: str, *, required: bool) -> list[str]:
    entries: Sequence[Any] = [value] if isinstance(value, str) else (value or ())
    texts = [str(e).strip() for e in entries if str(e).strip()]
    if required and not texts:
        raise ValueError(f"http_to_mail needs the route option '{option}' (an address or a list)")
    for text in texts:
        pairs = email.utils.getaddresses([text])
        if not pairs or any("@" not in addr or "\n" in text for _, addr in pairs):
            raise ValueError(
                f"route option '{option}' of http_to_mail: {text!r} is not a mail address"
            )
    return texts


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ENCODED_WORD_START = "=?"
_NOT_7BIT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` on one line: control characters (CR, LF, NUL, ESC...) become spaces."""
    return " ".join(_CONTROL.sub(" ", text).split())


def subject_field(text: str) -> bytes:
    """The Subject field's value (after the colon) for ``text``: 7-bit, folded, never two fields.

    Plain ASCII is folded at spaces. Anything else, including text that looks like an
    RFC 2047 encoded word, is encoded here (RFC 2047, UTF-8), so that whatever the payload
    says reads back as the same text and can never decode into a line break.
    """
    text = one_line(text)
    words = text.split(" ")
    plain = (
        text.isascii()
        and _ENCODED_WORD_START not in text
        and all(len(word) <= 76 - len("Subject: ") for word in words)
    )
    if not text:
        return b""
    if plain:
        lines: list[str] = []
        line = "Subject:"
        for word in words:
            if len(line) + 1 + len(word) > 78 and line != "Subject:":
                lines.append(line)
                line = ""
            line += " " + word
        lines.append(line)
        return "\n".join(lines)[len("Subject:") :].encode("ascii")
    encoded = email.header.Header(text, "utf-8", header_name="Subject").encode(linesep="\n")
    return b" " + encoded.encode("ascii")


def _safe_filename(name: str) -> str:
    return one_line(name) or "upload"


@transform(
    "http_to_mail",
    accepts=[Kind.HTTP],
    produces=Kind.MAIL,
    options=[
        Option("from", str, required=True, help="the From: field, e.g. 'Bot <bot@example.test>'"),
        Option("to", str | list[str], required=True, help="recipient address(es)"),
        Option("sender", str, help="the envelope sender (default: the address in 'from')"),
        Option("subject", str, help="a template; default 'Web hook {{@path}}'"),
        Option("body", str, help="a template for the mail's text"),
        Option("body_field", str, help="the payload field that is the mail's text"),
        Option(
            "secret",
            str,
            help="check the HMAC-SHA256 signature of the body with it",
            secret=True,
        ),
        Option("signature_header", str, help="where the signature is (X-Hub-Signature-256)"),
        Option("message_id_domain", str, help="right side of the Message-ID (this host's name)"),
    ],
)
def http_to_mail(request: HttpRequest, options: Mapping[str, Any]) -> MailMessage:
    """Turn a web hook into a mail (see the module docstring)."""
    if request.method.upper() != "POST":
        raise Reject(
            f"a web hook is sent with POST, not {request.method}", reason=Reason.UNSUPPORTED_METHOD
        )
    check_signature(request, options)
    payload = parse_payload(request)

    froms = address_list(options.get("from"), "from", required=True)
    if len(froms) != 1:
        raise ValueError("route option 'from' of http_to_mail must be one address")
    recipients_text = address_list(options.get("to"), "to", required=True)
    parts = urlsplit(request.target)
    meta = {
        "@method": request.method,
        "@path": parts.path,
        "@target": request.target,
        "@host": request.host,
        "@client": request.client,
        "@id": request.id,
    }

    def lookup(path: str, what: str) -> Any:
        if path.startswith("@"):
            if path not in meta:
                raise ValueError(
                    f"option {what} of http_to_mail names '{path}'; the request's own fields are"
                    f" {', '.join(sorted(meta))}"
                )
            return meta[path]
        return find(payload.data, path, payload.source, what)

    subject = one_line(render(str(options.get("subject") or DEFAULT_SUBJECT), lookup, "subject"))
    if options.get("body") is not None:
        text = render(str(options["body"]), lookup, "body")
    elif options.get("body_field"):
        value = lookup(str(options["body_field"]).strip(), "body_field")
        text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    else:
        text = json.dumps(payload.data, indent=2, ensure_ascii=False)
    if not text.endswith("\n"):
        text += "\n"

    domain = str(options.get("message_id_domain") or local_hostname())
    msg = email.message.EmailMessage(policy=_POLICY)
    msg["Received"] = (
        f"from {request.client or 'unknown'} by {domain} (gateway) with HTTP id {request.id};"
        f" {email.utils.formatdate(request.received, localtime=True)}"
    )
    msg["From"] = froms[0]
    msg["To"] = ", ".join(recipients_text)
    # Subject is added below, as bytes made here: the email package would decode encoded
    # words found in payload text, and one that decodes to CR LF would start a new field.
    msg["Date"] = email.utils.formatdate(request.received, localtime=True)
    msg["Message-ID"] = f"<{request.id}.webhook@{domain}>"
    if _NOT_7BIT_TEXT.search(text):
        # RFC 2045 2.7: 7bit text has no NUL and no CR or LF alone; the email package would
        # still pick 7bit for ASCII text, so the encoding is chosen here.
        msg.set_content(text, charset="utf-8", cte="quoted-printable")
    else:
        msg.set_content(text, charset="utf-8")
    for filename, ctype, data in payload.files:
        maintype, _, subtype = ctype.partition("/")
        if maintype in ("multipart", "message"):
            # Sent as base64 bytes, which RFC 2045 6.4 forbids for these types.
            maintype, subtype = "application", "octet-stream"
        filename = _safe_filename(filename)
        # Bytes are sent base64-encoded whatever their type: uploaded text stays byte for byte.
        msg.add_attachment(
            data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=filename,
        )
    try:
        raw = msg.as_bytes()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"http_to_mail cannot build the mail: {exc}") from exc
    sender_option = options.get("sender")
    sender = (
        str(sender_option).strip()
        if sender_option is not None
        else email.utils.parseaddr(froms[0])[1]
    )
    recipients = [addr for _, addr in email.utils.getaddresses(recipients_text)]
    message = MailMessage.from_bytes(
        raw,
        sender=sender,
        recipients=recipients,
        id=request.id,
        listener=request.listener,
        client=request.client,
        received=request.received,
    )
    fields = list(message.headers.fields)
    after_to = next((i + 1 for i, (k, _) in enumerate(fields) if k.lower() == "to"), len(fields))
    fields.insert(after_to, ("Subject", subject_field(subject)))
    return message.replace_headers(Headers(tuple(fields)))
