"""routes.yaml parsing: typed values, and errors that point at the line and suggest names."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, Duration, Network, Size, interpolate, json_schema, parse
from gateway.protocols.smtp.config import SmtpDestinationConfig, SmtpListenerConfig
from gateway.routing import MailMatch

GOOD = textwrap.dedent(
    r"""
    version: 1
    plugins: [plugins]
    listeners:
      mail-in:
        protocol: smtp
        listen: tcp:2525:interface=127.0.0.1
        max_size: 2MiB
        idle_timeout: 5m
        allow: [127.0.0.0/8, "::1"]
    destinations:
      box:
        protocol: maildir
        path: var/mail
      relay:
        protocol: smtp
        connect: tcp:127.0.0.1:2526
        timeout: 90s
    routes:
      - name: lists
        from: mail-in
        match: {rcpt: '^(?P<list>[a-z]+)@lists\.test$', header: {X-Priority: '^1'}}
        options: {tag: '[{list}]'}
        to: box
      - from: [mail-in]
        match: {sender: '@example\.test$'}
        continue: true
        to: [box, relay]
    """
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), "routes.yaml", Path("/etc/gateway"))
    return [str(p) for p in info.value.problems]


def test_good_file_becomes_typed_frozen_values() -> None:
    config = parse(GOOD, "routes.yaml", Path("/srv"))
    listener = config.listeners["mail-in"]
    assert isinstance(listener, SmtpListenerConfig)
    assert listener.max_size == 2 * 1024 * 1024
    assert listener.idle_timeout == 300.0
    assert "127.1.2.3" in listener.allow[0]
    assert "::1" in listener.allow[1]
    assert listener.listen == ("tcp:2525:interface=127.0.0.1",)
    relay = config.destinations["relay"]
    assert isinstance(relay, SmtpDestinationConfig)
    assert relay.timeout == 90.0
    assert config.destinations["box"].path == "/srv/var/mail"  # type: ignore[attr-defined]
    assert config.plugins == ("/srv/plugins",)
    first, second = config.routes
    assert first.name == "lists" and first.to == ("box",)
    rcpt = first.match.view(MailMatch).rcpt
    assert rcpt is not None and rcpt.groups == {"list"}
    assert second.name == "#2" and second.continue_ and second.to == ("box", "relay")
    with pytest.raises(AttributeError):
        first.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        first.options["tag"] = "y"  # type: ignore[index]


def test_misspelt_destination_points_at_line_and_suggests() -> None:
    found = problems(
        """
        version: 1
        listeners:
          in: {protocol: smtp, listen: "tcp:2525"}
        destinations:
          news: {protocol: maildir, path: x}
        routes:
          - from: in
            to: nwes
        """
    )
    assert found == ["routes.yaml:9:9: route 1: unknown destination 'nwes'; did you mean 'news'?"]


def test_unknown_keys_are_errors_with_suggestions() -> None:
    found = problems(
        """
        version: 1
        listeners:
          in: {protocol: smtp, listen: "tcp:2525", max_sise: 1k}
        routes: []
        colour: blue
        """
    )
    assert (
        "routes.yaml:4:44: listener 'in': unknown key 'max_sise'; did you mean 'max_size'?" in found
    )
    assert any(p.startswith("routes.yaml:6:1: top level: unknown key 'colour'") for p in found)


def test_bad_values_name_what_was_expected() -> None:
    found = problems(
        """
        version: 2
        listeners:
          in: {protocol: smtp, listen: "tcp:nope", max_size: 10 parsecs, idle_timeout: 5 fortnights}
          out: {protocol: smtpp, listen: "tcp:1"}
        destinations:
          d: {protocol: smtp, connect: "tcp:127.0.0.1:25", tls: maybe}
        routes:
          - {from: in, to: d, match: {rcpt: '(unclosed'}}
        """
    )
    text = "\n".join(found)
    assert "routes.yaml:2:10: top level: 'version': expected one of 1, got 2" in text
    assert "endpoint 'tcp:nope': the port must be a number" in text
    assert "expected a size such as" in text
    assert "unknown unit 'fortnights'" in text
    assert "unknown protocol 'smtpp' (known: " in text
    assert "did you mean 'smtp'?" in text
    assert "expected one of 'none', 'may', 'require', got 'maybe'; did you mean 'may'?" in text
    assert "invalid regular expression '(unclosed'" in text


def test_placeholder_must_be_a_named_group() -> None:
    found = problems(
        r"""
        version: 1
        listeners: {in: {protocol: smtp, listen: "tcp:2525"}}
        destinations: {d: {protocol: maildir, path: x}}
        routes:
          - from: in
            match: {rcpt: '^(?P<user>.+)@x$'}
            options: {tag: '{usr}'}
            to: d
        """
    )
    assert len(found) == 1
    assert "option placeholder '{usr}'" in found[0] and "did you mean 'user'?" in found[0]


def test_match_keys_must_fit_the_listener_kind() -> None:
    found = problems(
        """
        version: 1
        listeners: {in: {protocol: smtp, listen: "tcp:2525"}}
        destinations: {d: {protocol: maildir, path: x}}
        routes:
          - {from: in, to: d, match: {qname: example.test}}
        """
    )
    assert found == [
        "routes.yaml:6:30: route 1: match key(s) qname do not apply to mail messages"
        " (use client, header, rcpt, sender)"
    ]


def test_broken_listener_does_not_cascade_into_unknown_reference() -> None:
    found = problems(
        """
        version: 1
        listeners: {in: {protocol: smtp, listen: "tcp:2525", max_size: lots}}
        destinations: {d: {protocol: maildir, path: x}}
        routes:
          - {from: in, to: d}
        """
    )
    assert len(found) == 1 and "max_size" in found[0]


def test_yaml_syntax_error_has_location() -> None:
    found = problems("version: 1\nlisteners: {in: [\n")
    assert found[0].startswith("routes.yaml:3:1: not valid YAML")


def test_duplicate_keys_are_errors() -> None:
    found = problems(
        """
        version: 1
        destinations:
          d: {protocol: maildir, path: x}
          d: {protocol: maildir, path: y}
        """
    )
    assert found == ["routes.yaml:5:3: destinations: 'd' appears twice"]


def test_empty_file() -> None:
    assert problems("") == ["routes.yaml:1:1: the file is empty; expected 'version: 1'"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("1k", 1024), ("10KiB", 10240), ("10MB", 10_000_000), ("1.5GiB", 1610612736)],
)
def test_sizes(text: str, value: int) -> None:
    assert Size.parse(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("2s", 2.0), ("250ms", 0.25), ("5m", 300.0), ("1h30m", 5400.0), ("5d", 432000.0), ("7", 7.0)],
)
def test_durations(text: str, value: float) -> None:
    assert Duration.parse(text) == value


@given(st.text(max_size=20))
def test_size_and_duration_parsers_only_raise_value_error(text: str) -> None:
    for parser in (Size.parse, Duration.parse, Network.parse):
        try:
            parser(text)
        except ValueError:
            pass


def test_interpolate_fills_groups_recursively() -> None:
    options = {"a": "{x}-{y}", "b": ["{x}"], "c": 3, "d": "{missing}", "e": "{bad"}
    out = interpolate(options, {"x": "1", "y": "2"})
    assert out["a"] == "1-2" and out["b"] == ("1",) and out["c"] == 3
    assert out["d"] == "" and out["e"] == "{bad"


def test_json_schema_describes_the_file() -> None:
    schema = json_schema()
    json.dumps(schema)
    assert schema["required"] == ["version"]
    assert schema["additionalProperties"] is False
    listener = schema["properties"]["listeners"]["additionalProperties"]["oneOf"][0]
    assert listener["properties"]["protocol"] == {"enum": ["smtp"]}
    assert "max_size" in listener["properties"]
    route = schema["properties"]["routes"]["anyOf"][1]["items"]
    assert {"from", "to", "continue", "match"} <= set(route["properties"])


def test_route_needs_a_destination_and_a_listener() -> None:
    found = problems(
        """
        version: 1
        listeners: {in: {protocol: smtp, listen: "tcp:2525"}}
        routes:
          - {from: [], to: []}
        """
    )
    assert sorted(found) == [
        "routes.yaml:5:12: route 1: 'from' names no listener",
        "routes.yaml:5:20: route 1: 'to' names no destination",
    ]


# --- checks across the whole file --------------------------------------------------------

CLASH = """\
version: 1
admin: ADMIN
listeners:
  first: {protocol: smtp, listen: 'FIRST'}
  second:
    protocol: smtp
    listen: SECOND
destinations:
  box: {protocol: maildir, path: box}
routes:
  - {from: [first, second], to: box}
"""


def clash(first: str, second: str, admin: str = "tcp:9100:interface=127.0.0.1") -> list[str]:
    text = CLASH.replace("FIRST", first).replace("SECOND", second).replace("ADMIN", admin)
    try:
        parse(text, "routes.yaml", Path("/etc/gateway"))
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525"),  # the wildcard takes every address
        ("tcp:2525", "tcp:2525:interface=127.0.0.2"),
        ("tcp:2525:interface=127.0.0.1", "tcp6:2525"),  # [::] takes IPv4 too
        ("tcp6:2525:interface=\\:\\:1", "tcp6:2525"),
        ("unix:/run/gw.sock", "unix:/run/gw.sock"),
    ],
)
def test_two_listeners_on_one_socket_are_refused_at_the_second(first: str, second: str) -> None:
    found = clash(first, second)
    assert len(found) == 1, found
    assert found[0].startswith(f"routes.yaml:7:13: listener 'second' ({second}) and listener")
    assert "listener 'first' at routes.yaml:4:35" in found[0]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp:2525:interface=127.0.0.1", "tcp:2526:interface=127.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.2"),
        ("tcp:2525:interface=127.0.0.1", "udp:2525:interface=127.0.0.1"),
        ("tcp:2525:interface=\\:\\:1", "tcp:2525"),  # 0.0.0.0 is IPv4 only
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),  # any free port
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listeners_on_different_sockets_pass(first: str, second: str) -> None:
    assert clash(first, second) == []


def test_a_listener_on_the_admin_sites_port_is_refused() -> None:
    found = clash("tcp:2525", "tcp:9100", admin="tcp:9100:interface=127.0.0.1")
    assert found == [
        "routes.yaml:7:13: listener 'second' (tcp:9100) and the admin site at routes.yaml:2:8"
        " (tcp:9100:interface=127.0.0.1) would listen on the same address and port; give one"
        " of them another port"
    ]


def test_a_route_name_used_twice_is_reported_at_the_second() -> None:
    found = problems(
        """\
        version: 1
        listeners:
          in: {protocol: smtp, listen: "tcp:2525"}
        destinations:
          box: {protocol: maildir, path: box}
        routes:
          - {name: same, from: in, to: box}
          - {name: other, from: in, to: box}
          - {name: same, from: in, to: box}
        """
    )
    assert found == ["routes.yaml:9:12: route name 'same' is used twice (first at routes.yaml:7:5)"]


def test_a_listener_or_destination_name_used_twice_is_reported_at_the_second() -> None:
    found = problems(
        """\
        version: 1
        listeners:
          in: {protocol: smtp, listen: "tcp:2525"}
          in: {protocol: smtp, listen: "tcp:2526"}
        destinations:
          box: {protocol: maildir, path: box}
          box: {protocol: maildir, path: box2}
        routes:
          - {from: in, to: box}
        """
    )
    assert found == [
        "routes.yaml:4:3: listeners: 'in' appears twice",
        "routes.yaml:7:3: destinations: 'box' appears twice",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Found by fuzzing: an unknown tag raised PyYAML's ConstructorError (a traceback).
        ("  s: {protocol: smtp, listen: 'tcp:1', !foo hostname: x}", "unknown YAML tag '!foo'"),
        ("  s: {protocol: smtp, listen: 'tcp:1', hostname: !foo x}", "unknown YAML tag '!foo'"),
        ("  s: {protocol: smtp, listen: 'tcp:1', max_recipients: !!int abc}", "cannot read 'abc'"),
        ("  s: &a {protocol: smtp, listen: 'tcp:1', x: *a}", "refers to the value it is part of"),
    ],
)
def test_yaml_tags_and_alias_cycles_are_errors_not_tracebacks(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(f"version: 1\nlisteners:\n{text}\ndestinations: {{}}\nroutes: []\n")


def test_an_alias_bomb_is_refused_at_once() -> None:
    """Defect (found while fuzzing): aliases that expand exponentially inside options: made
    gateway check (and a reload) run for ever."""
    lines = ["version: 1", "listeners: {s: {protocol: smtp, listen: 'tcp:1'}}",
             "destinations: {b: {protocol: maildir, path: b}}", "routes:",
             "  - from: s", "    to: b", "    options:", "      l0: &l0 [x, x, x, x, x, x, x, x]"]  # fmt: skip
    for level in range(1, 9):
        lines.append(f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 8)}]")
    with pytest.raises(ConfigError, match="expand to more than 200,000 values"):
        parse("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("listener", "destination", "message"),
    [
        ("listen: 'tcp:70000'", "", "port 70000 is not a port number (0 to 65535)"),
        ("listen: 'tcp:25:interfce=127.0.0.1'", "", "unknown option 'interfce'; did you mean 'interface'?"),
        ("listen: 'tcp:abc'", "", "endpoint 'tcp:abc': the port must be a number"),
        ("listen: 'tcp:25', max_size: -1", "", "'max_size': expected 0 or more, got -1"),
        ("listen: 'tcp:25', idle_timeout: 0s", "", "'idle_timeout' must be more than 0, not 0s"),
        ("listen: 'tcp:25'", "connect: 'tcp:127.0.0.1'", "endpoint 'tcp:127.0.0.1': the port is missing"),
        ("listen: 'tcp:25'", "connect: 'tcp:127.0.0.1:0'", "port 0 is not a port number (1 to 65535)"),
        ("listen: 'tcp:25'", "connect: 'tcp:127.0.0.1:25', concurrency: 0", "'concurrency' must be more than 0"),
        ("listen: 'tcp:25'", "connect: 'tcp:127.0.0.1:25', timeout: 0s", "'timeout' must be more than 0"),
        ("listen: 'tcp:25'", "connect: 'tcp:127.0.0.1:25', retry_min: 2h, retry_max: 1h",
         "'retry_min' (7200s) is longer than 'retry_max' (3600s)"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_and_endpoint_mistakes_are_named(
    listener: str, destination: str, message: str
) -> None:
    """Defects (operators' issue): each of these passed gateway check and then failed at start
    or did nothing useful (a timeout of 0, a port over 65535, Twisted's own wording)."""
    text = (
        f"version: 1\nlisteners:\n  s: {{protocol: smtp, {listener}}}\n"
        + (f"destinations:\n  d: {{protocol: smtp, {destination}}}\n" if destination else "")
        + "routes: []\n"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(text)


@pytest.mark.parametrize(
    ("listener", "destination", "message"),
    [
        ("listen: tcp:25:interface=::1", "",
         r"write 'tcp:25:interface=\:\:1' (in single quotes in YAML)"),
        ("listen: 'tcp:25:interface=192.0.2.1'", "",
         "192.0.2.1 is not an address of this machine"),
        ("listen: 'udp:53:interface=192.0.2.1'", "",
         "192.0.2.1 is not an address of this machine"),
        ("listen: 'tcp:25'", "connect: 'tcp::25'", "endpoint 'tcp::25': the host is missing"),
        ("listen: 'tcp:25'", "connect: 'tcp:host=::1:port=25'",
         r"write 'tcp:host=\:\:1:port=25'"),
        ("listen: 'tcp:25', hostname: yes", "",
         "'hostname': YAML reads yes as true, not as text; put it in quotes: 'yes'"),
    ],
)  # fmt: skip
def test_endpoint_and_value_traps_are_explained(
    listener: str, destination: str, message: str
) -> None:
    text = (
        f"version: 1\nlisteners:\n  s: {{protocol: smtp, {listener}}}\n"
        + (f"destinations:\n  d: {{protocol: smtp, {destination}}}\n" if destination else "")
        + "routes: []\n"
    )
    if "udp:" in listener:
        text = text.replace("protocol: smtp, listen", "protocol: dns, listen")
    with pytest.raises(ConfigError) as caught:
        parse(text)
    [found] = [str(p) for p in caught.value.problems]
    line = 5 if destination else 3
    assert found.startswith(f"routes.yaml:{line}:") and message in found, found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # An unclosed quote: at the line that opens it, not at the end of the file.
        ('version: 1\nlisteners:\n  in: {protocol: smtp, listen: "tcp:25}\nroutes: []\n',
         'routes.yaml:3:32: not valid YAML: the " opened here is never closed'),
        ("version: 1\nlisteners:\n  in:\n    protocol: smtp\n    listen 'tcp:25'\nroutes: []\n",
         "routes.yaml:5:5: not valid YAML: this line has no ':' after its key"),
        ("version: 1\nlisteners: {in: {protocol: smtp, listen: 'tcp:25'}\nroutes: []\n",
         "routes.yaml:2:12: not valid YAML: the '{' opened here is not closed with '}'"),
        ("version: 1\nlisteners:\n  in:\n    protocol: smtp\n   listen: 'tcp:25'\n",
         "routes.yaml:5:4: not valid YAML: this line's indentation does not match"),
        ("version: 1\nlisteners:\n\tin: {}\n",
         "routes.yaml:3:1: not valid YAML: a tab; YAML indents with spaces only"),
        ("version: 1\ndestinations:\n  d: {protocol: dns, connect: ::1}\n",
         "routes.yaml:3:31: not valid YAML: did not find expected node content;"),
        ("version: 1\nadmin: tcp:9100: a\n",
         "routes.yaml:2:16: not valid YAML: a ': ' inside a value; put the value in quotes"),
        ('version: "1"\n',
         "routes.yaml:1:10: top level: 'version': expected the number 1, got the text '1';"
         " write it without quotes"),
        ("version: 1\nversion: 1\n", "routes.yaml:2:1: top level: 'version' appears twice"),
    ],
)  # fmt: skip
def test_yaml_mistakes_are_shown_where_they_start_with_a_hint(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    found = [str(p) for p in caught.value.problems]
    assert len(found) == 1 and found[0].startswith(expected), found


def test_missing_folders_are_reported_at_the_line_that_names_them(tmp_path: Path) -> None:
    from gateway.config import load

    (tmp_path / "afile").write_text("")
    path = tmp_path / "routes.yaml"
    path.write_text("version: 1\nplugins: [plugins, afile]\nspool: afile/spool\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    found = [str(p) for p in caught.value.problems]
    assert found == [
        f"{path}:2:11: plugin folder {tmp_path / 'plugins'} does not exist",
        f"{path}:2:20: plugin folder {tmp_path / 'afile'} is not a folder",
        f"{path}:3:8: the spool folder {tmp_path / 'afile' / 'spool'} cannot be created or"
        f" written: {tmp_path / 'afile'} is not a folder; name another with 'spool:' or give"
        " this user the right to write there",
    ]
    path.write_text("version: 1\nspool: /proc/gateway-spool\n")
    with pytest.raises(ConfigError, match=r":2:8: the spool folder /proc/gateway-spool cannot"):
        load(path)
    (tmp_path / "plugins").mkdir()
    path.write_text("version: 1\nplugins: [plugins]\nspool: var/spool\n")
    assert load(path).spool == str(tmp_path / "var" / "spool")
    assert not (tmp_path / "var").exists()  # checked, not created
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gateway")] == []


def test_a_missing_name_file_is_reported_at_its_line(tmp_path: Path) -> None:
    text = (
        "version: 1\nlisteners:\n  d: {protocol: dns, listen: 'udp:53'}\nroutes:\n"
        "  - from: d\n    match: {qname_file: nofile.txt}\n    action: refuse\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, "routes.yaml", tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"routes.yaml:6:25: route 1: 'qname_file': cannot read the name file"
        f" {tmp_path / 'nofile.txt'}: no such file or directory"
    ]


def test_unused_listeners_and_destinations_and_no_listener_are_warnings_not_errors() -> None:
    config = parse(
        "version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:25'}\n"
        "  spare: {protocol: smtp, listen: 'tcp:26'}\n"
        "destinations:\n  box: {protocol: maildir, path: m}\n  idle: {protocol: maildir, path: n}\n"
        "routes:\n  - {from: in, match: {rcpt: x}, to: box}\n"
    )
    assert [str(w) for w in config.warnings] == [
        "routes.yaml:4:35: listener 'spare' is used by no route: it accepts connections but"
        " refuses or drops everything; add a route 'from: spare' or remove it",
        "routes.yaml:7:9: destination 'idle' is used by no route: nothing is ever sent there",
    ]
    assert [str(w) for w in parse("version: 1\n").warnings] == [
        "routes.yaml:1:1: the file has no listeners: the gateway would start and take no traffic"
    ]


def test_a_missing_users_file_is_reported_at_its_line(tmp_path: Path) -> None:
    text = (
        "version: 1\nlisteners:\n  in:\n    protocol: smtp\n    listen: 'tcp:25'\n"
        "    users_file: nousers\n    require_auth: true\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, "routes.yaml", tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"routes.yaml:6:17: listener 'in': cannot read the users file {tmp_path / 'nousers'}:"
        " No such file or directory"
    ]
