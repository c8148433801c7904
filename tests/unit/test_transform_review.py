"""Defects found reviewing mail_to_news, news_to_mail, http_to_mail and the webhook destination.

Each test names the rule it checks; each failed before its fix.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
from typing import Any

import pytest

from gateway.message import Article, HttpRequest, MailMessage
from gateway.plugins import Reject
from gateway.protocols.http.webhook import (
    encode_document,
    message_document,
    outcome_for_status,
    parse_retry_after,
)
from gateway.transforms.http_mail import http_to_mail
from gateway.transforms.mail_to_news import (
    MAX_MESSAGE_ID,
    gateway_name,
    is_valid_message_id,
    mail_to_news,
)
from gateway.transforms.news_to_mail import news_to_mail

GW = "gw.example.test"


def mail(extra: bytes, *, body: bytes = b"body\n") -> MailMessage:
    head = b"From: Alice <alice@mail.test>\nSubject: hello\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"
    return MailMessage.from_bytes(
        head + extra + b"\n" + body,
        sender="alice@mail.test",
        recipients=("dev@lists.test",),
        listener="in",
        client="127.0.0.1",
    )


def gate(msg: MailMessage, **options: Any) -> Article:
    result = mail_to_news(msg, {"newsgroups": "test.gateway", "gateway": GW, **options})
    assert isinstance(result, Article)
    return result


def raw_fields(headers: Any, name: str) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name.lower()]


# --- mail_to_news: Message-ID (RFC 5536 3.1.3) ----------------------------------------------


def test_a_folded_message_id_goes_out_unfolded_and_is_kept() -> None:
    # RFC 5536 3.1.3: the Message-ID field is the msg-id-core with optional WSP, no folding;
    # RFC 5322 allowed the fold in the mail, the article must not carry it.
    art = gate(mail(b"Message-ID:\n <abc.1@mail.test>\n"))
    assert raw_fields(art.headers, "Message-ID") == [b" <abc.1@mail.test>"]
    assert art.headers.get("X-Original-Message-ID") is None


@pytest.mark.parametrize(
    "field",
    [
        b"Message-ID: <abc.2@mail.test> (added by an MUA)\n",
        b"Message-ID: (comment) <abc.2@mail.test>\n",
        b"Message-ID: <abc.2@mail.test>\t\n",
    ],
)
def test_the_msg_id_core_of_a_mail_message_id_with_comments_is_reused(field: bytes) -> None:
    # Mail's msg-id is [CFWS] msg-id-core [CFWS]; netnews takes only the core (RFC 5536 3.1.3).
    # Reusing the core keeps the same mail gated twice (or by two gateways) one article.
    art = gate(mail(field))
    assert raw_fields(art.headers, "Message-ID") == [b" <abc.2@mail.test>"]


def test_a_derived_message_id_never_exceeds_250_octets() -> None:
    # RFC 5536 3.1.3: msg-id-core at most 250 octets; a long gateway name must not break it.
    long_name = ".".join(["a" * 60] * 4)  # a 243-character host name, valid as such
    art = gate(mail(b""), gateway=long_name)
    msgid = art.message_id
    assert msgid is not None
    assert len(msgid.encode()) <= MAX_MESSAGE_ID
    assert is_valid_message_id(msgid)
    assert gate(mail(b""), gateway=long_name).message_id == msgid  # still deterministic


def test_a_gateway_name_longer_than_a_host_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="gateway"):
        gateway_name({"gateway": "a" * 300})


# --- news_to_mail: List-Id (RFC 2919) and List-Post (RFC 2369) -------------------------------


def article() -> Article:
    return Article.from_bytes(
        b"Path: news.test!not-for-mail\n"
        b"From: Bob <bob@news.test>\n"
        b"Newsgroups: test.gateway\n"
        b"Subject: hi\n"
        b"Message-ID: <n.1@news.test>\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        b"\nbody\n",
        listener="news-in",
        client="127.0.0.1",
    )


def to_mail(**options: Any) -> MailMessage:
    result = news_to_mail(article(), {"to": "list@lists.test", "gateway": GW, **options})
    assert isinstance(result, MailMessage)
    return result


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("test-gateway.lists.example.test", b" <test-gateway.lists.example.test>"),
        ("<test-gateway.lists.example.test>", b" <test-gateway.lists.example.test>"),
        ("Gateway list <gw.lists.example.test>", b" Gateway list <gw.lists.example.test>"),
    ],
)
def test_valid_list_ids(given: str, expected: bytes) -> None:
    assert raw_fields(to_mail(list_id=given).headers, "List-Id") == [expected]


@pytest.mark.parametrize(
    "bad", ["test gateway list", "nodot", "<a b.example.test>", "x <bad@list.example.test>"]
)
def test_an_invalid_list_id_is_refused_with_the_rule(bad: str) -> None:
    # RFC 2919: list-id = list-label "." list-id-namespace, dot-atom text in angle brackets.
    with pytest.raises(Reject, match="RFC 2919"):
        to_mail(list_id=bad)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("list@lists.test", b" <mailto:list@lists.test>"),
        ("mailto:list@lists.test", b" <mailto:list@lists.test>"),
        ("<mailto:list@lists.test>", b" <mailto:list@lists.test>"),
        (
            "list@lists.test, https://lists.test/post",
            b" <mailto:list@lists.test>, <https://lists.test/post>",
        ),
        (
            ["list@lists.test", "<https://lists.test/post>"],
            b" <mailto:list@lists.test>, <https://lists.test/post>",
        ),
        ("NO", b" NO"),
    ],
)
def test_list_post_is_a_list_of_bracketed_urls(given: Any, expected: bytes) -> None:
    # RFC 2369: each URL in angle brackets, several separated by commas; NO for no posting.
    assert raw_fields(to_mail(list_post=given).headers, "List-Post") == [expected]


@pytest.mark.parametrize("bad", ["a list@lists.test", "<mailto:a b@lists.test>"])
def test_an_unusable_list_post_is_refused(bad: str) -> None:
    with pytest.raises(Reject, match="RFC 2369"):
        to_mail(list_post=bad)


# --- http_to_mail: header injection and MIME correctness --------------------------------------

OPTIONS: dict[str, Any] = {
    "from": "Hook bot <bot@gw.test>",
    "to": ["ops@example.test"],
    "message_id_domain": "gw.test",
}


def hook(body: bytes, content_type: str = "application/json") -> HttpRequest:
    return HttpRequest(
        method="POST",
        target="/hooks/x",
        host="gw.test",
        http_headers=(("Host", "gw.test"), ("Content-Type", content_type)),
        body=body,
        client="127.0.0.9",
        listener="web-in",
        received=1_700_000_000.0,
    )


def parsed(msg: MailMessage) -> email.message.EmailMessage:
    result = email.message_from_bytes(msg.to_bytes(), policy=email.policy.default)
    assert isinstance(result, email.message.EmailMessage)
    return result


INJECTIONS = [
    "=?utf-8?q?a=0D=0ABcc:_evil@x.test?=",
    "=?utf-8?b?YQ0KQmNjOiBldmlsQHgudGVzdA==?=",
    "=?us-ascii?q?a=0ABcc:_evil@x.test?=",
    "a\r\nBcc: evil@x.test",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_payload_text_cannot_add_header_fields_through_the_subject(text: str) -> None:
    # RFC 5322 2.2: a field ends at CRLF. An encoded word decoding to CR/LF (RFC 2047 text
    # from the payload) must stay text in the Subject, never become a new field.
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "subject": "x {t}"})
    assert msg.headers.get("Bcc") is None
    assert b"\nBcc:" not in msg.to_bytes().split(b"\n\n", 1)[0]
    subject = parsed(msg)["Subject"]
    assert "\r" not in subject and "\n" not in subject
    assert subject == "x " + " ".join(text.split())  # the text is kept, as text


def test_literal_encoded_word_text_in_a_subject_reads_back_literally() -> None:
    text = "=?utf-8?q?hello?= world"
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "subject": "{t}"})
    assert parsed(msg)["Subject"] == text


@pytest.mark.parametrize("text", ["a\x00b", "bell\x07", "esc\x1b[31m", "del\x7f", "c1\x85x\x9b"])
def test_control_characters_never_reach_a_header(text: str) -> None:
    # RFC 5322 3.2.5/2.2: header text is VCHAR and WSP; NUL and other controls are not allowed.
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "subject": "s {t}"})
    head = msg.to_bytes().split(b"\n\n", 1)[0]
    assert not any((b < 32 and b not in (9, 10)) or b == 127 for b in head)
    subject = parsed(msg)["Subject"]
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in subject)


def test_a_non_ascii_subject_is_rfc2047_encoded_and_reads_back() -> None:
    text = "Grüße aus Köln " + "ü" * 80
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "subject": "{t}"})
    head = msg.to_bytes().split(b"\n\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 78 for line in head.split(b"\n"))
    assert parsed(msg)["Subject"] == text


def test_a_long_subject_is_folded_under_998_octets() -> None:
    text = "x" * 2000
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "subject": "{t}"})
    head = msg.to_bytes().split(b"\n\n", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\n"))
    assert parsed(msg)["Subject"] == text


def multipart(disposition: str, ctype: str = "text/plain") -> HttpRequest:
    body = (
        b"--XX\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        b"Content-Type: " + ctype.encode() + b"\r\n\r\nhello\r\n--XX--\r\n"
    )
    return hook(body, "multipart/form-data; boundary=XX")


def test_an_upload_file_name_with_line_breaks_is_made_safe() -> None:
    # RFC 2231 lets a file name carry %0D%0A; it must not break the mail or the request.
    req = multipart("form-data; name=\"f\"; filename*=utf-8''a%0D%0ABcc%3A%20e%40v.test")
    msg = http_to_mail(req, OPTIONS)
    assert msg.headers.get("Bcc") is None
    parts = [p for p in parsed(msg).iter_attachments()]
    assert len(parts) == 1
    name = parts[0].get_filename()
    assert name is not None and "\n" not in name and "\r" not in name
    assert parts[0].get_content() in (b"hello", "hello")


@pytest.mark.parametrize("ctype", ["multipart/mixed", "message/rfc822", "multipart/alternative"])
def test_an_upload_declared_multipart_or_message_is_sent_as_octets(ctype: str) -> None:
    # RFC 2045 6.4: a multipart or message entity may only be 7bit, 8bit or binary; the
    # upload is base64-encoded bytes, so it cannot keep such a type.
    msg = http_to_mail(multipart('form-data; name="f"; filename="a.bin"', ctype), OPTIONS)
    parts = [p for p in parsed(msg).iter_attachments()]
    assert len(parts) == 1
    assert parts[0].get_content_type() == "application/octet-stream"
    assert parts[0].get_payload(decode=True) == b"hello"
    assert not parsed(msg).defects and not parts[0].defects


# --- webhook: Retry-After edge cases (RFC 9110 10.2.3) ----------------------------------------


@pytest.mark.parametrize("digits", [400, 5000])
def test_a_huge_retry_after_does_not_raise(digits: int) -> None:
    # delay-seconds = 1*DIGIT: any number of digits is syntactically valid.
    wait = parse_retry_after("9" * digits, 1.7e9)
    assert wait is not None and wait >= 86400


def test_a_success_with_a_huge_retry_after_is_still_delivered() -> None:
    retry = parse_retry_after("9" * 5000, 1.7e9)
    outcome = outcome_for_status("http://h.test/x", 200, "OK", b"", retry)
    assert outcome.status.name == "DELIVERED"


@pytest.mark.parametrize("text", ["a\x00b", "esc\x1b[0m", "bare\rcr", "del\x7f"])
def test_control_characters_in_the_text_are_quoted_printable_not_7bit(text: str) -> None:
    # RFC 2045 2.7: 7bit data has no NUL, and CR and LF only together as a line break.
    msg = http_to_mail(hook(json.dumps({"t": text}).encode()), {**OPTIONS, "body": "{t}"})
    head, _, body = msg.to_bytes().partition(b"\n\n")
    assert b"Content-Transfer-Encoding: quoted-printable" in head
    assert not any((b < 32 and b not in (9, 10)) or b == 127 for b in body)
    part = parsed(msg).get_body(("plain",))
    assert part is not None
    assert part.get_content().rstrip("\n") == text.replace("\r", "\n") or text in part.get_content()


# --- mail_to_news: mandatory fields (RFC 5536 3.1: Date, From, Message-ID, Newsgroups, Path,
# Subject); a gateway's article has to be a legal article -------------------------------------


def bare_mail(head: bytes, *, sender: str = "alice@mail.test") -> MailMessage:
    return MailMessage.from_bytes(
        head + b"\nbody\n",
        sender=sender,
        recipients=("dev@lists.test",),
        listener="in",
        client="127.0.0.1",
        received=1_764_064_800.0,  # 2025-11-25 10:00:00 UTC
    )


def test_a_mail_without_date_gets_the_time_it_was_received() -> None:
    msg = bare_mail(b"From: a@mail.test\nSubject: s\nMessage-ID: <d.1@mail.test>\n")
    art = gate(msg)
    assert art.headers.get("Date") == "Tue, 25 Nov 2025 10:00:00 +0000"
    assert gate(msg).to_bytes() == art.to_bytes()  # a retry makes the same article


def test_a_mail_without_subject_gets_one() -> None:
    art = gate(bare_mail(b"From: a@mail.test\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"))
    assert art.headers.get("Subject") == "(no subject)"


def test_a_mail_without_from_takes_the_envelope_sender() -> None:
    art = gate(bare_mail(b"Subject: s\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"))
    assert art.headers.get("From") == "alice@mail.test"


def test_a_mail_without_any_originator_is_refused_saying_why() -> None:
    with pytest.raises(Reject, match="From"):
        gate(bare_mail(b"Subject: s\n", sender=""))


# --- webhook: the JSON of a mail with broken fields is best effort, never a lost mail ---------


@pytest.mark.parametrize(
    "date",
    [
        "Tue, 25 Nov 2025 10:00:00 +99999999999999999999",
        "25 Nov 99999999999999999999 10:00:00 +0000",
        "Tue, 25 Nov 2025 99:99:99 +0000",
    ],
)
def test_an_unreadable_date_gives_null_date_iso_not_a_dead_letter(date: str) -> None:
    msg = MailMessage.from_bytes(
        b"Date: " + date.encode() + b"\nFrom: a@b.test\n\ntext\n",
        sender="a@b.test",
        recipients=("c@d.test",),
    )
    doc = message_document(msg, attachment_limit=100)
    assert doc["date"] == date and doc["date_iso"] is None
    assert doc["text"] == "text\n"
    assert json.loads(encode_document(doc))["id"] == msg.id


# --- mail_to_news: References (RFC 5537 3.4.4: the first and the last three ids stay) --------


def long_id(n: int) -> str:
    # 250 octets, the longest msg-id-core RFC 5536 3.1.3 allows.
    left = f"{n}." + "x" * (250 - len(f"{n}.") - len("@mail.test") - 2)
    return f"<{left}@mail.test>"


def test_references_keep_the_first_and_last_three_even_when_they_need_two_lines() -> None:
    ids = [long_id(n) for n in range(6)]
    assert all(len(i) == 250 for i in ids)
    art = gate(
        mail(b"Message-ID: <r.1@mail.test>\nReferences: " + "\n ".join(ids).encode() + b"\n")
    )
    raw = raw_fields(art.headers, "References")
    assert len(raw) == 1
    assert art.headers.get_all("References")[0].split() == [ids[0], *ids[-3:]]
    lines = (b"References:" + raw[0]).split(b"\n")
    assert all(len(line) <= 998 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])


@pytest.mark.parametrize("option", ["to", "from"])
def test_non_ascii_display_names_from_route_options_are_rfc2047_encoded(option: str) -> None:
    # RFC 2047 5(3): a display name (phrase) outside ASCII is written as encoded words; raw
    # UTF-8 in a header needs SMTPUTF8 (RFC 6532), which the next hop may not offer.
    out = to_mail(**{option: "Jörg Müller <jm@lists.test>, plain@lists.test"})
    head = out.to_bytes().split(b"\n\n", 1)[0]
    name = option.capitalize()
    value = raw_fields(out.headers, name)[0]
    assert value.isascii(), head
    parsed_mail = email.message_from_bytes(out.to_bytes(), policy=email.policy.default)
    addresses = parsed_mail[name].addresses
    assert [(a.display_name, a.addr_spec) for a in addresses] == [
        ("Jörg Müller", "jm@lists.test"),
        ("", "plain@lists.test"),
    ]
