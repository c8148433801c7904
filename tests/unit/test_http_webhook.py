"""Web hooks both ways, in memory: http_to_mail (templates, MIME, signatures, bad input) and the
webhook destination (the JSON, the signature, Retry-After, outcomes from fake responses) and the
delivery workers honouring Retry-After."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import email.utils
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers

from gateway.config import ConfigError, Duration, parse
from gateway.destination import build_destination
from gateway.message import Article, HttpRequest, MailMessage
from gateway.plugins import Reject, load_transforms
from gateway.ports import Outcome, Reason, Status
from gateway.protocols.http.config import WebhookDestinationConfig
from gateway.protocols.http.webhook import (
    WebhookDestination,
    encode_document,
    message_document,
    outcome_for_status,
    parse_retry_after,
)
from gateway.routing import check_routes
from gateway.signing import sign, signature_matches
from gateway.transforms.http_mail import http_to_mail, render
from tests.support.deferreds import run
from tests.support.delivery import START, FakeDestination, World

# --------------------------------------------------------------------------- helpers

OPTIONS: dict[str, Any] = {
    "from": "Hook bot <bot@gw.test>",
    "to": ["ops@example.test", "Ann Example <ann@example.test>"],
    "message_id_domain": "gw.test",
}


def request(
    body: bytes | str | Any = b"{}",
    *,
    content_type: str | None = "application/json",
    method: str = "POST",
    target: str = "/hooks/deploy?x=1",
    headers: tuple[tuple[str, str], ...] = (),
) -> HttpRequest:
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    fields = (("Content-Type", content_type),) if content_type is not None else ()
    return HttpRequest(
        method=method,
        target=target,
        host="gw.test",
        http_headers=(("Host", "gw.test"), *fields, *headers),
        body=data,
        client="127.0.0.9",
        listener="web-in",
        received=1_700_000_000.0,
    )


def mail(req: HttpRequest, **options: Any) -> MailMessage:
    return http_to_mail(req, {**OPTIONS, **options})


def parsed(message: MailMessage) -> email.message.EmailMessage:
    result = email.message_from_bytes(message.to_bytes(), policy=email.policy.default)
    assert isinstance(result, email.message.EmailMessage)
    return result


def text_of(message: MailMessage) -> str:
    body = parsed(message).get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


def rejected(req: HttpRequest, **options: Any) -> Reject:
    with pytest.raises(Reject) as info:
        mail(req, **options)
    return info.value


# --------------------------------------------------------------------------- http_to_mail: MIME


def test_json_becomes_a_mail_with_envelope_headers_and_pretty_json_body() -> None:
    payload = {"action": "deployed", "repository": {"name": "gateway"}, "ok": True}
    req = request(payload)
    out = mail(req)
    assert out.id == req.id and out.listener == "web-in" and out.client == "127.0.0.9"
    assert out.sender == "bot@gw.test"
    assert out.recipients == ("ops@example.test", "ann@example.test")
    msg = parsed(out)
    assert msg["From"] == "Hook bot <bot@gw.test>"
    assert msg["To"] == "ops@example.test, Ann Example <ann@example.test>"
    assert msg["Subject"] == "Web hook /hooks/deploy"
    assert msg["Message-ID"] == f"<{req.id}.webhook@gw.test>"
    date = email.utils.parsedate_to_datetime(msg["Date"])
    assert date.timestamp() == req.received
    assert "with HTTP id " + req.id in " ".join(msg["Received"].split())
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert text_of(out) == json.dumps(payload, indent=2) + "\n"


def test_non_ascii_subject_is_rfc2047_and_body_is_7bit_clean() -> None:
    payload = {"who": "Jürgen", "note": "café " + "x" * 200}
    out = mail(request(payload), subject="Grüße von {who}")
    raw = out.to_bytes()
    assert all(byte < 128 for byte in raw), "the mail must be 7-bit: RFC 2047 and a CTE"
    assert b"=?utf-8?" in raw.split(b"\n\n", 1)[0].lower()
    assert all(len(line) <= 78 for line in raw.split(b"\n")), "lines stay short"
    msg = parsed(out)
    assert msg["Subject"] == "Grüße von Jürgen"
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert json.loads(text_of(out)) == payload


def test_ascii_body_stays_7bit() -> None:
    out = mail(request({"a": "plain"}))
    assert parsed(out)["Content-Transfer-Encoding"] == "7bit"


def test_sender_option_sets_the_envelope_only() -> None:
    out = mail(request({}), sender="bounces@gw.test")
    assert out.sender == "bounces@gw.test"
    assert parsed(out)["From"] == "Hook bot <bot@gw.test>"


def test_one_to_address_as_text() -> None:
    out = mail(request({}), to="solo@example.test")
    assert out.recipients == ("solo@example.test",)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"from": None}, "'from'"),
        ({"to": []}, "'to'"),
        ({"to": "not an address"}, "is not a mail address"),
        ({"from": ["a@x.test", "b@x.test"]}, "one address"),
    ],
)
def test_option_mistakes_are_clear_errors_not_rejections(
    options: dict[str, Any], problem: str
) -> None:
    # A mistake in routes.yaml is the operator's, not the client's: a temporary failure.
    with pytest.raises(ValueError, match=problem):
        mail(request({}), **options)


# --------------------------------------------------------------------------- templates


def test_templates_take_nested_fields_list_items_and_request_fields() -> None:
    payload = {
        "repository": {"name": "gw", "owner": {"login": "ann"}},
        "commits": [{"id": "abc"}, {"id": "def"}],
        "count": 2,
        "draft": False,
        "gone": None,
        "labels": ["a", "b"],
        "sizes": {"x": 1},
    }
    out = mail(
        request(payload),
        subject="{repository.owner.login}/{ repository.name } {commits.-1.id} {@method} {@path}",
        body=(
            "first {commits.0.id}, {count} commits, draft={draft}, gone=[{gone}]\n"
            "labels {labels} sizes {sizes} from {@client} to {@host} id {@id} t {@target}\n"
            "braces {{literal}}\n"
        ),
    )
    assert parsed(out)["Subject"] == "ann/gw def POST /hooks/deploy"
    assert text_of(out) == (
        "first abc, 2 commits, draft=false, gone=[]\n"
        f'labels ["a", "b"] sizes {{"x": 1}} from 127.0.0.9 to gw.test id {out.id}'
        " t /hooks/deploy?x=1\n"
        "braces {literal}\n"
    )


def test_a_payload_field_cannot_inject_header_lines() -> None:
    out = mail(request({"t": "hi\r\nBcc: victim@x.test\n"}), subject="{t}")
    msg = parsed(out)
    assert msg["Subject"] == "hi Bcc: victim@x.test"
    assert msg["Bcc"] is None
    assert out.recipients == ("ops@example.test", "ann@example.test")


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{missing}", "has no field 'missing'"),
        ("{repository.nope}", "has no field 'nope' in 'repository'"),
        ("{list.5}", "has no list item '5' in 'list'"),
        ("{repository.name.deeper}", "has no field 'deeper' in 'repository.name'"),
    ],
)
def test_a_missing_field_is_a_400_naming_it(template: str, needle: str) -> None:
    reject = rejected(request({"repository": {"name": "gw"}, "list": [1]}), subject=template)
    assert reject.reason is Reason.BAD_MESSAGE
    assert needle in reject.detail
    assert "subject" in reject.detail


@pytest.mark.parametrize("template", ["a { b", "a } b", "{}", "x {@nope}"])
def test_template_syntax_mistakes_are_operator_errors(template: str) -> None:
    with pytest.raises(ValueError, match="option subject of http_to_mail"):
        mail(request({}), subject=template)


def test_render_has_no_attribute_or_code_access() -> None:
    seen: list[str] = []

    def lookup(path: str, what: str) -> str:
        seen.append(path)
        return "v"

    assert render("{__class__.__mro__} {a[0]} {x!r:>10}", lookup, "t") == "v v v"
    # The whole text between braces is a field path, handed to lookup: nothing is evaluated.
    assert seen == ["__class__.__mro__", "a[0]", "x!r:>10"]
    reject = rejected(request({"a": 1}), subject="{__class__}")
    assert reject.reason is Reason.BAD_MESSAGE


def test_body_field_takes_one_field_text_as_is_structure_as_json() -> None:
    payload = {"message": "Deployed.\nAll good.", "details": {"n": 1}}
    assert text_of(mail(request(payload), body_field="message")) == "Deployed.\nAll good.\n"
    assert json.loads(text_of(mail(request(payload), body_field="details"))) == {"n": 1}
    reject = rejected(request(payload), body_field="nothing")
    assert reject.reason is Reason.BAD_MESSAGE and "'nothing'" in reject.detail


# --------------------------------------------------------------------------- forms


def test_urlencoded_form_fields_in_templates_and_default_body() -> None:
    body = "name=J%C3%BCrgen&tag=a&tag=b&empty=&text=hello+world"
    out = mail(
        request(body, content_type="application/x-www-form-urlencoded"),
        subject="{name}: {text} [{tag.1}]",
    )
    assert parsed(out)["Subject"] == "Jürgen: hello world [b]"
    assert json.loads(text_of(out)) == {
        "name": "Jürgen",
        "tag": ["a", "b"],
        "empty": "",
        "text": "hello world",
    }


def test_urlencoded_form_that_is_not_utf8_is_a_400() -> None:
    reject = rejected(request("name=%FF%FE", content_type="application/x-www-form-urlencoded"))
    assert reject.reason is Reason.BAD_MESSAGE and "not UTF-8" in reject.detail
    reject = rejected(request(b"name=\xff", content_type="application/x-www-form-urlencoded"))
    assert reject.reason is Reason.BAD_MESSAGE and "percent-encoded" in reject.detail


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, ctype, data in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_form_fields_and_files_become_text_and_attachments() -> None:
    pdf = bytes(range(256)) * 4
    body = multipart(
        [
            ("title", None, None, "Überblick".encode()),
            ("report", "report.pdf", "application/pdf", pdf),
            ("notes", "notes.csv", "text/csv", b"a,b\r\n1,2\r\n"),
        ],
        "XyZ-boundary",
    )
    out = mail(
        request(body, content_type='multipart/form-data; boundary="XyZ-boundary"'),
        subject="{title} with {report}",
    )
    msg = parsed(out)
    assert msg["Subject"] == "Überblick with report.pdf"
    assert msg.get_content_type() == "multipart/mixed"
    assert json.loads(text_of(out)) == {
        "title": "Überblick",
        "report": "report.pdf",
        "notes": "notes.csv",
    }
    files = {
        a.get_filename(): (a.get_content_type(), a.get_content()) for a in msg.iter_attachments()
    }
    assert files["report.pdf"] == ("application/pdf", pdf)
    assert files["notes.csv"][0] == "text/csv"
    notes = files["notes.csv"][1]
    assert (notes.encode() if isinstance(notes, str) else notes).replace(b"\r\n", b"\n") in (
        b"a,b\n1,2\n",
    )


@pytest.mark.parametrize(
    ("body", "content_type", "needle"),
    [
        (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b--\r\n",
         "multipart/form-data", "no boundary"),
        (b"just text, no parts", "multipart/form-data; boundary=b", "no part"),
        (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n",
         "multipart/form-data; boundary=b", "closing boundary"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\n1\r\n--b--\r\n",
         "multipart/form-data; boundary=b", "part 1"),
    ],
)  # fmt: skip
def test_broken_multipart_is_a_400(body: bytes, content_type: str, needle: str) -> None:
    reject = rejected(request(body, content_type=content_type))
    assert reject.reason is Reason.BAD_MESSAGE
    assert needle in reject.detail


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml", "image/png", ""])
def test_wrong_content_type_is_a_415(content_type: str | None) -> None:
    reject = rejected(request({"a": 1}, content_type=content_type))
    assert reject.reason is Reason.UNSUPPORTED_FORMAT
    assert "application/json" in reject.detail


def test_json_content_types_with_suffix_and_charset() -> None:
    assert mail(request({"a": 1}, content_type="application/vnd.github+json"))
    assert mail(request({"a": 1}, content_type="Application/JSON; charset=UTF-8"))
    reject = rejected(request({"a": 1}, content_type="application/json; charset=latin-1"))
    assert reject.reason is Reason.UNSUPPORTED_FORMAT and "UTF-8" in reject.detail


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"a": 1,}', "line 1 column 9"),
        (b'{"a":\n  [1, 2', "line 2"),
        (b"", "empty"),
        (b"  \n", "empty"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b'{"a": "\xff"}', "byte 0xff at offset 7"),
    ],
)
def test_unparseable_json_is_a_400_saying_what_and_where(body: bytes, needle: str) -> None:
    reject = rejected(request(body))
    assert reject.reason is Reason.BAD_MESSAGE
    assert needle in reject.detail


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    reject = rejected(request(b"[" * 100_000 + b"]" * 100_000))
    assert reject.reason is Reason.BAD_MESSAGE


def test_only_post_is_taken() -> None:
    reject = rejected(request({}, method="GET"))
    assert reject.reason is Reason.UNSUPPORTED_METHOD and "POST" in reject.detail


# --------------------------------------------------------------------------- signatures


def test_github_signature_example() -> None:
    # The example in GitHub's documentation of X-Hub-Signature-256.
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign("It's a Secret to Everybody", b"Hello, World!") == expected
    assert signature_matches("It's a Secret to Everybody", b"Hello, World!", expected)
    assert signature_matches("It's a Secret to Everybody", b"Hello, World!", expected.upper())
    assert not signature_matches("It's a Secret to Everybody", b"Hello, World?", expected)
    assert not signature_matches("another secret", b"Hello, World!", expected)
    assert not signature_matches("It's a Secret to Everybody", b"Hello, World!", expected[7:])
    assert not signature_matches("It's a Secret to Everybody", b"Hello, World!", None)
    assert not signature_matches("It's a Secret to Everybody", b"Hello, World!", "sha256=é")


def signed(body: bytes, secret: str = "s3cret", header: str = "X-Hub-Signature-256") -> HttpRequest:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return request(body, headers=((header, f"sha256={mac}"),))


def test_a_valid_signature_is_accepted() -> None:
    body = json.dumps({"a": 1}).encode()
    assert mail(signed(body), secret="s3cret").recipients
    # Header names are case-insensitive; the header can be another one.
    req = signed(body, header="x-signature")
    assert mail(req, secret="s3cret", signature_header="X-Signature").recipients


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (request({"a": 1}), "has no X-Hub-Signature-256 header"),
        (signed(b'{"a": 1}', secret="wrong"), "does not match"),
        (signed(b'{"a": 2}', header="X-Other"), "has no X-Hub-Signature-256"),
        # A bad signature is refused before the body is looked at.
        (signed(b"not json", secret="wrong"), "does not match"),
        (request(b"{}", headers=(("X-Hub-Signature-256", "sha1=abc"),)), "does not match"),
    ],
)
def test_a_missing_or_wrong_signature_is_a_401(req: HttpRequest, needle: str) -> None:
    reject = rejected(req, secret="s3cret")
    assert reject.reason is Reason.UNAUTHENTICATED
    assert needle in reject.detail


def test_a_body_changed_after_signing_is_refused() -> None:
    good = signed(b'{"amount": 1}')
    tampered = good.evolve(body=b'{"amount": 9}')
    assert rejected(tampered, secret="s3cret").reason is Reason.UNAUTHENTICATED


# --------------------------------------------------------------------------- routes


def test_check_accepts_http_to_mail_into_a_webhook_free_mail_route() -> None:
    config = parse(
        """
version: 1
listeners:
  in: {protocol: smtp, listen: "tcp:2525"}
destinations:
  hook:
    protocol: webhook
    url: http://127.0.0.1:9/hook
    secret: abc
    timeout: 3s
    attachment_limit: 10KiB
    headers: {Authorization: Bearer xyz}
    retry_min: 1s
  box: {protocol: maildir, path: box}
routes:
  - {from: in, to: [hook, box]}
""",
        base=Path("/tmp"),
    )
    hook = config.destinations["hook"]
    assert isinstance(hook, WebhookDestinationConfig)
    assert hook.url == "http://127.0.0.1:9/hook" and hook.secret == "abc"
    assert hook.timeout == 3 and hook.attachment_limit == 10 * 1024
    assert dict(hook.headers) == {"Authorization": "Bearer xyz"}
    assert hook.signature_header == "X-Hub-Signature-256" and hook.verify
    assert check_routes(config, load_transforms(entry_points=False)) == []
    spec = load_transforms(entry_points=False).get("http_to_mail")
    assert spec is not None and spec.output_kind(next(iter(spec.accepts))).value == "mail"


def test_webhook_config_mistakes_are_reported_with_their_place() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            """
version: 1
destinations:
  hook: {protocol: webhook, url: "http://x/", sekret: abc, timeout: soon}
  other: {protocol: webhook, url: "ftp://x/in"}
  third: {protocol: webhook, url: "http://x:99999/in"}
""",
        )
    text = str(info.value)
    assert "unknown key 'sekret'; did you mean 'secret'?" in text
    assert "timeout" in text and ":4:" in text
    assert "routes.yaml:5:35: destination 'other': 'url': expected a URL such as https://" in text
    assert ":6:" in text and "invalid URL 'http://x:99999/in'" in text


@pytest.mark.parametrize(
    "url", ["ftp://x.test/", "http:///nohost", "hooks.example.test/x", "http://exämple.test/"]
)
def test_a_webhook_url_that_is_not_http_is_refused_when_built(url: str) -> None:
    config = WebhookDestinationConfig(name="hook", url=url)
    with pytest.raises(ValueError, match="must look like https://host/path"):
        build_destination(config, Clock())


# --------------------------------------------------------------------------- the JSON


def multipart_mail() -> MailMessage:
    msg = email.message.EmailMessage()
    msg["From"] = "=?utf-8?q?J=C3=BCrgen?= <j@x.test>"
    msg["To"] = "a@y.test, B <b@y.test>"
    msg["Cc"] = "c@y.test"
    msg["Subject"] = "Grüße"
    msg["Message-ID"] = "<m1@x.test>"
    msg["Date"] = "Tue, 01 Jan 2030 10:00:00 +0100"
    msg.set_content("hello wörld\n")
    msg.add_alternative("<p>hello wörld</p>\n", subtype="html")
    msg.add_attachment(b"\x00\x01small", maintype="application", subtype="octet-stream",
                       filename="smäll.bin")  # fmt: skip
    msg.add_attachment(b"B" * 5000, maintype="application", subtype="pdf", filename="big.pdf")
    inner = email.message.EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner text\n")
    msg.add_attachment(inner)
    raw = msg.as_bytes(policy=email.policy.SMTP).replace(b"\r\n", b"\n")
    return MailMessage.from_bytes(
        raw, sender="j@x.test", recipients=["a@y.test", "b@y.test"], listener="mail-in",
        received=1_700_000_000.0,
    )  # fmt: skip


def test_the_json_of_a_multipart_mail_has_everything() -> None:
    message = multipart_mail()
    doc = json.loads(encode_document(message_document(message, attachment_limit=1000)))
    assert doc["id"] == message.id and doc["kind"] == "mail" and doc["listener"] == "mail-in"
    assert doc["received"] == "2023-11-14T22:13:20+00:00"
    assert doc["envelope"] == {"sender": "j@x.test", "recipients": ["a@y.test", "b@y.test"]}
    assert doc["message_id"] == "<m1@x.test>"
    assert doc["subject"] == "Grüße"
    assert doc["from"] == {"name": "Jürgen", "address": "j@x.test"}
    assert doc["to"] == [{"name": "", "address": "a@y.test"}, {"name": "B", "address": "b@y.test"}]
    assert doc["cc"] == [{"name": "", "address": "c@y.test"}]
    assert doc["date"] == "Tue, 01 Jan 2030 10:00:00 +0100"
    assert doc["date_iso"] == "2030-01-01T10:00:00+01:00"
    names = [name for name, _ in doc["headers"]]
    assert names[:6] == ["From", "To", "Cc", "Subject", "Message-ID", "Date"]
    assert ["Subject", "Grüße"] in doc["headers"]
    assert ["From", "Jürgen <j@x.test>"] in doc["headers"]
    assert doc["text"] == "hello wörld\n"
    assert doc["html"] == "<p>hello wörld</p>\n"
    small, big, forwarded = doc["attachments"]
    assert small == {
        "name": "smäll.bin",
        "type": "application/octet-stream",
        "size": 7,
        "disposition": "attachment",
        "content_id": None,
        "included": True,
        "content": base64.b64encode(b"\x00\x01small").decode(),
    }
    assert big["name"] == "big.pdf" and big["size"] == 5000
    assert big["included"] is False and big["content"] is None
    assert forwarded["type"] == "message/rfc822" and forwarded["included"] is True
    assert b"inner text" in base64.b64decode(forwarded["content"])
    # The forwarded message's text is its own, not the mail's.
    assert "inner text" not in doc["text"]


def test_the_json_of_a_plain_mail_and_of_an_article() -> None:
    plain = MailMessage.from_bytes(
        b"Subject: =?iso-8859-1?q?caf=E9?=\nContent-Type: text/plain; charset=iso-8859-1\n"
        b"Content-Transfer-Encoding: quoted-printable\n\ncaf=E9\n",
        sender="",
        recipients=["x@y.test"],
    )
    doc = message_document(plain, attachment_limit=0)
    assert doc["subject"] == "café" and doc["text"] == "café\n" and doc["html"] is None
    assert doc["attachments"] == [] and doc["from"] is None and doc["message_id"] is None
    assert doc["date"] is None and doc["date_iso"] is None
    article = Article.from_bytes(
        b"Newsgroups: comp.test, misc.test\nFrom: a@x.test\nSubject: hi\n"
        b"Message-ID: <a1@x.test>\n\nbody\n"
    )
    doc = message_document(article, attachment_limit=0)
    assert doc["kind"] == "article" and doc["envelope"] is None
    assert doc["newsgroups"] == ["comp.test", "misc.test"] and doc["text"] == "body\n"


def test_undecodable_bytes_still_give_valid_utf8_json() -> None:
    raw = b"Subject: \xff\xfe broken\nContent-Type: text/plain; charset=bogus-8\n\n\xff\xfe\x80 text\n"
    message = MailMessage.from_bytes(raw, sender="a@x.test", recipients=["b@y.test"])
    body = encode_document(message_document(message, attachment_limit=100))
    doc = json.loads(body.decode("utf-8"))
    assert "broken" in doc["subject"] and "text" in doc["text"]


# --------------------------------------------------------------------------- Retry-After


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        ("Tue, 14 Nov 2023 22:13:20 GMT", 0.0),  # exactly now
        ("Mon, 13 Nov 2023 00:00:00 GMT", 0.0),  # in the past: no wait
        ("Tuesday, 14-Nov-23 22:15:20 GMT", 120.0),  # the obsolete RFC 850 form
        ("soon", None),
        ("\u00b2", None),  # a digit to str.isdigit, not to HTTP
        ("Tue, 14 Nov 99999 22:13:20 GMT", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds_or_http_date(value: str | None, wait: float | None) -> None:
    assert parse_retry_after(value, NOW) == wait


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    outcome = outcome_for_status("http://h/x", status, "OK", b"ignored", None)
    assert outcome.status is Status.DELIVERED and f"HTTP {status}" in outcome.detail


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422, 499])
def test_4xx_is_permanent_with_status_and_short_body(status: int) -> None:
    body = b"field 'x' is required\n" + b"y" * 5000
    outcome = outcome_for_status("http://h/x", status, "Nope", body, 30.0)
    assert outcome.status is Status.PERMANENT
    assert outcome.detail.startswith(f"HTTP {status} Nope from http://h/x: field 'x' is required")
    assert len(outcome.detail) < 300
    assert outcome.retry_after is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_5xx_408_429_are_temporary_and_carry_retry_after(status: int) -> None:
    outcome = outcome_for_status("http://h/x", status, "", b"busy", 7.0)
    assert outcome.status is Status.TEMPORARY and outcome.retry_after == 7.0
    assert outcome.detail == f"HTTP {status} from http://h/x: busy"


def test_redirects_are_permanent_and_say_so() -> None:
    outcome = outcome_for_status("http://h/x", 301, "Moved", b"", None)
    assert outcome.status is Status.PERMANENT and "does not follow redirects" in outcome.detail


# --------------------------------------------------------------------------- the destination


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"", headers: Mapping[str, str] = {}) -> None:
        self.code = code
        self.phrase = b"Phrase"
        self.headers = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        for start in range(0, len(self.body), 1000):
            protocol.dataReceived(self.body[start : start + 1000])
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Answers each request with the next of ``answers``: a response, an exception, or a
    Deferred the test fires (or never fires)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[bytes, bytes, Headers, bytes]] = []

    def request(self, method: bytes, url: bytes, headers: Headers, producer: Any) -> Any:
        sent: list[bytes] = []
        producer.startProducing(type("C", (), {"write": lambda self, b: sent.append(b)})())
        self.requests.append((method, url, headers, b"".join(sent)))
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)


def destination(*answers: Any, **settings: Any) -> tuple[WebhookDestination, FakeAgent, Clock]:
    clock = Clock()
    clock.advance(NOW)
    values: dict[str, Any] = {
        "name": "hook",
        "url": "http://127.0.0.1:8080/in?token=sesame",
        "timeout": Duration(5),
    }
    values.update(settings)
    dest = WebhookDestination(WebhookDestinationConfig(**values), clock, clock=clock.seconds)
    agent = FakeAgent(*answers)
    dest._agent = agent  # type: ignore[assignment]
    return dest, agent, clock


def deliver(dest: WebhookDestination, message: Any = None) -> Outcome:
    return run(dest.deliver(message or multipart_mail()))


def test_the_request_is_a_signed_json_post_with_an_idempotency_key() -> None:
    dest, agent, _ = destination(
        FakeResponse(204), secret="k3y", headers={"Authorization": "Bearer t", "X-Env": "test"}
    )
    message = multipart_mail()
    outcome = deliver(dest, message)
    assert outcome.status is Status.DELIVERED and "HTTP 204" in outcome.detail
    [(method, url, headers, body)] = agent.requests
    assert (method, url) == (b"POST", b"http://127.0.0.1:8080/in?token=sesame")
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert headers.getRawHeaders(b"idempotency-key") == [message.id.encode()]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer t"]
    assert headers.getRawHeaders(b"x-env") == [b"test"]
    mac = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert headers.getRawHeaders(b"x-hub-signature-256") == [f"sha256={mac}".encode()]
    assert json.loads(body)["message_id"] == "<m1@x.test>"


def test_no_signature_header_without_a_secret_and_another_header_name() -> None:
    dest, agent, _ = destination(FakeResponse(200))
    deliver(dest)
    assert not agent.requests[0][2].hasHeader(b"x-hub-signature-256")
    dest, agent, _ = destination(FakeResponse(200), secret="k", signature_header="X-Sig")
    deliver(dest)
    assert agent.requests[0][2].getRawHeaders(b"x-sig")[0].startswith(b"sha256=")


def test_a_bad_extra_header_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="not a valid HTTP header"):
        destination(headers={"Bad Name": "x"})
    with pytest.raises(ValueError, match="not a valid HTTP header"):
        destination(headers={"X-Ok": "line\r\nbreak"})
    with pytest.raises(ValueError, match="not a valid HTTP header"):
        destination(signature_header="X Sig")


def test_outcomes_from_responses() -> None:
    dest, _, _ = destination(
        FakeResponse(400, b"missing field: subject"),
        FakeResponse(503, b"down for maintenance", {"Retry-After": "42"}),
        FakeResponse(429, b"", {"Retry-After": email.utils.formatdate(NOW + 10, usegmt=True)}),
        FakeResponse(500, b"x" * 3_000_000),
    )
    bad = deliver(dest)
    assert bad.status is Status.PERMANENT
    assert bad.detail == "HTTP 400 Phrase from http://127.0.0.1:8080/in: missing field: subject"
    busy = deliver(dest)
    assert busy.status is Status.TEMPORARY and busy.retry_after == 42.0
    assert "down for maintenance" in busy.detail
    limited = deliver(dest)
    assert limited.status is Status.TEMPORARY and limited.retry_after == 10.0
    huge = deliver(dest)
    assert huge.status is Status.TEMPORARY and huge.retry_after is None
    # The URL's query may hold a token; reasons go into logs and bounces without it.
    assert not any("sesame" in o.detail for o in (bad, busy, limited, huge))


def test_connection_refused_is_temporary_and_says_so() -> None:
    dest, _, _ = destination(ConnectionRefusedError())
    outcome = deliver(dest)
    assert outcome.status is Status.TEMPORARY
    assert "refused the connection" in outcome.detail and "127.0.0.1:8080" in outcome.detail


def test_no_answer_within_the_timeout_is_temporary() -> None:
    hanging: Deferred[Any] = Deferred()
    dest, _, clock = destination(hanging)
    d = Deferred.fromCoroutine(dest.deliver(multipart_mail()))
    results: list[Outcome] = []
    d.addCallback(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    [outcome] = results
    assert outcome.status is Status.TEMPORARY
    assert outcome.detail == "no answer from http://127.0.0.1:8080/in within 5s"
    assert hanging.called  # cancelled: the connection is dropped, not left hanging


def test_a_kept_alive_connection_closed_under_the_request_is_tried_once_more() -> None:
    stale = ResponseNeverReceived([Failure(ConnectionDone())])
    dest, agent, _ = destination(stale, FakeResponse(202))
    assert deliver(dest).status is Status.DELIVERED
    assert len(agent.requests) == 2
    dest, agent, _ = destination(stale, stale)
    outcome = deliver(dest)
    assert outcome.status is Status.TEMPORARY and "closed the connection" in outcome.detail
    assert len(agent.requests) == 2  # once more, not forever


def test_a_destination_is_given_only_mail_and_articles() -> None:
    dest, agent, _ = destination(FakeResponse(200))
    outcome = deliver(dest, request({}))
    assert outcome.status is Status.PERMANENT and agent.requests == []


# --------------------------------------------------------------------------- Retry-After in delivery


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w.manager.start()
    yield w
    stopped = Deferred.fromCoroutine(w.manager.stop(0))
    w.clock.advance(1)
    assert stopped.called
    run(w.spool.close())


def test_retry_after_sets_the_next_try_instead_of_the_back_off(world: World) -> None:
    answers = iter(
        [
            Outcome.temporary("HTTP 503", retry_after=5.0),
            Outcome.temporary("HTTP 503", retry_after=0.0),
            Outcome.delivered("HTTP 200"),
        ]
    )
    tries: list[float] = []

    def respond(message: MailMessage) -> Outcome:
        tries.append(world.clock.seconds() - START)
        return next(answers)

    world.gateway.add(FakeDestination("hook", respond), retry_min=Duration(60))
    world.submit(world.mail(), "hook")
    [queued] = world.queued()
    assert queued.next_try == START + 5
    world.advance(10)
    assert tries == [0, 5, 6]  # Retry-After 0 waits a second: no busy loop
    assert world.queued() == []


def test_retry_after_is_capped_by_retry_max(world: World) -> None:
    world.gateway.add(
        FakeDestination("hook", lambda m: Outcome.temporary("HTTP 429", retry_after=86400.0)),
        retry_max=Duration(300),
    )
    world.submit(world.mail(), "hook")
    [queued] = world.queued()
    assert queued.next_try == START + 300


def test_without_retry_after_the_back_off_applies(world: World) -> None:
    world.gateway.add(
        FakeDestination("hook", lambda m: Outcome.temporary("HTTP 500")), retry_min=Duration(60)
    )
    world.submit(world.mail(), "hook")
    [queued] = world.queued()
    assert queued.next_try == START + 60


# --------------------------------------------------------------------------- through the router

ROUTED = r"""
version: 1
listeners:
  web: {protocol: http, listen: "tcp:8080"}
destinations:
  box: {protocol: maildir, path: box}
routes:
  - name: hooks
    from: web
    match: {path: '^/hooks/(?P<team>[a-z]+)$'}
    transforms: [http_to_mail]
    options:
      from: bot@gw.test
      to: '{team}@example.test'
      subject: '{{repository.name}} for {team} {{{{literal}}}}'
      body: "{team}: {{text}}\n"
    to: box
"""


def test_named_groups_and_payload_fields_through_the_router() -> None:
    from gateway.routing import Router

    router = Router(parse(ROUTED, base=Path("/tmp")), load_transforms(entry_points=False))
    req = request(
        {"repository": {"name": "gw"}, "text": "{team} stays as sent"}, target="/hooks/ops"
    ).evolve(listener="web")
    [routed] = run(router.route(req))
    out = routed.message
    assert isinstance(out, MailMessage)
    assert out.recipients == ("ops@example.test",)
    assert parsed(out)["Subject"] == "gw for ops {literal}"
    # A payload value is inserted as text, never read as a template again.
    assert text_of(out) == "ops: {team} stays as sent\n"


def test_a_single_brace_payload_field_is_a_config_error_that_says_how() -> None:
    with pytest.raises(ConfigError) as info:
        parse(ROUTED.replace("{{text}}", "{text}"), base=Path("/tmp"))
    assert "option placeholder '{text}' is not a named group" in str(info.value)
    assert "a field of a web hook's payload is written {{text}}" in str(info.value)


# --------------------------------------------------------------------------- any input

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=b",
            "multipart/form-data; boundary=",
            'multipart/form-data; boundary="',
            "application/json; charset=",
            ";;;",
            "",
        ]
    ),
    st.text(max_size=60),
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.builds(
        lambda name, value: (
            f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n--b--\r\n'
        ).encode(),
        st.text(max_size=10),
        st.text(max_size=20),
    ),
)


@settings(max_examples=300, deadline=None)
@given(body=BODIES, content_type=CONTENT_TYPES, subject=st.text(max_size=40))
def test_any_request_becomes_a_mail_or_a_clear_refusal(
    body: bytes, content_type: str, subject: str
) -> None:
    # Whatever a client sends: a mail, a Reject (4xx), or for a broken subject template a
    # ValueError naming the option. Never another exception.
    try:
        out = mail(request(body, content_type=content_type), subject=subject)
    except Reject as exc:
        assert exc.reason is not Reason.MISCONFIGURED and exc.detail
    except ValueError as exc:
        assert "option subject of http_to_mail" in str(exc)
    else:
        assert out.recipients and parsed(out)["Message-ID"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(payload=JSON_VALUES, path=st.text(max_size=15))
def test_any_field_path_is_found_or_refused_with_a_400(payload: Any, path: str) -> None:
    template = "{" + path.replace("{", "").replace("}", "") + "}"
    try:
        out = mail(request(json.dumps(payload)), subject=template)
    except Reject as exc:
        assert exc.reason is Reason.BAD_MESSAGE and "needs" in exc.detail
    except ValueError as exc:
        assert "option subject" in str(exc)  # an empty placeholder or an unknown @name
    else:
        assert "\n" not in parsed(out)["Subject"]


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=600))
def test_any_mail_bytes_give_valid_json(raw: bytes) -> None:
    message = MailMessage.from_bytes(raw, sender="a@x.test", recipients=["b@y.test"])
    doc = json.loads(encode_document(message_document(message, attachment_limit=64)))
    assert doc["envelope"]["recipients"] == ["b@y.test"]
    assert isinstance(doc["headers"], list) and isinstance(doc["attachments"], list)


@given(value=st.text(max_size=40))
def test_any_retry_after_value_is_a_wait_or_none(value: str) -> None:
    wait = parse_retry_after(value, NOW)
    assert wait is None or wait >= 0


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


def upload(disposition: str, ctype: str = "text/plain") -> HttpRequest:
    body = (
        b"--XX\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        b"Content-Type: " + ctype.encode() + b"\r\n\r\nhello\r\n--XX--\r\n"
    )
    return hook(body, "multipart/form-data; boundary=XX")


def test_an_upload_file_name_with_line_breaks_is_made_safe() -> None:
    # RFC 2231 lets a file name carry %0D%0A; it must not break the mail or the request.
    req = upload("form-data; name=\"f\"; filename*=utf-8''a%0D%0ABcc%3A%20e%40v.test")
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
    msg = http_to_mail(upload('form-data; name="f"; filename="a.bin"', ctype), OPTIONS)
    parts = [p for p in parsed(msg).iter_attachments()]
    assert len(parts) == 1
    assert parts[0].get_content_type() == "application/octet-stream"
    assert parts[0].get_payload(decode=True) == b"hello"
    assert not parsed(msg).defects and not parts[0].defects


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
