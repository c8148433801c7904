"""The router and plugins, in memory: order, fan-out, named groups, headers, failures."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import defer, task

from gateway.config import parse
from gateway.message import Article, Headers, Kind, MailMessage, Message
from gateway.plugins import PluginError, Transforms, load_transforms, transform
from gateway.routing import NoRoute, Router, Trace, TransformFailed, check_routes
from tests.support.deferreds import run

T = TypeVar("T")


CONFIG = r"""
version: 1
listeners:
  in: {protocol: smtp, listen: "tcp:2525"}
  other: {protocol: smtp, listen: "tcp:2526"}
destinations:
  box: {protocol: maildir, path: box}
  archive: {protocol: maildir, path: archive}
  relay: {protocol: smtp, connect: "tcp:127.0.0.1:25"}
routes:
  - name: audit
    from: in
    match: {sender: '^boss@'}
    continue: true
    to: archive
  - name: lists
    from: in
    match: {rcpt: '^(?P<list>[a-z]+)@lists\.test$'}
    transforms: [tag]
    options: {tag: '[{list}]'}
    to: box
  - name: urgent
    from: in
    match: {rcpt: '@example\.test$', header: {X-Priority: '^(?P<prio>1)'}}
    to: [box, relay]
  - name: example
    from: in
    match: {rcpt: '@EXAMPLE\.test$'}
    to: relay
  - name: from-other
    from: other
    to: box
"""


@transform("tag", accepts=[Kind.MAIL])
def tag(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
    return msg.replace_headers(
        msg.headers.set("Subject", f"{options['tag']} {msg.headers.get('Subject')}")
    )


def registry(*extra: Any) -> Transforms:
    t = load_transforms(entry_points=False)
    for func in (tag, *extra):
        t.add(func.__gateway_transform__)
    return t


def router(text: str = CONFIG, *extra: Any) -> Router:
    config = parse(textwrap.dedent(text), "routes.yaml", Path("/tmp"))
    t = registry(*extra)
    assert check_routes(config, t) == []
    return Router(config, t)


def mail(
    *rcpts: str, sender: str = "a@b.test", listener: str = "in", headers: str = ""
) -> MailMessage:
    data = f"Subject: hello\nMessage-ID: <1@b.test>\n{headers}\nbody\n".encode()
    return MailMessage.from_bytes(
        data, sender=sender, recipients=rcpts, listener=listener, client="127.0.0.1"
    )


def test_first_match_wins_and_groups_fill_options() -> None:
    routed = run(router().route(mail("dev@lists.test")))
    assert [(r.route.name, r.destinations) for r in routed] == [("lists", ("box",))]
    assert routed[0].message.headers.get("Subject") == "[dev] hello"  # type: ignore[attr-defined]


def test_recipients_split_by_route_and_by_named_groups() -> None:
    routed = run(
        router().route(mail("dev@lists.test", "ops@lists.test", "x@example.test", "dev@lists.test"))
    )
    got = [(r.route.name, r.message.recipients, r.message.headers.get("Subject")) for r in routed]  # type: ignore[attr-defined]
    assert got == [
        ("lists", ("dev@lists.test", "dev@lists.test"), "[dev] hello"),
        ("lists", ("ops@lists.test",), "[ops] hello"),
        ("example", ("x@example.test",), "hello"),
    ]


def test_continue_fans_out_and_header_match_applies() -> None:
    msg = mail("x@example.test", sender="boss@b.test", headers="X-Priority: 1 (Highest)")
    routed = run(router().route(msg))
    assert [(r.route.name, r.destinations) for r in routed] == [
        ("audit", ("archive",)),
        ("urgent", ("box", "relay")),
    ]


def test_matching_is_case_insensitive_like_postfix_regexp_tables() -> None:
    routed = run(router().route(mail("Someone@Example.TEST")))
    assert [r.route.name for r in routed] == ["example"]


def test_routes_only_see_their_listeners() -> None:
    routed = run(router().route(mail("anyone@anywhere.test", listener="other")))
    assert [r.route.name for r in routed] == ["from-other"]


def test_unroutable_recipient_is_named() -> None:
    with pytest.raises(NoRoute) as info:
        run(router().route(mail("dev@lists.test", "stranger@nowhere.test")))
    assert info.value.recipients == ("stranger@nowhere.test",)


def test_rcpt_time_check_ignores_headers_but_not_addresses() -> None:
    r = router()
    assert r.accepts_recipient("in", "a@b.test", "dev@lists.test", "127.0.0.1")
    assert r.accepts_recipient("in", "a@b.test", "x@example.test", "127.0.0.1")
    assert not r.accepts_recipient("in", "a@b.test", "x@nowhere.test", "127.0.0.1")
    assert not r.accepts_recipient("nosuch", "a@b.test", "dev@lists.test", "127.0.0.1")


def test_client_network_match() -> None:
    text = CONFIG.replace(
        "  - name: audit\n",
        "  - name: lan\n    from: in\n    match: {client: [10.0.0.0/8]}\n    to: box\n  - name: audit\n",
    )
    r = router(text)
    lan = mail("z@nowhere.test")
    assert [x.route.name for x in run(r.route(lan.evolve(client="10.1.2.3")))] == ["lan"]
    with pytest.raises(NoRoute):
        run(r.route(lan))


def test_transform_results_drop_fanout_and_async() -> None:
    @transform("drop")
    def drop(msg: Message, options: Mapping[str, Any]) -> None:
        return None

    @transform("twice")
    def twice(msg: MailMessage, options: Mapping[str, Any]) -> list[MailMessage]:
        return [msg, msg.replace_body(b"second\n")]

    @transform("later")
    async def later(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
        return msg.replace_body(b"async\n")

    @transform("deferred")
    def deferred(msg: MailMessage, options: Mapping[str, Any]) -> defer.Deferred[MailMessage]:
        return defer.succeed(msg.replace_body(msg.body + b"deferred\n"))

    text = CONFIG.replace("transforms: [tag]", "transforms: [tag, twice, later, deferred]")
    routed = run(router(text, drop, twice, later, deferred).route(mail("dev@lists.test")))
    assert [r.message.body for r in routed] == [b"async\ndeferred\n", b"async\ndeferred\n"]  # type: ignore[attr-defined]
    text = CONFIG.replace("transforms: [tag]", "transforms: [drop, tag]")
    assert run(router(text, drop).route(mail("dev@lists.test"))) == []


def test_async_transform_waits_for_the_reactor() -> None:
    clock = task.Clock()

    @transform("slow")
    def slow(msg: MailMessage, options: Mapping[str, Any]) -> defer.Deferred[MailMessage]:
        return task.deferLater(clock, 5, lambda: msg.replace_body(b"late\n"))

    text = CONFIG.replace("transforms: [tag]", "transforms: [slow]")
    d = defer.Deferred.fromCoroutine(router(text, slow).route(mail("dev@lists.test")))
    out: list[Any] = []
    d.addCallback(out.append)
    assert out == []
    clock.advance(5)
    assert out[0][0].message.body == b"late\n"


def test_failing_plugin_fails_only_its_message() -> None:
    @transform("explode")
    def explode(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
        if b"boom" in msg.body:
            raise RuntimeError("kaboom")
        return msg

    @transform("nonsense")
    def nonsense(msg: MailMessage, options: Mapping[str, Any]) -> int:
        return 42

    text = CONFIG.replace("transforms: [tag]", "transforms: [explode]")
    r = router(text, explode)
    with pytest.raises(TransformFailed) as info:
        run(r.route(mail("dev@lists.test").replace_body(b"boom\n")))
    assert info.value.route == "lists" and info.value.transform == "explode"
    assert "RuntimeError: kaboom" in str(info.value)
    # The next message through the same router is unaffected.
    assert len(run(r.route(mail("dev@lists.test")))) == 1
    text = CONFIG.replace("transforms: [tag]", "transforms: [nonsense]")
    with pytest.raises(TransformFailed, match="returned int"):
        run(router(text, nonsense).route(mail("dev@lists.test")))


def test_check_routes_finds_unknown_transforms_and_kind_mismatch() -> None:
    @transform("to_article", accepts=[Kind.MAIL], produces=Kind.ARTICLE)
    def to_article(msg: MailMessage, options: Mapping[str, Any]) -> Article:
        return Article(headers=msg.headers, body=msg.body)

    config = parse(
        textwrap.dedent(CONFIG.replace("transforms: [tag]", "transforms: [tga]")),
        "routes.yaml",
        Path("/tmp"),
    )
    problems = [str(p) for p in check_routes(config, registry())]
    assert problems == [
        "routes.yaml:19:17: route 'lists': unknown transform 'tga'; did you mean 'tag'? (built in or from a plugin)"
    ]
    config = parse(
        textwrap.dedent(CONFIG.replace("transforms: [tag]", "transforms: [to_article]")),
        "routes.yaml",
        Path("/tmp"),
    )
    problems = [str(p) for p in check_routes(config, registry(to_article))]
    assert problems == []  # a Maildir takes articles too
    text = CONFIG.replace(
        "transforms: [tag]\n    options: {tag: '[{list}]'}\n    to: box",
        "transforms: [to_article]\n    to: relay",
    )
    config = parse(textwrap.dedent(text), "routes.yaml", Path("/tmp"))
    problems = [str(p) for p in check_routes(config, registry(to_article))]
    assert len(problems) == 1
    assert (
        "destination 'relay' (smtp) takes mail messages but this route delivers article"
        in problems[0]
    )
    text = CONFIG.replace("transforms: [tag]", "transforms: [to_article, tag]")
    config = parse(textwrap.dedent(text), "routes.yaml", Path("/tmp"))
    problems = [str(p) for p in check_routes(config, registry(to_article))]
    assert problems == [
        "routes.yaml:19:17: route 'lists': transform 'tag' takes mail messages but gets article"
    ]


def test_trace_for_dry_run() -> None:
    trace = Trace()
    run(router().route(mail("dev@lists.test"), trace))
    assert trace.steps == [
        "route 'lists' matches for dev@lists.test; named groups {'list': 'dev'}",
        "  transform 'tag' -> 1 message(s)",
    ]


def test_plugins_load_from_folder(tmp_path: Path) -> None:
    (tmp_path / "shout.py").write_text(
        "from gateway.plugins import transform\n"
        "@transform('shout')\n"
        "def shout(msg, options):\n"
        "    return msg.replace_body(msg.body.upper())\n"
    )
    (tmp_path / "_private.py").write_text("raise RuntimeError('never loaded')\n")
    t = load_transforms([tmp_path], entry_points=False)
    assert "shout" in t and "headers" in t


def test_plugin_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import nosuchmodule_xyz\n")
    with pytest.raises(PluginError, match=r"broken.py failed to load: ModuleNotFoundError"):
        load_transforms([tmp_path], entry_points=False)
    with pytest.raises(PluginError, match="does not exist"):
        load_transforms([tmp_path / "missing"], entry_points=False)
    (tmp_path / "broken.py").write_text(
        "from gateway.plugins import transform\n@transform('headers')\ndef h(m, o):\n    return m\n"
    )
    with pytest.raises(PluginError, match="transform 'headers' is defined twice"):
        load_transforms([tmp_path], entry_points=False)


def test_a_transform_defined_in_two_plugin_files_names_both_files(tmp_path: Path) -> None:
    text = (
        "from gateway.plugins import transform\n\n@transform('tag')\ndef t(m, o):\n    return m\n"
    )
    (tmp_path / "first.py").write_text(text)
    (tmp_path / "second.py").write_text(text)
    with pytest.raises(PluginError) as caught:
        load_transforms([tmp_path], entry_points=False)
    assert str(caught.value) == (
        f"transform 'tag' is defined twice: in {tmp_path / 'first.py'}:3 (t)"
        f" and in {tmp_path / 'second.py'}:3 (t)"
    )


def test_example_plugin_tags_once() -> None:
    root = Path(__file__).resolve().parents[2]
    t = load_transforms([root / "plugins"], entry_points=False)
    spec = t.get("tag_subject")
    assert spec is not None
    msg = mail("x@example.test")
    once = spec.func(msg, {"tag": "[team]"})
    assert once.headers.get("Subject") == "[team] hello"
    assert spec.func(once, {"tag": "[team]"}).headers.get("Subject") == "[team] hello"
    with pytest.raises(ValueError, match="needs a 'tag' option"):
        spec.func(msg, {})


def test_builtin_headers_transform() -> None:
    spec = load_transforms(entry_points=False).get("headers")
    assert spec is not None
    msg = mail("x@example.test", headers="X-Spam: yes")
    out = spec.func(msg, {"remove_headers": ["x-spam"], "add_headers": {"X-Gateway": "1"}})
    assert "X-Spam" not in out.headers and out.headers.get("X-Gateway") == "1"


def test_headers_round_trip_raw_bytes() -> None:
    raw = b"Subject: =?utf-8?q?caf=C3=A9?=\n  folded\nX-8bit: \xc3\xa9t\xc3\xa9\nFrom: a@b\n\nbody\n.\n"
    msg = MailMessage.from_bytes(raw, sender="", recipients=["x@y"])
    assert msg.to_bytes() == raw
    assert msg.headers.get("subject") == "=?utf-8?q?caf=C3=A9?=  folded"
    assert isinstance(msg.headers, Headers) and len(msg.headers) == 3


def test_non_header_line_starts_the_body() -> None:
    msg = MailMessage.from_bytes(
        b"Subject: x\nthis is not a header\nmore\n", sender="", recipients=["x@y"]
    )
    assert len(msg.headers) == 1
    assert msg.body == b"this is not a header\nmore\n"


def test_plugins_load_from_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import sys

    (tmp_path / "ep_plugin_mod.py").write_text(
        "from gateway.plugins import transform\n"
        "@transform('from_entry_point')\n"
        "def fep(msg, options):\n"
        "    return msg\n"
        "@transform('single_function')\n"
        "def single(msg, options):\n"
        "    return msg\n"
        "not_a_transform = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint("mod", "ep_plugin_mod", "gateway.plugins"),
            importlib.metadata.EntryPoint("fn", "ep_plugin_mod:single", "gateway.plugins"),
        ]
    )
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: points.select(group=group)
    )
    t = load_transforms()
    assert "from_entry_point" in t and "single_function" in t
    bad = importlib.metadata.EntryPoints(
        [importlib.metadata.EntryPoint("bad", "ep_plugin_mod:not_a_transform", "gateway.plugins")]
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: bad.select(group=group))
    with pytest.raises(PluginError, match="neither a module nor a function marked with @transform"):
        load_transforms()
    sys.modules.pop("ep_plugin_mod", None)


def test_check_routes_points_mail_to_http_at_the_webhook_destination() -> None:
    text = CONFIG.replace("transforms: [tag]", "transforms: [mail_to_http]")
    config = parse(textwrap.dedent(text), "routes.yaml", Path("/tmp"))
    problems = [str(p) for p in check_routes(config, registry())]
    assert len(problems) == 1
    assert "unknown transform 'mail_to_http'" in problems[0]
    assert "'protocol: webhook'" in problems[0]
