"""``gateway queue``: list, inspect, retry and drop the spool's deliveries from a shell.

The command opens the spool of a configuration directly; SQLite lets it do so
while the gateway runs, and a running gateway picks retried deliveries up at
its next poll of the spool (every second).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.config import ConfigError, load
from gateway.message import Message
from gateway.spool import DEAD, QUEUED, Delivery, SpoolBackend, SpoolError, SqliteSpool

T = TypeVar("T")

# What a running gateway needs at most to notice a change (DeliveryManager's poll interval).
PICKUP = "a running gateway tries them within a second"


def run(args: argparse.Namespace) -> int:
    """Run ``gateway queue SUBCOMMAND`` for the parsed arguments; the exit status."""
    from gateway.cli import print_problems

    try:
        config = load(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    spool = SqliteSpool(str(config.spool))
    where = str(spool.path)
    # Opening creates a missing spool; a command that only looks must not.
    if not spool.path.is_file():
        _error(f"no spool at {where} (the gateway has not run with this configuration yet)")
        return 1
    try:
        _wait(spool.open())
    except SpoolError as exc:
        _error(f"{exc}; check that this user may read and write {spool.directory}")
        return 1
    command = SUBCOMMANDS[args.queue_command]
    try:
        return _wait(command(spool, args, where))
    except SpoolError as exc:
        _error(str(exc))
        return 1
    except BrokenPipeError:
        # The reader went away (``gateway queue list | head``): not worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        _wait(spool.close())


def _wait(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that finishes at once, as every call of a reactor-less
    SqliteSpool does (it runs each query inline)."""
    results: list[T] = []
    failures: list[Failure] = []
    Deferred.fromCoroutine(coroutine).addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    if not results:
        raise RuntimeError("the spool did not answer at once")
    return results[0]


def _error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


# --- formatting ----------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """5s, 3m, 2h, 1d: the largest whole unit, as ``mailq`` users expect."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def next_try_text(next_try: float, now: float) -> str:
    if next_try <= now:
        return "now"
    return f"in {human_duration(math.ceil(next_try - now))}"


def iso_utc(stamp: float) -> str:
    """A time in ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _local(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))


def one_line(text: str) -> str:
    """Text on one line (runs of white space made one space), "-" when empty."""
    return " ".join(text.split()) or "-"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _record(delivery: Delivery) -> dict[str, Any]:
    """A delivery's raw fields for --json, with the times also in ISO 8601 (UTC)."""
    record = dataclasses.asdict(delivery)
    record["recipients"] = list(delivery.recipients)
    record["created_iso"] = iso_utc(delivery.created)
    record["next_try_iso"] = iso_utc(delivery.next_try)
    return record


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right: frozenset[int]) -> str:
    """Columns padded to their widest cell; those in ``right`` aligned right."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


# --- subcommands ------------------------------------------------------------------


async def _listing(state: str, spool: SpoolBackend, args: argparse.Namespace) -> int:
    entries = await spool.entries(state)
    if args.json:
        _print_json([_record(d) for d in entries])
        return 0
    dead = state == DEAD
    if not entries:
        print("the dead-letter queue is empty" if dead else "the queue is empty")
        return 0
    now = time.time()
    header = ["ID", "AGE", "ROUTE", "DESTINATION", "RECIPIENTS", "ATTEMPTS"]
    header += ["LAST ERROR"] if dead else ["NEXT TRY", "LAST ERROR"]
    rows = []
    for d in entries:
        row = [
            d.id,
            human_duration(now - d.created),
            d.route,
            d.destination,
            ",".join(d.recipients) or "-",
            str(d.attempts),
        ]
        if not dead:
            row.append(next_try_text(d.next_try, now))
        row.append(one_line(d.last_error))
        rows.append(row)
    print(table(header, rows, right=frozenset({1, 5})))
    oldest = human_duration(now - min(d.created for d in entries))
    if dead:
        print(f"{_plural(len(entries), 'dead letter', 'dead letters')}, oldest {oldest}")
    else:
        messages = len({d.queue_id for d in entries})
        print(
            f"{_plural(len(entries), 'delivery', 'deliveries')} of"
            f" {_plural(messages, 'message', 'messages')} queued, oldest {oldest}"
        )
    return 0


async def cmd_list(spool: SpoolBackend, args: argparse.Namespace, where: str) -> int:
    return await _listing(QUEUED, spool, args)


async def cmd_dead(spool: SpoolBackend, args: argparse.Namespace, where: str) -> int:
    return await _listing(DEAD, spool, args)


async def _find(spool: SpoolBackend, keys: Sequence[str], where: str) -> list[Delivery] | None:
    """The deliveries these keys name (see SpoolBackend.find), or None (having said
    which keys name nothing)."""
    found: dict[str, Delivery] = {}
    unknown: list[str] = []
    for key in dict.fromkeys(keys):
        named = await spool.find(key)
        if not named:
            unknown.append(key)
        for delivery in named:
            found.setdefault(delivery.id, delivery)
    for key in unknown:
        _error(
            f"no message or delivery with id {key} in {where}; "
            "'gateway queue list' and 'gateway queue dead' show the ids"
        )
    return None if unknown else list(found.values())


async def describe(spool: SpoolBackend, found: Sequence[Delivery]) -> tuple[dict[str, Any], str]:
    """What ``gateway queue show --json`` prints of a message and its deliveries (and the
    dashboard shows), and why its content could not be read ("" when it could)."""
    first = found[0]
    missing = ""
    message: Message | None = None
    try:
        message = await spool.load(first)
    except SpoolError as exc:
        missing = str(exc)
    header = getattr(message, "headers", None)
    header_text = header.to_bytes().decode("utf-8", "replace") if header is not None else ""
    deliveries = []
    for delivery in found:
        record = _record(delivery)
        record["history"] = [
            {"at": at, "at_iso": iso_utc(at), "event": ev}
            for at, ev in await spool.history(delivery.id)
        ]
        deliveries.append(record)
    record = {
        "queue_id": first.queue_id,
        "msgid": first.msgid,
        "created": first.created,
        "created_iso": iso_utc(first.created),
        "message": None
        if message is None
        else {
            "kind": message.kind.value,
            "sender": getattr(message, "sender", None),
            "listener": message.listener,
            "client": message.client,
            "header": header_text,
        },
        "deliveries": deliveries,
    }
    return record, missing


Fields = list[tuple[str, str]]


def show_fields(
    record: Mapping[str, Any], now: float
) -> tuple[Fields, list[tuple[str, Fields, Fields]]]:
    """A described message (see describe) as (name, value) lines for people: the message's,
    then per delivery its id, its lines and its history (time, event)."""
    head = [
        ("queue id", str(record["queue_id"])),
        ("message-id", str(record["msgid"] or "-")),
        (
            "created",
            f"{_local(record['created'])} ({human_duration(now - record['created'])} ago)",
        ),
    ]
    described = record["message"]
    if described is not None:
        head.append(("received from", f"{described['client'] or '-'} on {described['listener']}"))
        if described["sender"] is not None:
            head.append(("sender", f"<{described['sender']}>"))
    deliveries = []
    for d in record["deliveries"]:
        dead = d["state"] == DEAD
        fields = [
            ("id", str(d["id"])),
            ("state", "dead letter" if dead else str(d["state"])),
            ("route", str(d["route"])),
            ("destination", str(d["destination"])),
            ("recipients", ", ".join(d["recipients"]) or "-"),
            ("attempts", str(d["attempts"])),
        ]
        if not dead:
            when = next_try_text(d["next_try"], now)
            fields.append(("next try", f"{_local(d['next_try'])} ({when})"))
        if d["revived"]:
            fields.append(("revived", _local(d["revived"])))
        if d["bounced"]:
            fields.append(("bounced", "the sender has been sent a bounce for it"))
        fields.append(("last error", one_line(d["last_error"])))
        history = [(_local(h["at"]), one_line(h["event"])) for h in d["history"]]
        deliveries.append((str(d["id"]), fields, history))
    return head, deliveries


async def cmd_show(spool: SpoolBackend, args: argparse.Namespace, where: str) -> int:
    found = await _find(spool, [args.id], where)
    if found is None:
        return 1
    record, missing = await describe(spool, found)
    if args.json:
        _print_json(record)
    else:
        head, deliveries = show_fields(record, time.time())
        _print_fields(head, "")
        for delivery_id, fields, history in deliveries:
            print(f"\ndelivery {delivery_id}:")
            _print_fields(fields, "  ")
            print("  history:")
            for at, event in history:
                print(f"    {at}  {event}")
        print("\nheader:")
        described = record["message"]
        for line in (described["header"] if described else "").splitlines():
            print(f"  {line}")
    if missing:
        _error(missing)
        return 1
    return 0


def _print_fields(fields: Sequence[tuple[str, str]], indent: str) -> None:
    for name, value in fields:
        print(f"{indent}{name + ':':<15}{value}")


async def cmd_retry(spool: SpoolBackend, args: argparse.Namespace, where: str) -> int:
    if args.all == bool(args.ids):
        _error("name the deliveries to retry, or give --all (and not both)")
        return 2
    if args.all:
        stats = await spool.stats()
        if stats.queued + stats.dead == 0:
            print(f"nothing to retry: no deliveries in {where}")
            return 0
        revived = stats.dead
        wanted = stats.queued + stats.dead
        count = await spool.retry(None)
    else:
        found = await _find(spool, args.ids, where)
        if found is None:
            _error("nothing was changed")
            return 1
        revived = sum(d.state == DEAD for d in found)
        wanted = len(found)
        count = await spool.retry([d.id for d in found])
    text = f"{_plural(count, 'delivery is', 'deliveries are')} due now"
    if revived:
        text += f" ({revived} revived from the dead-letter queue)"
    print(f"{text}; {PICKUP}")
    if count < wanted:
        # The gateway finished them between our look and the change: nothing left to do.
        print(f"{wanted - count} left the spool meanwhile (delivered or dropped)")
    return 0


async def cmd_drop(spool: SpoolBackend, args: argparse.Namespace, where: str) -> int:
    found = await _find(spool, args.ids, where)
    if found is None:
        _error("nothing was dropped")
        return 1
    status = 0
    for d in found:
        if await spool.drop(d.id):
            what = "dead letter" if d.state == DEAD else "delivery"
            to = ",".join(d.recipients) or "-"
            print(f"dropped {what} {d.id} (route {d.route}, destination {d.destination}, to {to})")
        else:
            _error(f"{d.id} left the spool before it could be dropped (delivered meanwhile?)")
            status = 1
    return status


Subcommand = Callable[[SpoolBackend, argparse.Namespace, str], Coroutine[Any, Any, int]]

SUBCOMMANDS: dict[str, Subcommand] = {
    "list": cmd_list,
    "dead": cmd_dead,
    "show": cmd_show,
    "retry": cmd_retry,
    "drop": cmd_drop,
}
