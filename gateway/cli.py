"""The ``gateway`` command: run, check, schema, route --dry-run, queue."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

from gateway import __version__
from gateway.config import ConfigError

log = Logger(namespace="gateway.cli")

DEFAULT_CONFIG = "routes.yaml"


def _message(event: LogEvent) -> str:
    """formatEvent's text; a format without Twisted's "{name()}" calls goes the quick way."""
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt and "log_flattened" not in event:
        try:
            return fmt.format_map(event)  # what formatEvent gives, without string.Formatter
        except Exception:
            pass  # formatEvent says what is wrong with the format
    return formatEvent(event)


def _text(event: LogEvent) -> str | None:
    """The event's text and traceback, or None for Twisted chatter not worth a line."""
    level = event.get("log_level", LogLevel.info)
    if event.get("log_namespace") == "log_legacy" and level < LogLevel.warn:
        return None  # Twisted's "port starting on ..." chatter; our own lines say it better
    text = _message(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback().rstrip("\n")
    return text


def _format(event: LogEvent) -> str | None:
    """For a terminal or a file: time, level, namespace, text."""
    text = _text(event)
    if text is None:
        return None
    level = event.get("log_level", LogLevel.info)
    stamp = _stamp(int(event.get("log_time", time.time())))
    namespace = event.get("log_namespace", "-")
    return f"{stamp} {level.name:<5} {namespace}: {text}\n"


_stamps: dict[int, str] = {}


def _stamp(second: int) -> str:
    """The local time of a log line, made once per second."""
    stamp = _stamps.get(second)
    if stamp is None:
        if len(_stamps) > 16:
            _stamps.clear()
        stamp = _stamps[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
    return stamp


# sd-daemon(3) priority prefixes; journald strips them and files the line at that priority.
_PRIORITIES = {
    LogLevel.critical: "<2>",
    LogLevel.error: "<3>",
    LogLevel.warn: "<4>",
    LogLevel.info: "<6>",
    LogLevel.debug: "<7>",
}


def _format_journal(event: LogEvent) -> str | None:
    """For journald: its own timestamps, our priority on every line (tracebacks too)."""
    text = _text(event)
    if text is None:
        return None
    prefix = _PRIORITIES.get(event.get("log_level", LogLevel.info), "<6>")
    namespace = event.get("log_namespace", "-")
    return "".join(f"{prefix}{line}\n" for line in f"{namespace}: {text}".split("\n"))


def _format_json(event: LogEvent) -> str | None:
    """One JSON object per line: time, level, namespace, message and the event's fields."""
    text = _text(event)
    if text is None:
        return None
    stamp = datetime.datetime.fromtimestamp(event.get("log_time", time.time()), datetime.UTC)
    record: dict[str, Any] = {
        "time": stamp.isoformat(timespec="milliseconds"),
        "level": event.get("log_level", LogLevel.info).name,
        "namespace": event.get("log_namespace", "-"),
        "message": text,
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record:
            record[key] = value
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def journal_stream(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journal connection systemd gave us ($JOURNAL_STREAM).

    The variable names the device and inode of that connection; a stream
    redirected elsewhere (a file, a pipe to another program) does not match.
    """
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


LOG_FORMATS = ("auto", "text", "journal", "json")


def start_logging(
    level: str = "info", stream: IO[str] | None = None, log_format: str = "auto"
) -> None:
    """Log to ``stream`` (stderr): text on a terminal, sd-daemon priorities for the journal
    ("auto" picks these), or JSON lines for log shippers."""
    out = stream or sys.stderr
    journal = journal_stream(out)
    formatter: Callable[[LogEvent], str | None]
    if log_format == "json":
        if journal:

            def formatter(event: LogEvent) -> str | None:
                line = _format_json(event)
                return (
                    None
                    if line is None
                    else _PRIORITIES.get(event.get("log_level", LogLevel.info), "") + line
                )

        else:
            formatter = _format_json
    elif log_format == "journal" or (log_format == "auto" and journal):
        formatter = _format_journal
    else:
        formatter = _format
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    text: Any = FileLogObserver(out, formatter)
    observer: Any = FilteringLogObserver(text, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    count = len(error.problems)
    print(f"{count} problem{'s' if count != 1 else ''} found", file=sys.stderr)


# --- commands --------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.service import load_checked

    try:
        config, _ = load_checked(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: ok ({len(config.listeners)} listener(s), "
        f"{len(config.destinations)} destination(s), {len(config.routes)} route(s))"
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from gateway.config import json_schema
    from gateway.plugins import load_transforms

    options: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in load_transforms().specs():
        for option in spec.options or ():
            options.setdefault(option.name, (spec.name, option.schema()))
    json.dump(json_schema(options), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from gateway.control import cmd_reload as reload

    return reload(args)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.reactor import install_if_default

    install_if_default()

    from twisted.internet import defer
    from twisted.internet import reactor as installed_reactor
    from twisted.internet.error import CannotListenError

    from gateway.service import GatewayService, load_checked
    from gateway.spool import SpoolError
    from gateway.systemd import Notifier, SocketActivationError

    reactor: Any = installed_reactor

    try:
        loaded = load_checked(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    start_logging(args.log_level, log_format=args.log_format)
    service = GatewayService(args.config, reactor)
    # Under systemd (Type=notify): READY=1, RELOADING=1, STOPPING=1, STATUS= and watchdog
    # pings from the reactor; outside systemd it does nothing.
    notifier = Notifier(reactor, service.status_line)
    service.on_state.append(notifier.on_state)
    status = {"code": 0}

    def failed(failure: Any) -> None:
        if failure.check(ConfigError):
            print_problems(failure.value)
        elif failure.check(OSError, CannotListenError, SpoolError, SocketActivationError):
            print(f"error: cannot start: {failure.getErrorMessage()}", file=sys.stderr)
        else:
            log.failure("cannot start", failure)
        notifier.failed(failure.getErrorMessage())
        status["code"] = 1
        reactor.stop()

    def on_hup(signum: int, frame: object) -> None:
        reactor.callFromThread(service.reload)

    signal.signal(signal.SIGHUP, on_hup)

    def go() -> None:
        # Registered first, so a SIGTERM during start-up also shuts down cleanly.
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.Deferred.fromCoroutine(service.shutdown())
        )
        notifier.start()
        starting = defer.Deferred.fromCoroutine(service.start(loaded))
        # What start-up built lives as long as the process: out of the collector's way, so
        # full collections walk only what queries and messages allocate.
        starting.addCallbacks(lambda _: gc.freeze(), failed)

    reactor.callWhenRunning(go)
    reactor.run()
    return status["code"]


def cmd_route(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from gateway.dry_run import dry_run
    from gateway.service import load_checked

    if not args.dry_run:
        print("error: only --dry-run is supported: routing without sending", file=sys.stderr)
        return 2
    try:
        config, transforms = load_checked(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    result = {"code": 0}

    async def go() -> None:
        result["code"] = await dry_run(config, transforms, args)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go()))
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    return result["code"]


def cmd_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from twisted.internet import defer, task

    from gateway.route_tests import CaseFileError, read_cases, report, run_cases, write_junit
    from gateway.service import load_checked

    try:
        config, transforms = load_checked(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    files = [Path(f) for f in args.tests] or [Path(args.config).parent / "routes.test.yaml"]
    cases = []
    problems = []
    for path in files:
        try:
            cases += read_cases(path)
        except CaseFileError as exc:
            problems += exc.problems
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no test cases in {', '.join(map(str, files))}", file=sys.stderr)
        return 2
    results = []

    async def go() -> None:
        for path in files:
            mine = [c for c in cases if c.where.file == str(path)]
            results.extend(await run_cases(config, transforms, mine, path.resolve().parent))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go()))
    except SystemExit as exc:
        if exc.code not in (0, None):
            return 2
    report(results)
    if args.junit:
        write_junit(Path(args.junit), results)
    return 0 if all(r.passed for r in results) else 1


def cmd_graph(args: argparse.Namespace) -> int:
    from gateway.graph import GraphvizMissing, dot, mermaid, svg
    from gateway.service import load_checked

    try:
        config, _ = load_checked(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    draw = {"dot": dot, "svg": svg, "mermaid": mermaid}[args.format]
    try:
        sys.stdout.write(draw(config))
    except GraphvizMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from gateway.tracing import cmd_trace as trace

    return trace(args)


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.queue_cli import run

    return run(args)


def cmd_passwd(args: argparse.Namespace) -> int:
    import getpass

    from gateway.users import UsersError, check_name, hash_password, write_user

    try:
        check_name(args.user)
    except UsersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass(f"password for {args.user}: ")
            again = getpass.getpass("the same again: ")
        except (EOFError, KeyboardInterrupt):
            print("\nerror: no password given", file=sys.stderr)
            return 1
        if password != again:
            print("error: the two passwords differ; nothing was written", file=sys.stderr)
            return 1
    if not password:
        print("error: an empty password is not allowed", file=sys.stderr)
        return 1
    if args.print:
        print(f"{args.user}:{hash_password(password)}")
        return 0
    try:
        new = write_user(Path(args.file), args.user, password)
    except (UsersError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if new else 'changed the password of'} {args.user} in {args.file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A protocol gateway and proxy service, driven by routes.yaml: run it, check"
        " the file, try a message against the routes, manage the queue and the users.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c", "--config", default=DEFAULT_CONFIG, help="routes file (default: %(default)s)"
        )
        return p

    run = with_config(sub.add_parser("run", help="run the gateway"))
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    run.add_argument(
        "--log-format",
        default="auto",
        choices=LOG_FORMATS,
        help="text (time, level, namespace, message), journal (sd-daemon priorities, no"
        " time), json (one object per line); auto: journal under systemd, else text",
    )
    run.set_defaults(func=cmd_run)
    check = with_config(sub.add_parser("check", help="validate the routes file"))
    check.set_defaults(func=cmd_check)
    reload = with_config(
        sub.add_parser(
            "reload",
            help="make the running gateway re-read the routes file; exit 1 if it refuses",
            description="Check the routes file, send SIGHUP to the running gateway and wait"
            " for it to put the file in force. Exits 1, with the reasons, when the file does"
            " not check or the gateway refuses it (the listeners and routes before it stay).",
        )
    )
    reload.add_argument(
        "--pid", type=int, default=0, help="the gateway's process (default: from its status file)"
    )
    reload.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the verdict (default 60)"
    )
    reload.set_defaults(func=cmd_reload)
    tests = with_config(
        sub.add_parser(
            "test",
            help="run route tests (routes.test.yaml beside the routes file) without sending",
            description="Run the route tests of TESTS (default: routes.test.yaml next to the"
            " routes file): each case's input goes through the routes and plugins as it"
            " would on traffic, and what happens is compared with what it expects. Exit 0"
            " when all pass, 1 when one fails, 2 when a file cannot be read.",
        )
    )
    tests.add_argument("tests", nargs="*", metavar="TESTS", help="test files")
    tests.add_argument("--junit", metavar="FILE", help="also write JUnit XML for CI systems")
    tests.set_defaults(func=cmd_test)
    graph = with_config(
        sub.add_parser(
            "graph",
            help="draw listeners -> routes -> destinations (Graphviz DOT, SVG or Mermaid)",
            description="Print the routes file as a picture: listeners, routes (their match"
            " and transforms) and destinations. Unused listeners and destinations are"
            " dashed; a route that can never match is red.",
        )
    )
    graph.add_argument(
        "--format", choices=("dot", "svg", "mermaid"), default="dot", help="default: dot"
    )
    graph.set_defaults(func=cmd_graph)
    trace = with_config(
        sub.add_parser(
            "trace",
            help="follow the running gateway's routing decisions as they happen",
            description="Print each routing decision of the running gateway (listener,"
            " client, message id, routes and destinations or the refusal, the transforms"
            " applied) and each delivery try, read from its admin site's /trace. Nothing"
            " is recorded while no one traces.",
        )
    )
    trace.add_argument("--route", help="only messages a route took (or tried to deliver)")
    trace.add_argument("--listener", help="only messages that came in on this listener")
    trace.add_argument("--match", help="only events that contain this text anywhere")
    trace.add_argument("--json", action="store_true", help="one JSON object per event")
    trace.set_defaults(func=cmd_trace)
    schema = sub.add_parser("schema", help="print a JSON Schema of the routes file")
    schema.set_defaults(func=cmd_schema)
    route = with_config(
        sub.add_parser(
            "route",
            help="show how a message, article, DNS query or HTTP request would be routed",
            description="Route a sample without sending anything: mail (--to, the message"
            " on stdin), an article (--article, on stdin), a DNS query (--query NAME [TYPE])"
            ", an HTTP request (--method, --path, --header, --body FILE) or a file asked for"
            " by name (--file NAME, as by TFTP). Exit 0 if it"
            " would be delivered or answered, 1 if it would be refused.",
        )
    )
    route.add_argument("--dry-run", action="store_true", help="route and transform, send nothing")
    route.add_argument("--from", dest="sender", default="", help="mail: envelope sender")
    route.add_argument(
        "--to",
        dest="recipients",
        action="append",
        help="mail: envelope recipient (repeat for several)",
    )
    route.add_argument("--article", action="store_true", help="news: an article read on stdin")
    route.add_argument(
        "--query", nargs="+", metavar="NAME", help="DNS: the query name, then its type (A)"
    )
    route.add_argument("--file", metavar="NAME", help="files: the name asked for (TFTP read)")
    route.add_argument("--upload", action="store_true", help="files: an upload of --file NAME")
    route.add_argument("--size", type=int, help="files: the upload's size in octets")
    route.add_argument("--method", help="HTTP: the request method (GET with --path alone)")
    route.add_argument("--path", help="HTTP: the request target, e.g. /hooks/alert?x=1")
    route.add_argument("--host", help="HTTP: the Host (or give --header 'Host: ...')")
    route.add_argument(
        "--header", dest="headers", action="append", help="HTTP: 'Name: value' (repeat)"
    )
    route.add_argument("--body", help="HTTP: a file holding the request body")
    route.add_argument(
        "--listener", help="the listener it arrives on (default: the first of the right kind)"
    )
    route.add_argument("--client", default="127.0.0.1", help="client address for 'client' matches")
    route.add_argument("--user", help="the logged-in user, for 'user' and 'authenticated' matches")
    route.set_defaults(func=cmd_route)
    passwd = sub.add_parser(
        "passwd",
        help="add a user to a users file or change its password (SMTP AUTH, NNTP AUTHINFO)",
        description="Write USER with an Argon2id hash of the password into the users file"
        " that listeners name with users_file (made readable by its owner only).",
    )
    passwd.add_argument("user", metavar="USER")
    passwd.add_argument("-f", "--file", default="users", help="users file (default: %(default)s)")
    passwd.add_argument(
        "--stdin", action="store_true", help="read the password from the first line of stdin"
    )
    passwd.add_argument(
        "--print", action="store_true", help="print USER:HASH (for users: in routes.yaml) instead"
    )
    passwd.set_defaults(func=cmd_passwd)
    queue = with_config(
        sub.add_parser("queue", help="list, show, retry or drop the spooled deliveries")
    )
    queue.set_defaults(func=cmd_queue)
    queue.add_argument("--json", action="store_true", help="print JSON instead of text")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")

    def queue_command(name: str, text: str, json_output: bool) -> argparse.ArgumentParser:
        p = queue_sub.add_parser(name, help=text, description=text)
        # -c also after the subcommand; SUPPRESS keeps one given before it.
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="routes file")
        if json_output:
            # SUPPRESS: "queue --json list" (given before the subcommand) stays set.
            p.add_argument(
                "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
            )
        return p

    queue_command("list", "the deliveries waiting in the queue", True)
    queue_command("dead", "the dead letters (deliveries given up on)", True)
    ids = (
        "a queue id (as in '250 Ok: queued as ID': every delivery of that message),"
        " a delivery id (ID.N) or a Message-ID"
    )
    show = queue_command(
        "show", "a message's deliveries: their fields, history and the message header", True
    )
    show.add_argument("id", metavar="ID", help=ids)
    retry = queue_command("retry", "make deliveries due now, reviving dead letters", False)
    retry.add_argument("ids", nargs="*", metavar="ID", help=ids)
    retry.add_argument("--all", action="store_true", help="every delivery, dead ones included")
    drop = queue_command("drop", "delete deliveries from the spool for good", False)
    drop.add_argument("ids", nargs="+", metavar="ID", help=ids)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    if hasattr(args, "config") and not Path(args.config).exists():
        print(f"error: {args.config}: no such file (use -c FILE)", file=sys.stderr)
        return 1
    code: int = args.func(args)
    return code
