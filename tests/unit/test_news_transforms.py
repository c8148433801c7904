"""mail_to_news and news_to_mail, in memory: every gating rule of RFC 5536/5537 they promise."""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
import textwrap
from collections.abc import Coroutine, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.python.failure import Failure

from gateway.config import parse
from gateway.message import Article, Kind, MailMessage
from gateway.plugins import Reject, load_transforms
from gateway.ports import Reason
from gateway.routing import Router, TransformFailed, check_routes
from gateway.transforms.mail_to_news import (
    LOOP_HEADER,
    MAX_MESSAGE_ID,
    fold_groups,
    gateway_name,
    is_valid_message_id,
    mail_to_news,
    newsgroup_problem,
    shorten_references,
)
from gateway.transforms.news_to_mail import news_to_mail

T = TypeVar("T")

GW = "gw.example.test"
BODY = b"=E2=82=AC quoted-printable stays as it is\n.a line with a dot\n\xe2\x82\xac 8-bit\n"
SUBJECT_2047 = b"=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?="


def mail(headers: bytes = b"", *, body: bytes = BODY, base: bool = True) -> MailMessage:
    head = (
        b"From: Alice <alice@mail.test>\n"
        b"To: dev@lists.test\n"
        b"Subject: " + SUBJECT_2047 + b"\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        b"Message-ID: <abc.123@mail.test>\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n"
        if base
        else b""
    )
    return MailMessage.from_bytes(
        head + headers + b"\n" + body,
        sender="alice@mail.test",
        recipients=("dev@lists.test",),
        listener="in",
        client="127.0.0.1",
    )


def gate(msg: MailMessage, **options: Any) -> Article:
    opts: dict[str, Any] = {"newsgroups": "test.gateway", "gateway": GW, **options}
    result = mail_to_news(msg, opts)
    assert isinstance(result, Article)
    return result


def replace_field(msg: MailMessage, name: str, value: bytes | None) -> MailMessage:
    headers = msg.headers.remove(name)
    if value is not None:
        headers = headers.add(name, value)
    return msg.replace_headers(headers)


# --- mail_to_news: what every article gets ---------------------------------------------------


def test_article_has_groups_path_sender_and_loop_header() -> None:
    art = gate(mail())
    assert art.kind is Kind.ARTICLE
    assert art.newsgroups == ("test.gateway",)
    assert art.headers.fields[0] == ("Path", f" {GW}!not-for-mail".encode())
    assert art.headers.get_all("Sender") == [f"mail-to-news@{GW}"]
    assert art.headers.get_all(LOOP_HEADER) == [GW]


def test_without_inject_the_injection_fields_are_the_news_servers() -> None:
    msg = mail(b"Injection-Date: Tue, 24 Nov 2026 10:00:00 +0000\nInjection-Info: other.test\n")
    art = gate(msg)
    assert art.headers.get_all("Injection-Date") == []
    assert art.headers.get_all("Injection-Info") == []
    assert ".POSTED" not in art.headers.get_all("Path")[0]


@pytest.mark.parametrize("flag", [True, "yes", "true"])
def test_inject_makes_the_gateway_the_injecting_agent(flag: Any) -> None:
    msg = mail(b"Injection-Date: Tue, 24 Nov 2026 10:00:00 +0000\nInjection-Info: other.test\n")
    art = gate(msg, inject=flag)
    assert art.headers.fields[0] == ("Path", f" {GW}!.POSTED!not-for-mail".encode())
    # From when the gateway received the mail: a retry makes the same article.
    [injected] = art.headers.get_all("Injection-Date")
    assert parsedate_to_datetime(injected).timestamp() == int(msg.received)
    assert gate(msg, inject=flag).headers.get_all("Injection-Date") == [injected]
    assert art.headers.get_all("Injection-Info") == [f'{GW}; posting-host="127.0.0.1"']
    assert art.headers.get_all("Date") == ["Wed, 25 Nov 2026 10:00:00 +0000"]


def test_inject_without_a_known_client_and_with_ipv6() -> None:
    msg = mail()
    assert gate(dataclasses.replace(msg, client=""), inject=True).headers.get_all(
        "Injection-Info"
    ) == [GW]
    assert gate(dataclasses.replace(msg, client="::1"), inject=True).headers.get_all(
        "Injection-Info"
    ) == [f'{GW}; posting-host="::1"']


def test_a_bad_inject_value_is_a_temporary_failure_that_names_the_option() -> None:
    with pytest.raises(ValueError, match="option 'inject' must be true or false"):
        gate(mail(), inject="sometimes")


def test_date_body_encoding_and_rfc2047_subject_are_untouched() -> None:
    msg = mail()
    art = gate(msg)
    raw = dict(art.headers.fields)
    assert raw["Subject"] == b" " + SUBJECT_2047
    assert raw["Date"] == b" Wed, 25 Nov 2026 10:00:00 +0000"
    assert raw["Content-Transfer-Encoding"] == b" quoted-printable"
    assert art.body == msg.body == BODY


def test_the_gateway_message_metadata_carries_over() -> None:
    msg = mail()
    art = gate(msg)
    assert (art.id, art.listener, art.client, art.received) == (
        msg.id,
        msg.listener,
        msg.client,
        msg.received,
    )


def test_gateway_name_defaults_to_this_host() -> None:
    result = mail_to_news(mail(), {"newsgroups": "test.gateway"})
    assert isinstance(result, Article)
    name = result.headers.get(LOOP_HEADER)
    assert name and "." in name
    assert result.headers.get("Path") == f"{name}!not-for-mail"


@pytest.mark.parametrize("bad", ["gw example", "gw!x", "", ".gw", "gw/x"])
def test_an_unusable_gateway_name_is_an_error_that_says_so(bad: str) -> None:
    with pytest.raises(ValueError, match="route option 'gateway'"):
        mail_to_news(mail(), {"newsgroups": "test.gateway", "gateway": bad or " "})


def test_sender_option_and_existing_sender_becomes_original_sender() -> None:
    msg = replace_field(mail(), "Sender", b"list-bounces@lists.test")
    art = gate(msg, sender="gate@news.test")
    assert art.headers.get_all("Sender") == ["gate@news.test"]
    assert art.headers.get_all("Original-Sender") == ["list-bounces@lists.test"]


# --- Message-ID --------------------------------------------------------------------------------


def test_a_valid_message_id_is_reused() -> None:
    art = gate(mail())
    assert art.headers.get_all("Message-ID") == ["<abc.123@mail.test>"]
    assert "X-Original-Message-ID" not in art.headers


def test_a_missing_message_id_is_derived_deterministically() -> None:
    msg = replace_field(mail(), "Message-ID", None)
    first = gate(msg).message_id
    assert first is not None and is_valid_message_id(first)
    assert first.endswith(f"@{GW}>")
    # A retry of the same mail (new trace fields, new gateway id) gives the same id.
    retry = MailMessage.from_bytes(
        b"Received: from elsewhere by mx; Wed, 25 Nov 2026 11:00:00 +0000\n" + msg.to_bytes(),
        sender=msg.sender,
        recipients=msg.recipients,
    )
    assert gate(retry).message_id == first
    # Other content, or other groups, give another id.
    assert gate(msg.replace_body(b"other\n")).message_id != first
    assert gate(msg, newsgroups="test.other").message_id != first
    assert gate(replace_field(msg, "Subject", b"other")).message_id != first


@pytest.mark.parametrize(
    "bad",
    [
        b"<no-at-sign>",
        b"abc@mail.test",
        b"<a b@mail.test>",
        b"<a@b@mail.test>",
        b"<a..b@mail.test>",
        b"<" + b"x" * 250 + b"@mail.test>",
    ],
)
def test_an_invalid_message_id_is_replaced_and_kept_as_x_original(bad: bytes) -> None:
    msg = replace_field(mail(), "Message-ID", bad)
    art = gate(msg)
    new = art.message_id
    assert new is not None and is_valid_message_id(new) and new.endswith(f"@{GW}>")
    assert art.headers.get_all("Message-ID") == [new]
    assert art.headers.get_all("X-Original-Message-ID") == [bad.decode()]
    assert gate(msg).message_id == new


@pytest.mark.parametrize(
    "good",
    [
        "<abc@example.test>",
        "<a.b+c=d/e@[192.0.2.1]>",
        '<"quoted"@example.test>',
        "  <spaces.around@example.test>  ",
        "<" + "x" * 235 + "@example.test>",
    ],
)
def test_valid_message_ids(good: str) -> None:
    assert is_valid_message_id(good)


def test_message_id_length_limit_is_250_octets() -> None:
    assert is_valid_message_id("<" + "x" * 235 + "@example.test>")
    assert not is_valid_message_id("<" + "x" * 236 + "@example.test>")


# --- Newsgroups --------------------------------------------------------------------------------


def test_groups_from_a_list_or_a_comma_string_deduplicated() -> None:
    assert gate(mail(), newsgroups=["test.a", "test.b, test.a"]).newsgroups == ("test.a", "test.b")
    assert gate(mail(), newsgroups="test.a , test.b").newsgroups == ("test.a", "test.b")


def test_the_mails_own_newsgroups_are_replaced_by_the_route() -> None:
    art = gate(mail(b"Newsgroups: alt.elsewhere\n"))
    assert art.headers.get_all("Newsgroups") == ["test.gateway"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("control", "reserved"),
        ("control.cancel", "reserved"),
        ("junk", "reserved"),
        ("to", "reserved"),
        ("to.somehost", "reserved"),
        ("example", "reserved"),
        ("example.group", "reserved"),
        ("poster", "reserved"),
        ("comp.all", "reserved component 'all'"),
        ("ctl.test", "reserved component 'ctl'"),
        ("test.123", "all-digit"),
        ("test..group", "not a valid newsgroup name"),
        (".test", "not a valid newsgroup name"),
        ("test.", "not a valid newsgroup name"),
        ("test group", "not a valid newsgroup name"),
        ("test/group", "not a valid newsgroup name"),
        ("test*", "not a valid newsgroup name"),
        ("test!x", "not a valid newsgroup name"),
    ],
)
def test_reserved_and_invalid_groups_are_refused_for_good(name: str, why: str) -> None:
    with pytest.raises(Reject) as info:
        gate(mail(), newsgroups=f"test.fine,{name}")
    assert why in info.value.detail
    assert name in info.value.detail or name.strip(".") in info.value.detail
    assert info.value.reason is Reason.BAD_ADDRESS


@pytest.mark.parametrize(
    "name", ["test.gateway", "de.comp.lang.c++", "alt.a-b_c", "t.\u00e9t\u00e9"]
)
def test_valid_group_names(name: str) -> None:
    assert newsgroup_problem(name) is None
    assert gate(mail(), newsgroups=name).newsgroups == (name,)


def test_an_empty_group_from_an_unmatched_placeholder_is_refused() -> None:
    with pytest.raises(Reject, match="names no newsgroup"):
        gate(mail(), newsgroups=" , ")


def test_a_route_without_newsgroups_is_refused_with_the_reason() -> None:
    with pytest.raises(Reject, match="'newsgroups'"):
        mail_to_news(mail(), {"gateway": GW})


def test_a_long_crosspost_is_folded_after_commas_into_short_lines() -> None:
    # INN's nnrpd answers "441 Header line too long" to one line over 998 octets.
    groups = [f"test.crosspost{i:03d}.{'x' * 20}" for i in range(60)]
    art = gate(mail(), newsgroups=groups, followup_to=groups)
    assert art.newsgroups == tuple(groups)
    for name in ("Newsgroups", "Followup-To"):
        raw = dict(art.headers.fields)[name]
        lines = (name.encode() + b":" + raw).split(b"\n")
        assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
        assert all(line.endswith(b",") for line in lines[:-1])
        assert [g.strip() for g in (art.headers.get(name) or "").split(",")] == groups


def test_groups_that_fit_one_line_stay_on_one_line() -> None:
    groups = [f"test.g{i:03d}" for i in range(80)]
    assert fold_groups("Newsgroups", groups) == ",".join(groups)
    # A name longer than a short line gets a line of its own, unbroken.
    long_name = "test." + "y" * 120
    folded = fold_groups("Newsgroups", [long_name] * 9)
    assert folded.split(",\n ") == [long_name] * 9


@given(
    st.lists(st.from_regex(r"\Atest\.[a-z0-9+_-]{1,90}\Z"), min_size=1, max_size=120, unique=True)
)
def test_folded_groups_always_unfold_to_the_same_list(groups: list[str]) -> None:
    folded = fold_groups("Newsgroups", groups)
    assert [g.strip() for g in folded.split(",")] == groups
    lines = ("Newsgroups: " + folded).split("\n")
    assert all(len(line) <= 998 for line in lines)
    if len(lines) > 1:
        # Folded lines over 78 octets hold one group that is that long by itself.
        assert all(len(line) <= 78 or "," not in line.rstrip(",") for line in lines)
    else:
        assert len("Newsgroups: " + ",".join(groups)) <= 998


def test_followup_to_comes_from_the_route_only() -> None:
    assert "Followup-To" not in gate(mail(b"Followup-To: alt.elsewhere\n")).headers
    art = gate(mail(b"Followup-To: alt.elsewhere\n"), followup_to="poster")
    assert art.headers.get_all("Followup-To") == ["poster"]
    with pytest.raises(Reject):
        gate(mail(), followup_to="junk")


# --- header clean-up ---------------------------------------------------------------------------

REMOVED = [
    "Xref",
    "Injection-Info",
    "Injection-Date",
    "NNTP-Posting-Host",
    "NNTP-Posting-Date",
    "X-Trace",
    "X-Complaints-To",
    "Received",
    "Return-Path",
    "Distribution",
    "Lines",
    "Bcc",
    "Cancel-Key",
    "NNTP-Posting-User",
]


@pytest.mark.parametrize("name", REMOVED)
def test_transport_fields_of_other_systems_are_removed(name: str) -> None:
    art = gate(mail(f"{name}: something\n{name}: again\n".encode()))
    assert name not in art.headers


def test_a_path_from_outside_is_replaced() -> None:
    art = gate(mail(b"Path: evil!forged!not-for-mail\n"))
    assert art.headers.get_all("Path") == [f"{GW}!not-for-mail"]


@pytest.mark.parametrize(
    ("name", "renamed"),
    [
        ("Control", "X-Original-Control"),
        ("Also-Control", "X-Original-Also-Control"),
        ("Supersedes", "X-Original-Supersedes"),
    ],
)
def test_control_fields_are_renamed_so_they_do_nothing(name: str, renamed: str) -> None:
    art = gate(mail(f"{name}: cancel <victim@x.test>\n".encode()))
    assert name not in art.headers
    assert art.headers.get_all(renamed) == ["cancel <victim@x.test>"]


def test_approved_is_removed_unless_the_route_sets_it() -> None:
    msg = mail(b"Approved: forged@moderator.test\n")
    assert "Approved" not in gate(msg).headers
    art = gate(msg, approved="moderator@news.test")
    assert art.headers.get_all("Approved") == ["moderator@news.test"]


# --- References --------------------------------------------------------------------------------


def test_references_made_from_in_reply_to() -> None:
    art = gate(mail(b"In-Reply-To: <parent@mail.test> (Alice's message)\n"))
    assert art.headers.get_all("References") == ["<parent@mail.test>"]


def test_in_reply_to_without_an_id_makes_no_references() -> None:
    assert "References" not in gate(mail(b"In-Reply-To: a message of Alice\n")).headers


def test_existing_references_are_kept_byte_for_byte() -> None:
    raw = b"References: <a@x.test>\n <b@x.test>\n"
    art = gate(mail(raw + b"In-Reply-To: <other@x.test>\n"))
    assert dict(art.headers.fields)["References"] == b" <a@x.test>\n <b@x.test>"


def test_long_references_are_shortened_to_998_octets_keeping_first_and_last() -> None:
    ids = [f"<message-number-{i:04d}.with-some-length@mail.example.test>" for i in range(60)]
    art = gate(mail(b"References: " + "\n ".join(ids).encode() + b"\n"))
    value = art.headers.get("References")
    assert value is not None
    assert len("References: " + value) <= 998
    kept = value.split()
    assert kept[0] == ids[0] and kept[-1] == ids[-1]
    assert kept[1:] == ids[len(ids) - len(kept) + 1 :]
    # The output must also be one line a news server takes.
    assert b"\n" not in dict(art.headers.fields)["References"]


msg_ids = st.from_regex(r"\A<[a-z0-9.]{1,60}@[a-z0-9]{1,20}\.test>\Z")


@given(st.lists(msg_ids, min_size=1, max_size=80))
def test_shortened_references_always_fit_and_keep_order(ids: list[str]) -> None:
    kept = shorten_references(ids)
    assert len("References: " + " ".join(kept)) <= 998
    assert kept, "ids of at most 82 octets always fit"
    assert kept[-1] == ids[-1]
    if len(kept) > 1:
        assert kept[0] == ids[0]
        assert kept[1:] == ids[len(ids) - len(kept) + 1 :]
    if len("References: " + " ".join(ids)) <= 998:
        assert kept == ids


# --- loop prevention ---------------------------------------------------------------------------


def test_mail_this_gateway_already_gated_is_dropped() -> None:
    msg = mail(f"{LOOP_HEADER}: {GW}\n".encode())
    assert mail_to_news(msg, {"newsgroups": "test.gateway", "gateway": GW}) is None


def test_mail_gated_by_another_gateway_goes_on_with_both_names() -> None:
    art = gate(mail(f"{LOOP_HEADER}: other.gateway.test\n".encode()))
    assert art.headers.get_all(LOOP_HEADER) == ["other.gateway.test", GW]


# --- news_to_mail ------------------------------------------------------------------------------


def article(extra: bytes = b"", *, body: bytes = BODY) -> Article:
    data = (
        b"Path: inn.localdomain!.POSTED.localhost!not-for-mail\n"
        b"From: Bob <bob@news.test>\n"
        b"Newsgroups: test.gateway\n"
        b"Subject: " + SUBJECT_2047 + b"\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        b"Message-ID: <art.1@news.test>\n"
        b"References: <root@news.test> <parent@news.test>\n"
        b"Injection-Info: inn.localdomain; posting-host=localhost\n"
        b"Injection-Date: Wed, 25 Nov 2026 10:00:01 -0000\n"
        b"Xref: inn.localdomain test.gateway:7\n"
        b"NNTP-Posting-Host: localhost\n"
        b"X-Trace: something\n"
        b"X-Complaints-To: usenet@inn.localdomain\n"
        b"Lines: 3\n"
        b"Content-Transfer-Encoding: quoted-printable\n" + extra + b"\n" + body
    )
    return Article.from_bytes(data, listener="poll", client="127.0.0.1")


def unsend(art: Article, **options: Any) -> MailMessage:
    opts: dict[str, Any] = {"to": "list@lists.test", "gateway": GW, **options}
    result = news_to_mail(art, opts)
    assert isinstance(result, MailMessage)
    return result


def test_news_to_mail_keeps_ids_dates_threads_and_body() -> None:
    art = article()
    out = unsend(art)
    assert out.kind is Kind.MAIL
    raw = dict(out.headers.fields)
    for name in ("Message-ID", "Date", "References", "Subject", "From", "Newsgroups"):
        assert raw[name] == dict(art.headers.fields)[name], name
    assert out.body == art.body
    assert out.headers.get_all("To") == ["list@lists.test"]
    assert out.recipients == ("list@lists.test",)
    assert out.sender == f"news-to-mail@{GW}"
    assert out.headers.get_all(LOOP_HEADER) == [GW]
    assert out.id == art.id


@pytest.mark.parametrize(
    "name",
    [
        "Path",
        "Xref",
        "Injection-Info",
        "Injection-Date",
        "NNTP-Posting-Host",
        "X-Trace",
        "X-Complaints-To",
        "Lines",
    ],
)
def test_news_transport_fields_do_not_go_out_in_mail(name: str) -> None:
    assert name not in unsend(article()).headers


def test_approved_does_not_go_out_in_mail() -> None:
    assert "Approved" not in unsend(article(b"Approved: mod@news.test\n")).headers


def test_from_and_envelope_options() -> None:
    out = unsend(
        article(b"To: someone@else.test\n"),
        to=["List <list@lists.test>", "copy@lists.test"],
        **{"from": "News Gateway <gateway@news.test>"},
    )
    assert out.headers.get_all("From") == ["News Gateway <gateway@news.test>"]
    assert out.headers.get_all("X-Original-From") == ["Bob <bob@news.test>"]
    assert out.headers.get_all("To") == ["List <list@lists.test>, copy@lists.test"]
    assert out.recipients == ("list@lists.test", "copy@lists.test")
    assert out.sender == "gateway@news.test"
    out = unsend(article(), envelope_from="bounces@lists.test", envelope_to="real@lists.test")
    assert (out.sender, out.recipients) == ("bounces@lists.test", ("real@lists.test",))
    assert out.headers.get_all("To") == ["list@lists.test"]


def test_list_headers_when_the_route_says_so() -> None:
    assert "List-Id" not in unsend(article()).headers
    out = unsend(article(), list_id="test-gateway.lists.test", list_post="test@news.test")
    assert out.headers.get_all("List-Id") == ["<test-gateway.lists.test>"]
    assert out.headers.get_all("List-Post") == ["<mailto:test@news.test>"]
    out = unsend(article(), list_id='"Tests" <t.lists.test>', list_post="NO")
    assert out.headers.get_all("List-Id") == ['"Tests" <t.lists.test>']
    assert out.headers.get_all("List-Post") == ["NO"]


@pytest.mark.parametrize(
    "extra",
    [
        b"Control: cancel <art.0@news.test>\n",
        b"Control: newgroup test.new\n",
        b"Also-Control: newgroup test.new\n",
        b"Subject: cmsg cancel <art.0@news.test>\n",
    ],
)
def test_control_messages_and_cancels_are_not_mailed(extra: bytes) -> None:
    art = article(extra)
    if extra.startswith(b"Subject"):
        art = art.replace_headers(art.headers.set("Subject", extra[9:].strip()))
    assert news_to_mail(art, {"to": "list@lists.test", "gateway": GW}) is None


def test_posts_to_control_groups_are_not_mailed() -> None:
    art = article()
    art = art.replace_headers(art.headers.set("Newsgroups", "control.cancel"))
    assert news_to_mail(art, {"to": "list@lists.test", "gateway": GW}) is None


def test_an_article_that_came_from_mail_here_is_not_mailed_back() -> None:
    art = article(f"{LOOP_HEADER}: {GW}\n".encode())
    assert news_to_mail(art, {"to": "list@lists.test", "gateway": GW}) is None
    assert isinstance(
        news_to_mail(art, {"to": "list@lists.test", "gateway": "other.test"}), MailMessage
    )


@pytest.mark.parametrize("options", [{}, {"to": "no address here"}, {"to": 5}])
def test_a_route_without_a_usable_to_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(Reject, match="'to'"):
        news_to_mail(article(), {"gateway": GW, **options})


def test_round_trips_stop_at_the_loop_header() -> None:
    art = gate(mail())
    assert news_to_mail(art, {"to": "list@lists.test", "gateway": GW}) is None
    back = unsend(article())
    assert mail_to_news(back, {"newsgroups": "test.gateway", "gateway": GW}) is None


# --- through the router ------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    d = defer.Deferred.fromCoroutine(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the coroutine did not finish synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


CONFIG = r"""
version: 1
listeners:
  in: {protocol: smtp, listen: "tcp:2525"}
destinations:
  box: {protocol: maildir, path: box}
routes:
  - name: lists-to-news
    from: in
    match: {rcpt: '^(?P<group>[a-z0-9.+-]+)@news\.test$'}
    transforms: [mail_to_news]
    options: {newsgroups: '{group}', gateway: gw.example.test}
    to: box
"""


def router() -> Router:
    config = parse(textwrap.dedent(CONFIG), "routes.yaml", Path("/tmp"))
    transforms = load_transforms(entry_points=False)
    assert check_routes(config, transforms) == []
    return Router(config, transforms)


def test_registered_with_their_kinds() -> None:
    transforms = load_transforms(entry_points=False)
    m2n, n2m = transforms.get("mail_to_news"), transforms.get("news_to_mail")
    assert m2n is not None and n2m is not None
    assert (m2n.accepts, m2n.produces) == (frozenset({Kind.MAIL}), Kind.ARTICLE)
    assert (n2m.accepts, n2m.produces) == (frozenset({Kind.ARTICLE}), Kind.MAIL)


def test_route_fills_the_group_from_the_recipient() -> None:
    msg = mail().with_recipients(["test.gateway@news.test"])
    routed = run(router().route(msg))
    assert len(routed) == 1
    art = routed[0].message
    assert isinstance(art, Article) and art.newsgroups == ("test.gateway",)


def test_a_reserved_group_from_the_recipient_is_a_permanent_refusal() -> None:
    msg = mail().with_recipients(["control.cancel@news.test"])
    with pytest.raises(TransformFailed) as info:
        run(router().route(msg))
    rejected = info.value.rejected
    assert rejected is not None and "control.cancel" in rejected.detail


def test_options_mapping_is_not_modified() -> None:
    options: Mapping[str, Any] = {"newsgroups": ["test.a"], "gateway": GW}
    before = dict(options)
    gate(mail(), **options)
    assert dict(options) == before


# --- properties --------------------------------------------------------------------------------

field_names = st.sampled_from(
    [
        "From", "To", "Subject", "Date", "Message-ID", "Sender", "Control", "Supersedes",
        "Approved", "Path", "Received", "Xref", "Injection-Info", "Newsgroups", "References",
        "In-Reply-To", "X-Gateway-Loop", "Followup-To", "Distribution", "X-Other",
    ]
)  # fmt: skip
field_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
    max_size=40,
)
bodies = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b""))


@given(st.lists(st.tuples(field_names, field_values), max_size=12), bodies)
def test_any_mail_gives_a_clean_article_or_is_dropped_by_the_loop_check(
    fields: list[tuple[str, str]], body: bytes
) -> None:
    msg = MailMessage(sender="a@b.test", recipients=("x@news.test",), body=body)
    headers = msg.headers
    for name, value in fields:
        headers = headers.add(name, value)
    msg = msg.replace_headers(headers)
    result = mail_to_news(msg, {"newsgroups": "test.gateway", "gateway": GW})
    if any(n == LOOP_HEADER and v.strip().lower() == GW for n, v in fields):
        assert result is None
        return
    assert isinstance(result, Article)
    out = result.headers
    for name in ("Control", "Supersedes", "Approved", "Received", "Xref", "Injection-Info"):
        assert name not in out
    for name in ("Path", "Message-ID", "Newsgroups", "Sender"):
        assert len(out.get_all(name)) == 1, name
    assert out.get("Path") == f"{GW}!not-for-mail"
    message_id = out.get("Message-ID")
    assert message_id is not None and is_valid_message_id(message_id)
    assert result.body == body
    refs = out.get("References")
    assert (
        refs is None or len("References: " + refs) <= 998 or refs == msg.headers.get("References")
    )
    # The same mail again gives the same article header.
    again = mail_to_news(msg, {"newsgroups": "test.gateway", "gateway": GW})
    assert isinstance(again, Article) and again.headers == out


@given(st.text(max_size=40))
def test_any_newsgroups_option_posts_only_valid_groups_or_refuses(value: str) -> None:
    try:
        art = gate(mail(), newsgroups=value)
    except Reject as exc:
        assert exc.detail and exc.reason in (Reason.BAD_ADDRESS, Reason.MISCONFIGURED)
        return
    assert art.newsgroups
    assert all(newsgroup_problem(g) is None for g in art.newsgroups)


GW = "gw.example.test"


def list_mail(extra: bytes, *, body: bytes = b"body\n") -> MailMessage:
    head = b"From: Alice <alice@mail.test>\nSubject: hello\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"
    return MailMessage.from_bytes(
        head + extra + b"\n" + body,
        sender="alice@mail.test",
        recipients=("dev@lists.test",),
        listener="in",
        client="127.0.0.1",
    )


def gated(msg: MailMessage, **options: Any) -> Article:
    result = mail_to_news(msg, {"newsgroups": "test.gateway", "gateway": GW, **options})
    assert isinstance(result, Article)
    return result


def raw_fields(headers: Any, name: str) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name.lower()]


def test_a_folded_message_id_goes_out_unfolded_and_is_kept() -> None:
    # RFC 5536 3.1.3: the Message-ID field is the msg-id-core with optional WSP, no folding;
    # RFC 5322 allowed the fold in the mail, the article must not carry it.
    art = gated(list_mail(b"Message-ID:\n <abc.1@mail.test>\n"))
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
    art = gated(list_mail(field))
    assert raw_fields(art.headers, "Message-ID") == [b" <abc.2@mail.test>"]


def test_a_derived_message_id_never_exceeds_250_octets() -> None:
    # RFC 5536 3.1.3: msg-id-core at most 250 octets; a long gateway name must not break it.
    long_name = ".".join(["a" * 60] * 4)  # a 243-character host name, valid as such
    art = gated(list_mail(b""), gateway=long_name)
    msgid = art.message_id
    assert msgid is not None
    assert len(msgid.encode()) <= MAX_MESSAGE_ID
    assert is_valid_message_id(msgid)
    assert gated(list_mail(b""), gateway=long_name).message_id == msgid  # still deterministic


def test_a_gateway_name_longer_than_a_host_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="gateway"):
        gateway_name({"gateway": "a" * 300})


def list_article() -> Article:
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
    result = news_to_mail(list_article(), {"to": "list@lists.test", "gateway": GW, **options})
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


OPTIONS: dict[str, Any] = {
    "from": "Hook bot <bot@gw.test>",
    "to": ["ops@example.test"],
    "message_id_domain": "gw.test",
}


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
    art = gated(msg)
    assert art.headers.get("Date") == "Tue, 25 Nov 2025 10:00:00 +0000"
    assert gated(msg).to_bytes() == art.to_bytes()  # a retry makes the same article


def test_a_mail_without_subject_gets_one() -> None:
    art = gated(bare_mail(b"From: a@mail.test\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"))
    assert art.headers.get("Subject") == "(no subject)"


def test_a_mail_without_from_takes_the_envelope_sender() -> None:
    art = gated(bare_mail(b"Subject: s\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n"))
    assert art.headers.get("From") == "alice@mail.test"


def test_a_mail_without_any_originator_is_refused_saying_why() -> None:
    with pytest.raises(Reject, match="From"):
        gated(bare_mail(b"Subject: s\n", sender=""))


def long_id(n: int) -> str:
    # 250 octets, the longest msg-id-core RFC 5536 3.1.3 allows.
    left = f"{n}." + "x" * (250 - len(f"{n}.") - len("@mail.test") - 2)
    return f"<{left}@mail.test>"


def test_references_keep_the_first_and_last_three_even_when_they_need_two_lines() -> None:
    ids = [long_id(n) for n in range(6)]
    assert all(len(i) == 250 for i in ids)
    art = gated(
        list_mail(b"Message-ID: <r.1@mail.test>\nReferences: " + "\n ".join(ids).encode() + b"\n")
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
