"""Transforms declare their route options; a route that gets them wrong is refused before start."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse
from gateway.plugins import Option, PluginError, Transforms, load_transforms, transform
from gateway.routing import check_routes
from gateway.service import load_checked

HOOK = """\
version: 1
listeners:
  web: {protocol: http, listen: "tcp:8080:interface=127.0.0.1"}
destinations:
  box: {protocol: maildir, path: box}
routes:
  - name: hooks
    from: web
    match: {path: '^/hooks/(?P<team>[a-z]+)$'}
    transforms: [http_to_mail]
    options:
OPTIONS
    to: box
"""


def problems(options: str, transforms: Transforms | None = None) -> list[str]:
    text = HOOK.replace("OPTIONS", textwrap.indent(textwrap.dedent(options).strip(), "      "))
    config = parse(text, "routes.yaml", Path("/tmp"))
    return [str(p) for p in check_routes(config, transforms or load_transforms())]


def test_a_web_hook_route_without_from_is_refused_at_its_line() -> None:
    """Defect: http_to_mail without 'from' passed `gateway check`; every web hook then got a
    503 and a critical traceback in the log."""
    found = problems("to: ops@example.test")
    assert found == [
        "routes.yaml:12:7: route 'hooks': transform 'http_to_mail' needs the option 'from'"
        " (the From: field, e.g. 'Bot <bot@example.test>')"
    ]


def test_a_misspelt_option_is_named_with_the_nearest_one() -> None:
    found = problems(
        """
        from: bot@example.test
        to: ops@example.test
        subjct: deployed
        """
    )
    [problem] = found
    assert problem.startswith(
        "routes.yaml:14:7: route 'hooks': unknown option 'subjct'; did you mean 'subject'?"
    )
    assert "'http_to_mail' takes body, body_field, from," in problem


def test_an_option_of_the_wrong_type_is_refused_at_its_value() -> None:
    found = problems(
        """
        from: [bot@example.test, other@example.test]
        to: ops@example.test
        """
    )
    assert found == [
        "routes.yaml:12:13: route 'hooks': option 'from' of transform 'http_to_mail':"
        " expected text, got a list"
    ]


def test_placeholders_and_lists_where_a_list_is_allowed_pass() -> None:
    assert (
        problems(
            """
        from: 'Bot <bot@example.test>'
        to: ['{team}@example.test', ops@example.test]
        subject: 'Deployed {{repository.name}}'
        """
        )
        == []
    )


def test_a_placeholder_stands_for_any_type() -> None:
    @transform("needs_flag", options=[Option("flag", bool), Option("count", int)])
    def needs_flag(msg: Any, options: Any) -> Any:
        return msg

    t = Transforms([needs_flag.__gateway_transform__])  # type: ignore[attr-defined]
    text = (
        "version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:2525'}\n"
        "destinations:\n  box: {protocol: maildir, path: box}\nroutes:\n"
        "  - from: in\n    match: {rcpt: '^(?P<n>[0-9]+)@'}\n    transforms: [needs_flag]\n"
        "    options: {flag: yes, count: '{n}'}\n    to: box\n"
    )
    assert check_routes(parse(text, "routes.yaml", Path("/tmp")), t) == []
    bad = parse(text.replace("count: '{n}'", "count: many"), "routes.yaml", Path("/tmp"))
    [problem] = [str(p) for p in check_routes(bad, t)]
    assert "option 'count' of transform 'needs_flag': expected a whole number, got 'many'" in (
        problem
    )


def test_a_transform_that_declares_no_options_lets_any_through() -> None:
    @transform("undeclared")
    def undeclared(msg: Any, options: Any) -> Any:
        return msg

    t = load_transforms()
    t.add(undeclared.__gateway_transform__)  # type: ignore[attr-defined]
    text = HOOK.replace("[http_to_mail]", "[http_to_mail, undeclared]").replace(
        "OPTIONS", "      from: a@example.test\n      to: b@example.test\n      anything: 1"
    )
    config = parse(text, "routes.yaml", Path("/tmp"))
    assert check_routes(config, t) == []


def test_options_on_a_route_without_transforms_are_a_mistake() -> None:
    text = HOOK.replace("[http_to_mail]", "[]").replace("OPTIONS", "      from: a@example.test")
    config = parse(text.replace("web: {protocol: http", "web: {protocol: http"), base=Path("/x"))
    found = [str(p) for p in check_routes(config, load_transforms())]
    assert any("'options' are for the route's transforms, and it has none" in p for p in found)


def test_declaring_an_option_twice_or_of_an_unknown_type_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="declares an option twice"):
        transform("twice", options=[Option("a"), Option("a")])
    with pytest.raises(TypeError, match="cannot be of type"):
        transform("odd", options=[Option("a", set)])


def test_gateway_check_and_run_use_the_same_check(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(HOOK.replace("OPTIONS", "      to: ops@example.test"))
    with pytest.raises(ConfigError, match="needs the option 'from'"):
        load_checked(path)
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1 and "needs the option 'from'" in run.stderr


def test_the_schema_lists_every_transforms_options() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"], capture_output=True, text=True, check=True
    )
    schema = json.loads(run.stdout)
    route = schema["properties"]["routes"]["anyOf"][0]
    options = route["properties"]["options"]["properties"]
    assert options["newsgroups"]["anyOf"] == [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
    ]
    assert options["inject"] == {
        "type": "boolean",
        "description": "mail_to_news: true when the article goes straight into a news feed",
    }
    assert "http_to_mail" in options["body_field"]["description"]
