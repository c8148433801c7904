"""The protocol-neutral messages that listeners produce and destinations consume.

Values are immutable: a transform returns a new message instead of changing one.
Mail and news articles keep their header fields as the raw bytes that arrived,
so a message passes through the gateway unchanged unless a transform edits it.
Line endings inside the gateway are LF; protocol codecs convert at the wire.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar, Self


class Kind(str):
    """What a message is (``mail``, ``article``, ``dns``, ``http``, or one a protocol brings).

    Routes and destinations are checked against it before anything starts.
    Kinds are plain names, so a protocol package can add one without an edit
    here; ``KindSpec`` says how a kind is stored in the spool.
    """

    __slots__ = ()

    MAIL: ClassVar[Kind]
    ARTICLE: ClassVar[Kind]
    DNS: ClassVar[Kind]
    HTTP: ClassVar[Kind]
    FILE: ClassVar[Kind]

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Kind({str.__str__(self)!r})"


Kind.MAIL = Kind("mail")
Kind.ARTICLE = Kind("article")
Kind.DNS = Kind("dns")
Kind.HTTP = Kind("http")
Kind.FILE = Kind("file")


_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
# The random part of an id only has to make it unique, not unguessable: a generator
# seeded once from the system's randomness costs no system call per id.
_id_random = random.Random(secrets.randbits(128))
_ID_PAIRS = [a + b for a in _ID_ALPHABET for b in _ID_ALPHABET]


def new_message_id(now: float | None = None) -> str:
    """A unique id that sorts by arrival time, like a mail queue id."""
    stamp = int((time.time() if now is None else now) * 1_000_000)
    pairs = []
    while stamp:
        stamp, rest = divmod(stamp, len(_ID_PAIRS))
        pairs.append(_ID_PAIRS[rest])  # two digits at a time
    # The leading pair may start with a zero digit, which the id does not have.
    return "".join(reversed(pairs)).lstrip("0") + f"{_id_random.getrandbits(32):08X}"


_FIELD_NAME = re.compile(rb"^[!-9;-~]+$")


@dataclass(frozen=True)
class Headers:
    """An ordered list of header fields, each kept as its raw bytes.

    ``fields`` holds (name, value) pairs where value is everything after the
    colon, folding included, without the final line ending.  Serialising gives
    back the bytes that were parsed.
    """

    fields: tuple[tuple[str, bytes], ...] = ()

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    @cached_property
    def _names(self) -> frozenset[str]:
        """The lower-case names present: a name not among them needs no walk over the fields."""
        return frozenset(key.lower() for key, _ in self.fields)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, unfolded, decoded as UTF-8 (bad bytes replaced)."""
        wanted = name.lower()
        if wanted not in self._names:
            return []
        return [_unfold(value) for key, value in self.fields if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        if wanted not in self._names:
            return None
        for key, value in self.fields:
            if key.lower() == wanted:
                return _unfold(value)
        return None

    def remove(self, name: str) -> Headers:
        wanted = name.lower()
        names = self._names
        if wanted not in names:
            return self
        fields = tuple((k, v) for k, v in self.fields if k.lower() != wanted)
        return _with_names(fields, names - {wanted})

    def add(self, name: str, value: str | bytes, *, first: bool = False) -> Headers:
        new = (name, _field_value(value))
        fields = (new, *self.fields) if first else (*self.fields, new)
        return _with_names(fields, self._names | {name.lower()})

    def set(self, name: str, value: str | bytes) -> Headers:
        """Replace the first field called ``name`` in place (others removed), or append it."""
        wanted = name.lower()
        out: list[tuple[str, bytes]] = []
        done = False
        for key, raw in self.fields:
            if key.lower() == wanted:
                if not done:
                    out.append((name, _field_value(value)))
                    done = True
                continue
            out.append((key, raw))
        if not done:
            out.append((name, _field_value(value)))
        return _with_names(tuple(out), self._names | {wanted})

    def rename(self, old: str, new: str) -> Headers:
        wanted = old.lower()
        names = self._names
        if wanted not in names:
            return self
        fields = tuple((new if k.lower() == wanted else k, v) for k, v in self.fields)
        return _with_names(fields, (names - {wanted}) | {new.lower()})

    def to_bytes(self) -> bytes:
        return self._bytes

    @cached_property
    def _bytes(self) -> bytes:
        # Made once: the spool, the size and the destinations all ask for it.
        return b"".join(name.encode("ascii") + b":" + value + b"\n" for name, value in self.fields)


def _with_names(fields: tuple[tuple[str, bytes], ...], names: frozenset[str]) -> Headers:
    """Headers whose lower-case names are already known (see Headers._names)."""
    headers = Headers(fields)
    headers.__dict__["_names"] = names
    return headers


def _field_value(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if b"\n" in raw.replace(b"\n ", b"").replace(b"\n\t", b""):
        raise ValueError("a header value may only contain line breaks followed by white space")
    return b" " + raw.lstrip(b" ") if raw else b""


def _unfold(value: bytes) -> str:
    return value.replace(b"\r", b"").replace(b"\n", b"").strip().decode("utf-8", "replace")


def parse_rfc5322(data: bytes) -> tuple[Headers, bytes]:
    """Split an RFC 5322 message (LF line endings) into header fields and body.

    A line that is neither a header field nor a continuation ends the header,
    as in Postfix: it and everything after it become the body.
    """
    fields: list[tuple[str, bytes]] = []
    pos = 0
    length = len(data)
    while pos < length:
        end = data.find(b"\n", pos)
        line_end = length if end < 0 else end
        line = data[pos:line_end]
        if line in (b"", b"\r"):
            return Headers(tuple(fields)), data[line_end + 1 :] if end >= 0 else b""
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            colon = line.find(b":")
            name_bytes = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if colon <= 0 or not _FIELD_NAME.match(name_bytes):
                return Headers(tuple(fields)), data[pos:]
            fields.append((name_bytes.decode("ascii"), line[colon + 1 :].rstrip(b"\r")))
        if end < 0:
            break
        pos = end + 1
    return Headers(tuple(fields)), b""


@dataclass(frozen=True, kw_only=True)
class Message:
    """What every message has: an id and where it came from."""

    kind: ClassVar[Kind]
    id: str = field(default_factory=new_message_id)
    listener: str = ""
    client: str = ""
    user: str = ""  # the name the client logged in with (SMTP AUTH, AUTHINFO); "" if none
    received: float = field(default_factory=time.time)

    def evolve(self, **changes: object) -> Self:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class _Rfc5322Message(Message):
    headers: Headers = Headers()
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """Header and body with LF line endings, as stored and as written to a Maildir."""
        return self.headers.to_bytes() + b"\n" + self.body

    def replace_body(self, body: bytes) -> Self:
        return replace(self, body=body)

    def replace_headers(self, headers: Headers) -> Self:
        return replace(self, headers=headers)

    @property
    def message_id(self) -> str | None:
        return self.headers.get("Message-ID")

    @property
    def size(self) -> int:
        return len(self.headers.to_bytes()) + 1 + len(self.body)


@dataclass(frozen=True, kw_only=True)
class MailMessage(_Rfc5322Message):
    """An Internet mail message with its SMTP envelope."""

    kind: ClassVar[Kind] = Kind.MAIL
    sender: str = ""
    recipients: tuple[str, ...] = ()

    @classmethod
    def from_bytes(
        cls, data: bytes, *, sender: str, recipients: Sequence[str], **meta: Any
    ) -> Self:
        headers, body = parse_rfc5322(data)
        return cls(headers=headers, body=body, sender=sender, recipients=tuple(recipients), **meta)

    def with_recipients(self, recipients: Iterable[str]) -> Self:
        return replace(self, recipients=tuple(recipients))


@dataclass(frozen=True, kw_only=True)
class Article(_Rfc5322Message):
    """A netnews article (RFC 5536)."""

    kind: ClassVar[Kind] = Kind.ARTICLE

    @classmethod
    def from_bytes(cls, data: bytes, **meta: Any) -> Self:
        headers, body = parse_rfc5322(data)
        return cls(headers=headers, body=body, **meta)

    @property
    def newsgroups(self) -> tuple[str, ...]:
        value = self.headers.get("Newsgroups") or ""
        return tuple(g.strip() for g in value.split(",") if g.strip())


@dataclass(frozen=True, kw_only=True)
class DnsQuery(Message):
    """A DNS message in wire format; parsed only where a route needs more than the question."""

    kind: ClassVar[Kind] = Kind.DNS
    wire: bytes = b""
    qname: str = ""
    qtype: int = 0
    qclass: int = 1


@dataclass(frozen=True, kw_only=True)
class HttpRequest(Message):
    """An HTTP request: method, target, header fields and body."""

    kind: ClassVar[Kind] = Kind.HTTP
    method: str = "GET"
    target: str = "/"
    host: str = ""
    http_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, kw_only=True)
class FileMessage(Message):
    """A file asked for or sent by name (TFTP, FTP): the name as the client gave it.

    A read request carries no content: ``path`` is "" and ``size`` what the
    client announced (TFTP's ``tsize``), None when it said nothing.  An upload's
    content is a file on disk, never in memory: ``path`` is where it is (in the
    spool's incoming folder while it arrives, in its files folder once stored)
    and ``size`` its length.
    """

    kind: ClassVar[Kind] = Kind.FILE
    name: str = ""
    size: int | None = None
    path: str = ""
    # The content goes at the end of the file of that name (FTP APPE), not in its place.
    append: bool = False


# --- kinds and how the spool stores them ---------------------------------------------------

_COMMON = ("id", "listener", "client", "user", "received")


@dataclass(frozen=True)
class KindSpec:
    """A message kind: its class, and how a stored copy is written and read back.

    ``encode`` gives the kind's own metadata (beyond id, listener, client and
    received) and the message bytes; ``decode`` makes the message again from
    them.  A kind without them (DNS queries, HTTP requests) is never stored:
    its routes answer at once or convert it first.
    """

    kind: Kind
    message: type[Message]
    encode: Callable[[Any], tuple[dict[str, Any], bytes]] | None = None
    decode: Callable[[Mapping[str, Any], bytes, dict[str, Any]], Message] | None = None

    @property
    def stored(self) -> bool:
        return self.encode is not None and self.decode is not None


KINDS: dict[str, KindSpec] = {}


def register_kind(spec: KindSpec) -> None:
    """Make a kind known (the protocol registry does this for the kinds protocols bring)."""
    known = KINDS.get(spec.kind)
    if known is not None and known != spec:
        raise ValueError(
            f"message kind '{spec.kind}' is defined twice: by {known.message.__module__}"
            f" and by {spec.message.__module__}"
        )
    KINDS[spec.kind] = spec


def addressed_to(message: Message | None) -> tuple[str, ...]:
    """Where a message is going, for log lines: a mail's recipients, an article's
    newsgroups; nothing for the other kinds."""
    if isinstance(message, MailMessage):
        return message.recipients
    if isinstance(message, Article):
        return message.newsgroups
    return ()


class NotStored(Exception):
    """A message of a kind the spool does not store, or a stored one it cannot read."""


def encode_message(message: Message) -> bytes:
    """A stored message: one JSON line of metadata, then the message bytes."""
    spec = KINDS.get(message.kind)
    if spec is None or spec.encode is None:
        raise NotStored(f"{message.kind} messages are not stored in the spool")
    extra, body = spec.encode(message)
    meta: dict[str, Any] = {
        "kind": str(message.kind),
        "id": message.id,
        "listener": message.listener,
        "client": message.client,
        **({"user": message.user} if message.user else {}),
        "received": message.received,
        **extra,
    }
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + body


def decode_message(data: bytes) -> Message:
    line, _, body = data.partition(b"\n")
    meta = json.loads(line)
    spec = KINDS.get(meta.get("kind", ""))
    if spec is None or spec.decode is None:
        raise NotStored(f"cannot read a stored {meta.get('kind')} message")
    return spec.decode(meta, body, {k: meta[k] for k in _COMMON if k in meta})


def _encode_mail(message: MailMessage) -> tuple[dict[str, Any], bytes]:
    return {"sender": message.sender, "recipients": list(message.recipients)}, message.to_bytes()


def _decode_mail(meta: Mapping[str, Any], body: bytes, common: dict[str, Any]) -> Message:
    return MailMessage.from_bytes(
        body, sender=meta["sender"], recipients=meta["recipients"], **common
    )


def _encode_article(message: Article) -> tuple[dict[str, Any], bytes]:
    return {}, message.to_bytes()


def _decode_article(meta: Mapping[str, Any], body: bytes, common: dict[str, Any]) -> Message:
    return Article.from_bytes(body, **common)


def _encode_file(message: FileMessage) -> tuple[dict[str, Any], bytes]:
    # The content stays in its own file: the spool moves it into its files folder.
    meta: dict[str, Any] = {"name": message.name, "size": message.size}
    if message.append:
        meta["append"] = True
    return meta, b""


def _decode_file(meta: Mapping[str, Any], body: bytes, common: dict[str, Any]) -> Message:
    return FileMessage(
        name=meta["name"], size=meta["size"], append=bool(meta.get("append")), **common
    )


register_kind(KindSpec(Kind.MAIL, MailMessage, _encode_mail, _decode_mail))
register_kind(KindSpec(Kind.ARTICLE, Article, _encode_article, _decode_article))
register_kind(KindSpec(Kind.DNS, DnsQuery))
register_kind(KindSpec(Kind.HTTP, HttpRequest))
register_kind(KindSpec(Kind.FILE, FileMessage, _encode_file, _decode_file))


def local_hostname() -> str:
    """The name used in Received and HELO when the configuration names none."""
    import socket

    name = socket.getfqdn()
    return name if "." in name else f"{os.uname().nodename}.localdomain"
