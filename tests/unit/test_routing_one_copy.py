"""Routes whose transform asks for one copy (``one_copy=True``): every recipient in one copy,
option values that differ between the recipients joined with "," (a crosspost for news)."""

from __future__ import annotations

import textwrap
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from gateway.config import parse
from gateway.message import Article, Kind, MailMessage
from gateway.plugins import Transforms, load_transforms, transform
from gateway.routing import (
    NoRoute,
    Router,
    Trace,
    TransformFailed,
    check_routes,
    join_option_values,
)

T = TypeVar("T")

GW = "gw.example.test"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that completes without the reactor (all in memory)."""
    d = defer.Deferred.fromCoroutine(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the coroutine did not finish synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


# What each transform saw, as (transform, recipients, options) in call order.
SEEN: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []


def _record(name: str, msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
    SEEN.append((name, msg.recipients, {k: options[k] for k in options}))
    return msg


@transform("together", accepts=[Kind.MAIL], one_copy=True)
def together(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
    return _record("together", msg, options)


@transform("apart", accepts=[Kind.MAIL])
def apart(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
    return _record("apart", msg, options)


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    SEEN.clear()


CONFIG = r"""
version: 1
listeners:
  in: {protocol: smtp, listen: "tcp:2525"}
destinations:
  box: {protocol: maildir, path: box}
  news: {protocol: nntp, connect: "tcp:127.0.0.1:119"}
  archive: {protocol: maildir, path: archive}
routes:
  - name: audit
    from: in
    match: {sender: '^boss@'}
    continue: true
    to: archive
  - name: news
    from: in
    match: {rcpt: '^(?P<group>[a-z0-9.+-]+)@news\.test$'}
    transforms: [mail_to_news]
    options: {newsgroups: '{group}', gateway: gw.example.test}
    to: news
  - name: local-news
    from: in
    match: {rcpt: '^(?P<group>[a-z0-9.+-]+)@local\.test$'}
    transforms: [mail_to_news]
    options: {newsgroups: 'local.{group}', gateway: gw.example.test}
    to: news
  - name: together
    from: in
    match: {rcpt: '^(?P<user>[a-z]+)(?:\+(?P<tag>[a-z]+))?@together\.test$'}
    transforms: [apart, together]
    options:
      to: '{user}'
      fixed: same for all
      number: 7
      names: ['{user}', all]
      nested: {who: '{user}', what: constant}
      tag: '{tag}'
    to: box
  - name: apart
    from: in
    match: {rcpt: '^(?P<user>[a-z]+)@apart\.test$'}
    transforms: [apart]
    options: {to: '{user}'}
    to: box
"""


def registry() -> Transforms:
    t = load_transforms(entry_points=False)
    for func in (together, apart):
        t.add(func.__gateway_transform__)  # type: ignore[attr-defined]
    return t


def router() -> Router:
    config = parse(textwrap.dedent(CONFIG), "routes.yaml", Path("/tmp"))
    t = registry()
    assert check_routes(config, t) == []
    return Router(config, t)


def mail(*rcpts: str, sender: str = "alice@mail.test", message_id: bool = True) -> MailMessage:
    data = (
        b"From: Alice <alice@mail.test>\n"
        b"Subject: hello\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        + (b"Message-ID: <crosspost.1@mail.test>\n" if message_id else b"")
        + b"\nbody\n"
    )
    return MailMessage.from_bytes(
        data, sender=sender, recipients=rcpts, listener="in", client="127.0.0.1"
    )


# --- registration ---------------------------------------------------------------------------------


def test_mail_to_news_asks_for_one_copy_and_others_do_not() -> None:
    t = load_transforms(entry_points=False)
    specs = {name: t.get(name) for name in t.names()}
    assert specs["mail_to_news"] is not None and specs["mail_to_news"].one_copy
    assert [n for n, s in specs.items() if s is not None and s.one_copy] == ["mail_to_news"]
    assert together.__gateway_transform__.one_copy  # type: ignore[attr-defined]
    assert not apart.__gateway_transform__.one_copy  # type: ignore[attr-defined]


# --- mail_to_news through the router ------------------------------------------------------------


def test_two_group_addresses_become_one_crossposted_article() -> None:
    routed = run(router().route(mail("comp.a@news.test", "comp.b@news.test")))
    assert len(routed) == 1
    (one,) = routed
    assert one.route.name == "news" and one.destinations == ("news",)
    art = one.message
    assert isinstance(art, Article)
    assert art.newsgroups == ("comp.a", "comp.b")
    assert art.headers.get_all("Newsgroups") == ["comp.a,comp.b"]
    assert art.message_id == "<crosspost.1@mail.test>"


def test_groups_follow_the_recipient_order_and_repeats_count_once() -> None:
    msg = mail("comp.b@news.test", "comp.a@news.test", "comp.b@news.test")
    (one,) = run(router().route(msg))
    assert isinstance(one.message, Article)
    assert one.message.newsgroups == ("comp.b", "comp.a")


def test_the_interpolated_values_are_joined_not_the_named_groups() -> None:
    (one,) = run(router().route(mail("a@local.test", "b@local.test")))
    assert isinstance(one.message, Article)
    # 'local.{group}' gives local.a and local.b; joining the groups would give local.a,b.
    assert one.message.newsgroups == ("local.a", "local.b")


def test_each_one_copy_route_makes_its_own_copy() -> None:
    msg = mail("comp.a@news.test", "x@local.test", "comp.b@news.test", "y@local.test")
    routed = run(router().route(msg))
    got = [(r.route.name, r.message.newsgroups) for r in routed]  # type: ignore[attr-defined]
    assert got == [("news", ("comp.a", "comp.b")), ("local-news", ("local.x", "local.y"))]


def test_a_derived_message_id_is_the_same_on_a_retry() -> None:
    msg = mail("comp.a@news.test", "comp.b@news.test", message_id=False)
    (first,) = run(router().route(msg))
    (again,) = run(router().route(msg))
    assert isinstance(first.message, Article) and isinstance(again.message, Article)
    assert first.message.message_id == again.message.message_id
    assert (first.message.message_id or "").endswith(f"@{GW}>")


def test_one_bad_group_refuses_the_copy_with_its_name() -> None:
    with pytest.raises(TransformFailed) as info:
        run(router().route(mail("comp.a@news.test", "control.cancel@news.test")))
    rejected = info.value.rejected
    assert rejected is not None and "control.cancel" in rejected.detail


def test_continue_routes_still_fan_out_next_to_the_one_copy() -> None:
    msg = mail("comp.a@news.test", "comp.b@news.test", sender="boss@mail.test")
    routed = run(router().route(msg))
    assert [(r.route.name, r.message.kind) for r in routed] == [
        ("audit", Kind.MAIL),
        ("news", Kind.ARTICLE),
    ]
    assert routed[0].message.recipients == ("comp.a@news.test", "comp.b@news.test")  # type: ignore[attr-defined]
    assert routed[1].message.newsgroups == ("comp.a", "comp.b")  # type: ignore[attr-defined]


def test_unrouted_recipients_are_still_refused() -> None:
    with pytest.raises(NoRoute) as info:
        run(router().route(mail("comp.a@news.test", "nobody@nowhere.test")))
    assert info.value.recipients == ("nobody@nowhere.test",)


# --- how the options are joined -------------------------------------------------------------------


def test_every_transform_of_a_one_copy_route_sees_the_joined_options() -> None:
    routed = run(router().route(mail("ann@together.test", "bob+x@together.test")))
    assert len(routed) == 1
    assert routed[0].message.recipients == ("ann@together.test", "bob+x@together.test")  # type: ignore[attr-defined]
    expected = {
        "to": "ann,bob",
        "fixed": "same for all",
        "number": 7,
        "names": ("ann", "all", "bob"),
        "nested": {"who": "ann,bob", "what": "constant"},
        # A group one recipient did not match fills in as "" for it.
        "tag": ",x",
    }
    for name in ("apart", "together"):
        seen = next(s for s in SEEN if s[0] == name)
        options = dict(seen[2], nested=dict(seen[2]["nested"]))
        assert seen[1] == ("ann@together.test", "bob+x@together.test")
        assert options == expected


def test_routes_without_such_a_transform_are_split_as_before() -> None:
    msg = mail("ann@apart.test", "bob@apart.test", "ann@apart.test")
    routed = run(router().route(msg))
    assert [r.message.recipients for r in routed] == [  # type: ignore[attr-defined]
        ("ann@apart.test", "ann@apart.test"),
        ("bob@apart.test",),
    ]
    assert [(s[1], s[2]) for s in SEEN] == [
        (("ann@apart.test", "ann@apart.test"), {"to": "ann"}),
        (("bob@apart.test",), {"to": "bob"}),
    ]


def test_join_option_values() -> None:
    assert join_option_values(["a"]) == "a"
    assert join_option_values(["a", "a"]) == "a"
    assert join_option_values(["a", "b", "a", "c"]) == "a,b,c"
    assert join_option_values([("a", "x"), ("b", "x")]) == ("a", "x", "b")
    assert join_option_values([5, 5]) == 5
    joined = join_option_values([{"k": "a", "n": 1}, {"k": "b", "n": 1, "extra": "e"}])
    assert dict(joined) == {"k": "a,b", "n": 1, "extra": "e"}


def test_match_reports_the_joined_groups() -> None:
    found = router().match(mail("comp.a@news.test", "comp.b@news.test"))
    assert [(r.name, g, rc) for r, g, rc in found] == [
        ("news", {"group": "comp.a,comp.b"}, ("comp.a@news.test", "comp.b@news.test"))
    ]


# --- what gateway route --dry-run shows -------------------------------------------------------


def test_trace_names_the_one_copy_and_the_joined_options() -> None:
    trace = Trace()
    run(router().route(mail("comp.a@news.test", "comp.b@news.test"), trace))
    assert trace.steps == [
        "route 'news' matches for comp.a@news.test, comp.b@news.test as one copy"
        " (transform 'mail_to_news'); named groups {'group': 'comp.a'}, {'group': 'comp.b'}",
        "  options joined for the one copy: newsgroups 'comp.a,comp.b'",
        "  transform 'mail_to_news' -> 1 message(s)",
    ]


def test_trace_of_one_recipient_is_as_before() -> None:
    trace = Trace()
    run(router().route(mail("comp.a@news.test"), trace))
    assert trace.steps == [
        "route 'news' matches for comp.a@news.test; named groups {'group': 'comp.a'}",
        "  transform 'mail_to_news' -> 1 message(s)",
    ]
