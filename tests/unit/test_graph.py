"""``gateway graph``: DOT (drawn by Debian's Graphviz), Mermaid, and the marks for unused
listeners and destinations and for routes that can never match."""

from __future__ import annotations

import html
import shutil
import subprocess
import textwrap

import pytest

from gateway.config import parse
from gateway.graph import dot, mermaid, shadowed_routes

CONFIG = textwrap.dedent(
    r"""
    version: 1
    listeners:
      mail-in: {protocol: smtp, listen: 'tcp:2525'}
      spare: {protocol: smtp, listen: 'tcp:2526'}
      dns-in: {protocol: dns, listen: 'udp:5353'}
    destinations:
      box: {protocol: maildir, path: mail}
      idle: {protocol: maildir, path: idle}
      up: {protocol: dns, servers: ['127.0.0.1:5301']}
    routes:
      - {name: "tagged \"x\"", from: mail-in, match: {rcpt: '^(?P<u>\w+)@x\.test$'},
         transforms: [tag_subject], options: {tag: '[{u}]'}, to: box}
      - {name: all-mail, from: mail-in, to: box}
      - {name: never, from: mail-in, match: {rcpt: '@y\.test$'}, to: box}
      - {name: lab, from: dns-in, match: {client: [10.0.0.0/8]}, to: up}
      - {name: rest, from: dns-in, to: up}
    """
)


def test_a_route_after_a_catch_all_of_the_same_listeners_never_matches() -> None:
    config = parse(CONFIG)
    [shadow] = shadowed_routes(config.routes)
    assert (shadow.route.name, shadow.by.name) == ("never", "all-mail")
    warnings = [str(w) for w in config.warnings]
    assert any(
        "route 'never' never matches: route 'all-mail' before it takes everything" in w
        for w in warnings
    ), warnings


def test_dot_marks_unused_and_unreachable_and_graphviz_draws_it() -> None:
    text = dot(parse(CONFIG))
    assert (
        '"l:spare" [shape=box, label="spare (smtp)\\n(no route takes from it)", style=dashed'
        in text
    )
    assert (
        '"d:idle" [shape=box, label="idle (maildir)\\n(no route sends to it)", style=dashed' in text
    )
    assert '(never matches: route \'all-mail\' takes everything first)", color="#cc0000"' in text
    assert (
        'label="tagged \\"x\\"\\nmatch rcpt: ^(?P<u>\\\\w+)@x\\\\.test$\\ntransforms: tag_subject"'
        in text
    )
    assert '"l:mail-in" -> "r:0";' in text and '"r:0" -> "d:box";' in text
    assert "match client: [10.0.0.0/8]" in text
    dot_program = shutil.which("dot")
    if dot_program is None:
        pytest.fail("Graphviz's dot is missing: bash tests/install-peers.sh installs graphviz")
    drawn = subprocess.run(
        [dot_program, "-Tsvg"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.lstrip().startswith("<?xml") and "<svg" in drawn.stdout
    drawn_text = html.unescape(drawn.stdout)  # Graphviz writes "-" as &#45;
    for name in ("mail-in (smtp)", "all-mail", "never", "idle (maildir)"):
        assert name in drawn_text


def test_mermaid_escapes_labels_and_classes_the_marks() -> None:
    text = mermaid(parse(CONFIG))
    assert text.startswith("flowchart LR\n")
    assert '  r0(["tagged #quot;x#quot;<br>match rcpt: ^(?P#lt;u#gt;\\w+)@x\\.test$' in text
    assert "  l_mail_in --> r0" in text and "  r0 --> d_box" in text
    assert "  class l_spare unused" in text and "  class d_idle unused" in text
    assert "  class r2 never" in text


def test_svg_without_graphviz_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import graph

    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    with pytest.raises(graph.GraphvizMissing, match=r"install it \(apt-get install graphviz\)"):
        graph.svg(parse(CONFIG))


def test_a_route_whose_conditions_an_earlier_one_has_already_never_matches() -> None:
    config = parse(
        textwrap.dedent(
            r"""
            version: 1
            listeners:
              a: {protocol: smtp, listen: 'tcp:2525'}
              b: {protocol: smtp, listen: 'tcp:2526'}
            destinations:
              box: {protocol: maildir, path: mail}
            routes:
              - {name: x-test, from: [a, b], match: {rcpt: '@x\.test$'}, to: box}
              - {name: narrower, from: a, match: {rcpt: '@x\.test$', sender: '^ann@'}, to: box}
              - {name: other-sender, from: a, match: {rcpt: '@y\.test$', sender: '^ann@'},
                 to: box}
              - {name: copies, from: b, match: {sender: '^bob@'}, continue: true, to: box}
              - {name: after-copies, from: b, match: {sender: '^bob@', rcpt: '@z\.test$'},
                 to: box}
              - {name: only-partly, from: [a, b], match: {rcpt: '@y\.test$'}, to: box}
              - {name: both-taken, from: [a, b], match: {rcpt: '@x\.test$', header: {To: x}},
                 to: box}
              - {name: urgent, from: a, match: {header: {Subject: urgent}}, to: box}
              - {name: urgent-x, from: a, match: {header: {subject: urgent, X-Y: z}}, to: box}
            """
        )
    )
    shadows = [(s.route.name, s.by.name) for s in shadowed_routes(config.routes)]
    # 'after-copies' follows a route with continue; 'only-partly' is not taken on b.
    assert shadows == [("narrower", "x-test"), ("both-taken", "x-test"), ("urgent-x", "urgent")]
    warnings = [str(w) for w in config.warnings]
    assert any(
        "route 'narrower' never matches: route 'x-test' before it takes everything it would"
        " from the same listeners (the same conditions or fewer, no continue)" in w
        for w in warnings
    ), warnings
