"""``gateway test``: reading route test files, judging simulations, the report, JUnit XML."""

from __future__ import annotations

import io
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.config import parse
from gateway.plugins import load_transforms
from gateway.route_tests import CaseFileError, read_cases, report, run_cases, write_junit
from tests.support.deferreds import run

CONFIG = textwrap.dedent(
    r"""
    version: 1
    listeners:
      mail-in: {protocol: smtp, listen: 'tcp:2525'}
      dns-in: {protocol: dns, listen: 'udp:5353'}
    destinations:
      box: {protocol: maildir, path: mail}
      relay: {protocol: smtp, connect: 'tcp:127.0.0.1:2526'}
      up: {protocol: dns, servers: ['127.0.0.1:5301']}
    routes:
      - {name: local, from: mail-in, match: {rcpt: '^(?P<u>\w+)@example\.test$'},
         transforms: [tag_subject], options: {tag: '[{u}]'}, to: box}
      - {name: copy, from: mail-in, match: {rcpt: '@example\.test$'}, to: relay}
      - {name: blocked, from: dns-in, match: {qname: '*.ads.test'}, action: nxdomain}
      - {name: rest, from: dns-in, to: up}
    """
)

TESTS = textwrap.dedent(
    """
    version: 1
    tests:
      - name: tagged and filed
        mail: {from: a@b.test, to: [ann@example.test], headers: {Subject: hi}, body: "yo\\n"}
        expect:
          routes: [local]
          destinations: [box]
          headers: {Subject: '[ann] hi'}
          headers_match: {Subject: '^\\[ann\\]'}
          body_contains: yo
          recipients: [ann@example.test]
      - name: wrong on purpose
        mail: {from: a@b.test, to: [ann@example.test], headers: {Subject: hi}}
        expect: {routes: [copy], destinations: [relay], headers: {Subject: hi}}
      - name: open relay refused
        mail: {from: a@b.test, to: [x@elsewhere.test]}
        expect: {refused: '550 5.1.1'}
      - name: ads
        dns: {name: x.ads.test}
        expect: {routes: [blocked], answer: NXDOMAIN}
      - name: forwarded
        dns: {name: www.test, type: MX}
        expect: {routes: [rest], destinations: [up]}
    """
)


@pytest.fixture
def plugins() -> Path:
    return Path(__file__).resolve().parents[2] / "plugins"


def results_for(tmp_path: Path, plugins: Path, tests: str = TESTS) -> list:  # type: ignore[type-arg]
    config = parse(CONFIG)
    transforms = load_transforms([plugins], entry_points=False)
    path = tmp_path / "routes.test.yaml"
    path.write_text(tests)
    return run(run_cases(config, transforms, read_cases(path), tmp_path))


def test_cases_pass_and_fail_with_what_differs(tmp_path: Path, plugins: Path) -> None:
    results = results_for(tmp_path, plugins)
    assert [r.passed for r in results] == [True, False, True, True, True]
    wrong = results[1]
    assert wrong.case.where.line == 13
    assert wrong.failures == [
        "expected routes ['copy'], got ['local']",
        "expected destinations ['relay'], got ['box']",
        "expected header Subject: 'hi', got '[ann] hi'",
    ]
    assert any("route 'local' matches for ann@example.test" in line for line in wrong.trace)
    out = io.StringIO()
    report(results, out)
    text = out.getvalue()
    assert f"{tmp_path / 'routes.test.yaml'}:13:5: FAIL  wrong on purpose\n" in text
    assert "    route trace:\n" in text
    assert text.endswith("4 passed, 1 failed\n")


def test_junit_xml_has_one_testcase_per_case_and_the_failures(
    tmp_path: Path, plugins: Path
) -> None:
    results = results_for(tmp_path, plugins)
    junit = tmp_path / "junit.xml"
    write_junit(junit, results)
    suite = ET.parse(junit).getroot()
    assert (suite.tag, suite.get("tests"), suite.get("failures")) == ("testsuite", "5", "1")
    failed = [c for c in suite if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["wrong on purpose"]
    assert failed[0].get("line") == "13"


def test_a_refusal_that_was_not_expected_fails(tmp_path: Path, plugins: Path) -> None:
    tests = (
        "version: 1\ntests:\n  - name: x\n    mail: {from: a@b.test, to: [x@nowhere.test]}\n"
        "    expect: {routes: [local]}\n"
    )
    [result] = results_for(tmp_path, plugins, tests)
    assert result.failures[0].startswith(
        "expected it to be accepted, but it was refused: 550 5.1.1 <x@nowhere.test>:"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version: 2\ntests: []\n", ":1:1: expected 'version: 1'"),
        ("version: 1\ntests:\n  - name: x\n    mial: {}\n    expect: {routes: []}\n",
         ":3:5: x: unknown key 'mial'; did you mean 'mail'?"),
        ("version: 1\ntests:\n  - name: x\n    mail: {too: [a]}\n    expect: {routes: []}\n",
         ":3:5: x: 'mail' has no key 'too'; did you mean 'to'?"),
        ("version: 1\ntests:\n  - name: x\n    dns: {name: a.test}\n    expect: {rotes: []}\n",
         ":3:5: x: 'expect' has no key 'rotes'; did you mean 'routes'?"),
        ("version: 1\ntests:\n  - name: x\n    dns: {name: a.test}\n",
         ":3:5: x: 'expect' must say what must happen"),
        ("version: 1\ntests:\n  - {name: x, dns: {}, mail: {}, expect: {accepted: true}}\n",
         ":3:5: x: give exactly one input of mail, article, dns, http, file; it has dns, mail"),
        ("version: 1\ntests: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_mistakes_in_a_test_file_are_named_at_their_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(CaseFileError) as caught:
        read_cases(path)
    assert any(problem in str(p) for p in caught.value.problems), caught.value.problems


HOOK_CONFIG = textwrap.dedent(
    r"""
    version: 1
    listeners:
      mail-in: {protocol: smtp, listen: 'tcp:2525'}
    destinations:
      box: {protocol: maildir, path: mail}
      chat: {protocol: webhook, url: 'http://127.0.0.1:8082/mail'}
    routes:
      - {name: alerts, from: mail-in, match: {rcpt: '@alerts\.test$'},
         transforms: [tag_subject], options: {tag: '[ops]'}, to: chat}
      - {name: local, from: mail-in, match: {rcpt: '@example\.test$'}, to: box}
    """
)


def test_json_fields_of_what_a_web_hook_would_be_sent(tmp_path: Path, plugins: Path) -> None:
    tests = textwrap.dedent(
        """
        version: 1
        tests:
          - name: right
            mail:
              from: nagios@example.test
              to: [ops@alerts.test]
              headers: {Subject: disk full, From: 'Nagios <nagios@example.test>'}
              body: "sda1 at 99%\\n"
            expect:
              json:
                subject: '[ops] disk full'
                envelope.recipients: [ops@alerts.test]
                envelope.recipients.0: ops@alerts.test
                from: {name: Nagios, address: nagios@example.test}
                text: "sda1 at 99%\\n"
                attachments: []
                cc: []
          - name: wrong
            mail: {from: a@b.test, to: [ops@alerts.test], headers: {Subject: x}}
            expect: {json: {subject: x, envelope.sender: c@d.test, to.0.address: y, nothing: 1}}
          - name: not a web hook
            mail: {from: a@b.test, to: [ann@example.test]}
            expect: {json: {subject: x}}
        """
    )
    path = tmp_path / "routes.test.yaml"
    path.write_text(tests)
    transforms = load_transforms([plugins], entry_points=False)
    results = run(run_cases(parse(HOOK_CONFIG), transforms, read_cases(path), tmp_path))
    assert results[0].failures == []
    assert results[1].failures == [
        "expected subject: 'x' in the JSON for chat, got '[ops] x'",
        "expected envelope.sender: 'c@d.test' in the JSON for chat, got 'a@b.test'",
        "expected to.0.address in the JSON for chat, but it has no such field",
        "expected nothing in the JSON for chat, but it has no such field",
    ]
    assert results[2].failures == [
        "expected JSON for a web hook, but no copy goes to a destination that sends JSON"
    ]


def test_json_expectations_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("version: 1\ntests:\n  - name: x\n    mail: {}\n    expect: {json: [a]}\n")
    with pytest.raises(CaseFileError, match=r":3:5: x: 'json' must map field paths"):
        read_cases(path)


def test_a_file_asked_for_by_name_is_routed_by_the_tftp_listener(tmp_path: Path) -> None:
    config = parse(
        textwrap.dedent(
            r"""
            version: 1
            listeners:
              boot: {protocol: tftp, listen: 'udp:6969', allow: [10.0.0.0/8, 127.0.0.1]}
            destinations:
              lab: {protocol: folder, path: lab}
              boot: {protocol: folder, path: boot}
              inbox: {protocol: folder, path: inbox, uploads: true}
            routes:
              - {name: lab, from: boot, match: {name: '^lab/', client: [10.1.0.0/16]}, to: lab}
              - {name: pxe, from: boot, match: {name: '\.(0|efi)$'}, to: boot}
              - {name: up, from: boot, match: {name: '\.cfg$'}, to: inbox}
            """
        )
    )
    tests = textwrap.dedent(
        """
        version: 1
        tests:
          - {name: lab, file: {name: lab/x.0, client: 10.1.2.3}, expect: {routes: [lab]}}
          - {name: pxe, file: {name: lab/x.0, client: 10.2.0.1}, expect: {destinations: [boot]}}
          - {name: none, file: {name: x.txt, client: 10.1.2.3}, expect: {refused: file not found}}
          - {name: outside, file: {name: x.0, client: 192.0.2.1}, expect: {refused: access}}
          - {name: wrong, file: {name: x.0}, expect: {routes: [lab]}}
          - {name: up, file: {name: a.cfg, upload: true, size: 9}, expect: {destinations: [inbox]}}
          - {name: ro, file: {name: a.0, upload: true}, expect: {refused: boot take(s) no uploads}}
          - {name: none, file: {name: a.txt, upload: true}, expect: {refused: no route}}
        """
    )
    path = tmp_path / "t.yaml"
    path.write_text(tests)
    results = run(
        run_cases(config, load_transforms([], entry_points=False), read_cases(path), tmp_path)
    )
    assert [r.failures for r in results] == [
        [],
        [],
        [],
        [],
        ["expected routes ['lab'], got ['pxe']"],
        [],
        [],
        [],
    ]
