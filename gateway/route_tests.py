"""``gateway test``: route tests written in YAML beside routes.yaml, run without sending.

A test file (``routes.test.yaml`` by default) lists cases; each gives one input
(mail, an article, a DNS query, an HTTP request or a file asked for by name) and
what must happen to it: which routes take it, which destinations get it, what
the transforms make of it (headers, body, the JSON a web hook would be sent),
or how it is refused.
Plugins run for real; no destination is contacted.
"""

from __future__ import annotations

import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, Location, Problem, suggest
from gateway.dry_run import SampleError, Simulation, listener_for, simulate
from gateway.message import Kind, MailMessage
from gateway.plugins import Transforms
from gateway.ports import Sample
from gateway.protocols import registry

# The inputs a case may give, by kind, and the keys each takes.
_INPUTS: dict[str, tuple[Kind, frozenset[str]]] = {
    "mail": (
        Kind.MAIL,
        frozenset({"listener", "client", "user", "from", "to", "headers", "body", "file"}),
    ),
    "article": (Kind.ARTICLE, frozenset({"listener", "client", "user", "headers", "body", "file"})),
    "dns": (Kind.DNS, frozenset({"listener", "client", "name", "type"})),
    "http": (
        Kind.HTTP,
        frozenset({"listener", "client", "user", "method", "path", "host", "headers", "body"}),
    ),
    # A file asked for by name (a TFTP read), or sent (upload: true, of size octets).
    "file": (Kind.FILE, frozenset({"listener", "client", "user", "name", "upload", "size"})),
}
_EXPECT = frozenset(
    {
        "routes",
        "destinations",
        "refused",
        "accepted",
        "answer",
        "recipients",
        "headers",
        "headers_match",
        "body_contains",
        "json",
    }
)


class CaseFileError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclass
class Case:
    name: str
    where: Location
    kind: Kind
    given: Mapping[str, Any]
    expect: Mapping[str, Any]


@dataclass
class Result:
    case: Case
    failures: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def read_cases(path: Path) -> list[Case]:
    """The cases of a test file; CaseFileError with every problem and its line."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise CaseFileError([Problem(None, f"cannot read {name}: {exc.strerror or exc}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = Location(name, mark.line + 1, mark.column + 1) if mark else None
        raise CaseFileError([Problem(where, f"not valid YAML: {exc}")]) from None

    def at(node: yaml.Node) -> Location:
        return Location(name, node.start_mark.line + 1, node.start_mark.column + 1)

    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise CaseFileError([Problem(Location(name, 1, 1), "expected 'version: 1' and 'tests:'")])
    problems: list[Problem] = []
    if data.get("version") != 1:
        problems.append(Problem(Location(name, 1, 1), "expected 'version: 1'"))
    for key in data:
        if key not in ("version", "tests"):
            problems.append(Problem(Location(name, 1, 1), f"unknown key '{key}'"))
    nodes = {k.value: v for k, v in root.value}
    items = data.get("tests")
    node = nodes.get("tests")
    if not isinstance(items, list) or not isinstance(node, yaml.SequenceNode):
        problems.append(Problem(Location(name, 1, 1), "'tests' must be a list of cases"))
        raise CaseFileError(problems)
    cases = []
    for number, (item, item_node) in enumerate(zip(items, node.value, strict=True), start=1):
        where = at(item_node)
        if not isinstance(item, dict):
            problems.append(Problem(where, f"case {number}: expected a mapping"))
            continue
        title = str(item.get("name") or f"case {number}")
        inputs = [k for k in item if k in _INPUTS]
        for key in item:
            if key not in _INPUTS and key not in ("name", "expect"):
                known = [*_INPUTS, "name", "expect"]
                problems.append(
                    Problem(where, f"{title}: unknown key '{key}'{suggest(key, known)}")
                )
        if len(inputs) != 1:
            problems.append(
                Problem(
                    where,
                    f"{title}: give exactly one input of {', '.join(_INPUTS)};"
                    f" it has {', '.join(inputs) or 'none'}",
                )
            )
            continue
        kind, allowed = _INPUTS[inputs[0]]
        given = item[inputs[0]] or {}
        expect = item.get("expect")
        if not isinstance(given, dict):
            problems.append(Problem(where, f"{title}: '{inputs[0]}' must be a mapping"))
            continue
        for key in given:
            if key not in allowed:
                problems.append(
                    Problem(
                        where,
                        f"{title}: '{inputs[0]}' has no key '{key}'{suggest(str(key), allowed)}",
                    )
                )
        if not isinstance(expect, dict) or not expect:
            problems.append(Problem(where, f"{title}: 'expect' must say what must happen"))
            continue
        for key in expect:
            if key not in _EXPECT:
                problems.append(
                    Problem(
                        where, f"{title}: 'expect' has no key '{key}'{suggest(str(key), _EXPECT)}"
                    )
                )
        if "json" in expect and (not isinstance(expect["json"], dict) or not expect["json"]):
            problems.append(
                Problem(where, f"{title}: 'json' must map field paths (a.b.0) to values")
            )
            continue
        cases.append(Case(title, where, kind, given, expect))
    if problems:
        raise CaseFileError(problems)
    return cases


def _sample(config: Config, case: Case, base: Path) -> Sample:
    given = case.given
    listener = listener_for(config, given.get("listener"), case.kind)
    headers = given.get("headers") or {}
    if not isinstance(headers, dict):
        raise SampleError("'headers' must be a mapping of names to values")
    data = b""
    if case.kind in (Kind.MAIL, Kind.ARTICLE):
        if "file" in given:
            data = (base / str(given["file"])).read_bytes().replace(b"\r\n", b"\n")
        else:
            head = "".join(f"{k}: {v}\n" for k, v in headers.items())
            data = (head + "\n" + str(given.get("body", ""))).encode()
    elif "body" in given:
        body = given["body"]
        data = body.encode() if isinstance(body, str) else yaml.safe_dump(body).encode()
    recipients = given.get("to") or ()
    if isinstance(recipients, str):
        recipients = (recipients,)
    return Sample(
        listener=listener,
        client=str(given.get("client", "127.0.0.1")),
        user=str(given.get("user", "")),
        sender=str(given.get("from", "")),
        recipients=tuple(str(r) for r in recipients),
        data=data,
        name=str(given.get("name", "")),
        type=str(given.get("type", "A")),
        method=str(given.get("method", "GET")).upper() if case.kind == Kind.HTTP else "",
        target=str(given.get("path", "/")),
        host=str(given.get("host", "")),
        headers=tuple((str(k), str(v)) for k, v in headers.items())
        if case.kind == Kind.HTTP
        else (),
        upload=bool(given.get("upload", False)),
        size=int(given["size"]) if given.get("size") is not None else None,
    )


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


_MISSING = object()


def json_at(document: Any, path: str) -> Any:
    """The value at a dotted path (``envelope.recipients.0``) of JSON data, else _MISSING."""
    value = document
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _previews(config: Config, sim: Simulation) -> list[tuple[str, Any]]:
    """(destination, the JSON it would send, or the ValueError why not) for each copy
    going to a destination that sends JSON (a web hook)."""
    found: list[tuple[str, Any]] = []
    for copy in sim.copies:
        for name in copy.destinations:
            destination = config.destinations.get(name)
            if destination is None:
                continue
            preview = registry().destination(destination.protocol).preview
            if preview is None:
                continue
            try:
                found.append((name, preview(destination, copy.message)))
            except ValueError as exc:
                found.append((name, exc))
    return found


def _judge_json(config: Config, wanted: Mapping[str, Any], sim: Simulation) -> list[str]:
    previews = _previews(config, sim)
    if not previews:
        return ["expected JSON for a web hook, but no copy goes to a destination that sends JSON"]
    failures = []
    for name, document in previews:
        if isinstance(document, ValueError):
            failures.append(f"{name} would send nothing: {document}")
            continue
        for path, value in wanted.items():
            got = json_at(document, str(path))
            if got is _MISSING:
                failures.append(f"expected {path} in the JSON for {name}, but it has no such field")
            elif got != value:
                failures.append(f"expected {path}: {value!r} in the JSON for {name}, got {got!r}")
    return failures


def judge(case: Case, sim: Simulation, config: Config) -> list[str]:
    """What in ``sim`` differs from what the case expects."""
    expect = case.expect
    failures: list[str] = []
    refused = sim.refused or sim.failed
    if "refused" in expect:
        wanted = str(expect["refused"])
        if not refused:
            failures.append(f"expected a refusal with '{wanted}', but it was accepted")
        elif wanted not in refused:
            failures.append(f"expected a refusal with '{wanted}', got '{refused}'")
    elif refused and expect.get("accepted", True):
        failures.append(f"expected it to be accepted, but it was refused: {refused}")
    if "accepted" in expect and bool(expect["accepted"]) != (not refused):
        failures.append(f"expected accepted: {bool(expect['accepted'])}")
    if "routes" in expect and sorted(_names(expect["routes"])) != sorted(sim.routes):
        failures.append(f"expected routes {_names(expect['routes'])}, got {sim.routes}")
    if "destinations" in expect and sorted(_names(expect["destinations"])) != sorted(
        sim.all_destinations
    ):
        failures.append(
            f"expected destinations {_names(expect['destinations'])}, got {sim.all_destinations}"
        )
    if "answer" in expect and str(expect["answer"]) not in sim.answer:
        failures.append(f"expected the answer '{expect['answer']}', got '{sim.answer or '-'}'")
    mails = [c.message for c in sim.copies if isinstance(c.message, MailMessage)]
    if "recipients" in expect:
        got = sorted(r for m in mails for r in m.recipients)
        if got != sorted(_names(expect["recipients"])):
            failures.append(f"expected recipients {_names(expect['recipients'])}, got {got}")
    copies = [c.message for c in sim.copies]
    if any(k in expect for k in ("headers", "headers_match", "body_contains")) and not copies:
        failures.append("expected a message to look at, but nothing would be sent")
    for message in copies:
        headers = getattr(message, "headers", None)
        for name, value in (expect.get("headers") or {}).items():
            got_value = headers.get(str(name)) if headers is not None else None
            if got_value != str(value):
                failures.append(f"expected header {name}: {value!r}, got {got_value!r}")
        for name, pattern in (expect.get("headers_match") or {}).items():
            got_value = headers.get(str(name)) if headers is not None else None
            if got_value is None or re.search(str(pattern), got_value) is None:
                failures.append(f"expected header {name} to match {pattern!r}, got {got_value!r}")
        if "body_contains" in expect:
            body = getattr(message, "body", b"")
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
            if str(expect["body_contains"]) not in text:
                failures.append(f"expected the body to contain {expect['body_contains']!r}")
    if "json" in expect:
        failures += _judge_json(config, expect["json"], sim)
    return failures


async def run_cases(
    config: Config, transforms: Transforms, cases: Sequence[Case], base: Path
) -> list[Result]:
    results = []
    for case in cases:
        started = time.monotonic()
        result = Result(case)
        try:
            sim = await simulate(config, transforms, _sample(config, case, base))
        except (SampleError, OSError) as exc:
            result.failures.append(f"cannot be tried: {exc}")
        else:
            result.trace = sim.trace
            result.failures = judge(case, sim, config)
        result.seconds = time.monotonic() - started
        results.append(result)
    return results


def report(results: Sequence[Result], out: Any = None) -> None:
    out = out or sys.stdout
    for result in results:
        case = result.case
        if result.passed:
            print(f"{case.where}: ok    {case.name}", file=out)
            continue
        print(f"{case.where}: FAIL  {case.name}", file=out)
        for failure in result.failures:
            print(f"    {failure}", file=out)
        if result.trace:
            print("    route trace:", file=out)
            for line in result.trace:
                print(f"      {line}", file=out)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed", file=out)


def write_junit(path: Path, results: Sequence[Result]) -> None:
    """JUnit XML, as CI systems read it: one testcase per case, a failure with the diff."""
    suite = ET.Element(
        "testsuite",
        name="gateway route tests",
        tests=str(len(results)),
        failures=str(sum(not r.passed for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for result in results:
        case = result.case
        element = ET.SubElement(
            suite,
            "testcase",
            classname=Path(case.where.file).name,
            name=case.name,
            file=case.where.file,
            line=str(case.where.line),
            time=f"{result.seconds:.3f}",
        )
        if not result.passed:
            failure = ET.SubElement(element, "failure", message=result.failures[0])
            failure.text = "\n".join([*result.failures, "route trace:", *result.trace])
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
