"""``gateway route --dry-run`` for every kind: mail (per recipient), articles, DNS, HTTP."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.config import parse
from gateway.dry_run import dry_run
from gateway.plugins import load_transforms
from tests.support.deferreds import run

REPO = Path(__file__).resolve().parents[2]

CONFIG = textwrap.dedent(
    r"""
    version: 1
    listeners:
      mail-in: {protocol: smtp, listen: 'tcp:2525'}
      news-in: {protocol: nntp, listen: 'tcp:1119'}
      dns-in: {protocol: dns, listen: 'udp:5353', allow: [127.0.0.0/8, 10.0.0.0/8]}
      web-in: {protocol: http, listen: 'tcp:8080'}
    destinations:
      box: {protocol: maildir, path: mail}
      up: {protocol: dns, servers: ['127.0.0.1:5301']}
      app: {protocol: http, url: 'http://127.0.0.1:8081'}
    routes:
      - {name: local, from: mail-in, match: {rcpt: '@example\.test$'}, to: box}
      - {name: news, from: news-in, match: {header: {Newsgroups: '^local\.'}}, to: box,
         transforms: [news_to_mail], options: {to: n@example.test}}
      - {name: blocked, from: dns-in, match: {qname: '*.ads.test'}, action: nxdomain}
      - {name: printer, from: dns-in, match: {qname: printer.test},
         answer: ['printer.test. 300 IN A 192.0.2.50']}
      - {name: lab, from: dns-in, match: {client: [10.0.0.0/8]}, to: up}
      - {name: hooks, from: web-in, match: {method: [POST], path: '^/hooks/(?P<name>\w+)$'},
         transforms: [http_to_mail], options: {to: h@example.test, from: w@example.test},
         to: box}
      - {name: site, from: web-in, match: {prefix: /app/}, to: app}
    """
)


def route(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    config = parse(CONFIG)
    transforms = load_transforms(entry_points=False)
    args = build_parser().parse_args(["route", "--dry-run", *argv])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    code = run(dry_run(config, transforms, args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mail_recipients_are_judged_one_by_one(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = route(
        monkeypatch, capsys, "--to", "a@example.test", "--to", "x@elsewhere.test",
        "--to", "b@example.test", stdin="Subject: s\n\nbody\n",
    )  # fmt: skip
    assert code == 1  # one recipient would be refused
    assert (
        "<x@elsewhere.test>: refused at RCPT: 550 5.1.1 <x@elsewhere.test>: Recipient address rejected: no route for it here"
        in out
    )
    assert "=== route 'local' -> box" in out
    assert "envelope: from <> to <a@example.test>, <b@example.test>" in out


def test_an_article_is_routed_and_transformed(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    article = "From: a@b.test\nNewsgroups: local.test\nSubject: s\nMessage-ID: <1@b.test>\n\nx\n"
    code, out, _ = route(monkeypatch, capsys, "--article", stdin=article)
    assert code == 0, out
    assert "=== route 'news' -> box" in out and "To: n@example.test" in out


@pytest.mark.parametrize(
    ("argv", "code", "line"),
    [
        (["--query", "x.ads.test"], 0, "x.ads.test. A from 127.0.0.1: route 'blocked' answers NXDOMAIN"),
        (["--query", "printer.test", "a"], 0, "route 'printer' answers from its own records:\n  printer.test. 300 IN A 192.0.2.50"),
        (["--query", "printer.test", "MX"], 0, "none of its records is printer.test. MX"),
        (["--query", "www.test", "--client", "10.1.1.1"], 0, "route 'lab' forwards it to up"),
        (["--query", "www.test"], 1, "www.test. A from 127.0.0.1: no route takes it; answered REFUSED"),
        (["--query", "www.test", "--client", "192.0.2.9"], 1, "not in the listener's 'allow' list"),
    ],
)  # fmt: skip
def test_a_dns_query_shows_the_route_the_listener_picks(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    line: str,
) -> None:
    got, out, err = route(monkeypatch, capsys, *argv)
    assert (got, err) == (code, "") and line in out, out


def test_an_http_request_is_proxied_or_becomes_a_message(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = route(monkeypatch, capsys, "--path", "/app/page", "--host", "www.test")
    assert (
        code == 0
        and "GET /app/page (Host: www.test) from 127.0.0.1: route 'site' proxies it to app" in out
    )
    body = tmp_path / "body.json"
    body.write_text('{"title": "disk full"}')
    code, out, _ = route(
        monkeypatch, capsys, "--method", "post", "--path", "/hooks/alert",
        "--header", "Content-Type: application/json", "--body", str(body),
    )  # fmt: skip
    assert code == 0, out
    assert "route 'hooks' (named groups: {'name': 'alert'}) takes it as a message" in out
    assert "=== route 'hooks' -> box" in out and "disk full" in out
    code, out, _ = route(monkeypatch, capsys, "--path", "/other")
    assert code == 1 and "no route takes it; answered 404" in out


def test_a_listener_of_another_kind_is_named_as_such(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = route(monkeypatch, capsys, "--listener", "mail-in", "--query", "x.test")
    assert code == 1
    assert err == (
        "error: listener 'mail-in' (smtp) takes mail, not DNS queries;"
        " the listeners that do: dns-in\n"
    )
    code, _, err = route(monkeypatch, capsys)
    assert code == 2 and "say what to route: --to ADDRESS (mail)" in err
