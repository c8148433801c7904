"""``gateway queue`` as a real command against the spool of a real gateway process.

The gateway relays to an SMTP port where nothing listens (so its mail waits in
the queue, with a retry an hour away) and to an smtp-sink that refuses every
recipient with a 5xx (so its mail becomes a dead letter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory, SmtpSinkFactory
from tests.peers import (
    REPO_ROOT,
    GatewayProcess,
    SmtpSink,
    SwaksExit,
    free_port,
    swaks_send,
    wait_until,
)

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
QUEUED_TO = ["x0@down.test", "x1@down.test"]


def queue(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``gateway queue -c CONFIG ARGS`` from another folder than the config's."""
    elsewhere = config.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "queue", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        env=ENV,
    )


def queue_json(config: Path, *args: str) -> Any:
    out = queue(config, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@dataclass
class Spooled:
    gw: GatewayProcess
    config: Path
    spool: Path  # the spool file
    down_port: int  # where the queued mail would go; nothing listens there yet
    queued: dict[str, str]  # recipient -> delivery id
    dead: str  # the id of the dead letter
    queue_ids: dict[str, str]  # recipient -> the id in the SMTP answer "250 Ok: queued as ID"


@pytest.fixture
def spooled(
    tmp_path: Path, gateway_factory: GatewayFactory, smtp_sink_factory: SmtpSinkFactory
) -> Iterator[Spooled]:
    hard = smtp_sink_factory(hard_reject=["rcpt"])
    down, port = free_port(), free_port()
    gw = gateway_factory(f"""
version: 1
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{port}:interface=127.0.0.1
    hostname: gw.test
destinations:
  down:
    protocol: smtp
    connect: tcp:127.0.0.1:{down}
    tls: none
    retry_min: 1h
    retry_max: 1h
  hard:
    protocol: smtp
    connect: tcp:127.0.0.1:{hard.port}
    tls: none
routes:
  - name: to-down
    from: mail-in
    match: {{rcpt: '@down\\.test$'}}
    to: down
  - name: to-hard
    from: mail-in
    match: {{rcpt: '@hard\\.test$'}}
    to: hard
""")
    gw.start(port)
    queue_ids = {}
    for n, rcpt in enumerate([*QUEUED_TO, "x@hard.test"]):
        code, transcript = swaks_send(
            port, rcpt, headers={"Subject": f"spooled {n}", "Message-Id": f"<q{n}@client.test>"}
        )
        assert code == SwaksExit.OK, transcript
        queue_ids[rcpt] = re.findall(r"250 2\.0\.0 Ok: queued as (\w+)", transcript)[-1]
    config = gw.config_path

    def first_tries_done() -> tuple[list[Any], list[Any]] | None:
        queued, dead = queue_json(config, "list"), queue_json(config, "dead")
        tried = len(queued) == 2 and all(d["attempts"] >= 1 for d in queued)
        return (queued, dead) if tried and len(dead) == 1 else None

    queued, dead = wait_until(first_tries_done, "the first tries")
    yield Spooled(
        gw=gw,
        config=config,
        spool=tmp_path / "var" / "spool" / "spool.sqlite",
        down_port=down,
        queued={d["recipients"][0]: d["id"] for d in queued},
        dead=dead[0]["id"],
        queue_ids=queue_ids,
    )


def test_list_shows_the_queued_deliveries_in_aligned_columns(spooled: Spooled) -> None:
    out = queue(spooled.config, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header, rows, summary = lines[0], lines[1:-1], lines[-1]
    assert header.split() == [
        "ID", "AGE", "ROUTE", "DESTINATION", "RECIPIENTS", "ATTEMPTS", "NEXT", "TRY", "LAST", "ERROR",
    ]  # fmt: skip
    assert len(rows) == 2
    assert re.fullmatch(r"2 deliveries of 2 messages queued, oldest \d+[sm]", summary), summary
    for rcpt, row in zip(QUEUED_TO, rows, strict=True):
        assert row.startswith(spooled.queued[rcpt] + " ")
        cells = row.split(None, 7)
        assert re.fullmatch(r"\d+[sm]", cells[1]), row
        assert cells[2:5] == ["to-down", "down", rcpt]
        assert int(cells[5]) >= 1
        # Retries are an hour apart (+-20 %).
        assert re.fullmatch(r"in (4\d|5\d)m|in 1h", cells[6] + " " + cells[7].split()[0]), row
        # Aligned: every column starts where its heading does.
        for heading in ("ROUTE", "DESTINATION", "RECIPIENTS", "NEXT TRY", "LAST ERROR"):
            at = header.index(heading)
            assert row[at - 2 : at] == "  " and row[at] != " ", (heading, row)
        assert "connection refused" in row[header.index("LAST ERROR") :].lower()
    # The dead letter is not in the queue.
    assert spooled.dead not in out.stdout


def test_list_json_gives_the_raw_fields(spooled: Spooled) -> None:
    before = time.time()
    entries = queue_json(spooled.config, "list")
    assert [e["recipients"] for e in entries] == [[r] for r in QUEUED_TO]
    for entry in entries:
        assert entry["id"] == spooled.queued[entry["recipients"][0]]
        assert entry["state"] == "queued"
        assert entry["route"] == "to-down" and entry["destination"] == "down"
        assert entry["attempts"] >= 1
        assert "connection refused" in entry["last_error"].lower()
        assert before - 60 < entry["created"] <= before
        assert entry["next_try"] > before + 0.8 * 3600 - 60
        for name in ("created", "next_try"):
            parsed = datetime.fromisoformat(entry[f"{name}_iso"])
            assert parsed.utcoffset() is not None
            assert abs(parsed.timestamp() - entry[name]) < 1
    assert entries[0]["msgid"] == "<q0@client.test>"


def test_json_may_come_before_the_subcommand(spooled: Spooled) -> None:
    before = queue(spooled.config, "--json", "list")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == queue_json(spooled.config, "list")
    assert queue(spooled.config, "list").stdout.lstrip()[:1] != "["  # text without it


def test_show_prints_the_fields_the_history_and_the_header(spooled: Spooled) -> None:
    wanted = spooled.queued["x1@down.test"]
    out = queue(spooled.config, "show", wanted)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(rf"^queue id: +{spooled.queue_ids['x1@down.test']}$", text, re.M), text
    assert re.search(r"^message-id: +<q1@client\.test>$", text, re.M), text
    assert re.search(r"^sender: +<sender@client\.test>$", text, re.M)
    assert re.search(rf"^delivery {re.escape(wanted)}:$", text, re.M), text
    assert re.search(rf"^  id: +{re.escape(wanted)}$", text, re.M), text
    assert re.search(r"^  route: +to-down$", text, re.M)
    assert re.search(r"^  recipients: +x1@down\.test$", text, re.M)
    history = text.split("\n  history:\n")[1].split("\n\n")[0].splitlines()
    assert "accepted by route to-down" in history[0]
    assert "deferred: " in history[1] and "connection refused" in history[1].lower()
    header = text.split("\nheader:\n")[1]
    assert "  Subject: spooled 1\n" in header
    assert "  Message-Id: <q1@client.test>\n" in header

    shown = queue_json(spooled.config, "show", wanted)
    assert shown["queue_id"] == spooled.queue_ids["x1@down.test"]
    [delivery] = shown["deliveries"]
    assert delivery["id"] == wanted and delivery["attempts"] >= 1
    assert delivery["history"][0]["event"] == "accepted by route to-down"
    assert delivery["history"][1]["event"].startswith("deferred: ")
    assert shown["message"]["sender"] == "sender@client.test"
    assert "Subject: spooled 1\n" in shown["message"]["header"]


def test_the_id_in_the_smtp_answer_names_the_message_everywhere(spooled: Spooled) -> None:
    """'250 Ok: queued as ID': that ID is the one in the log, the listing and every command."""
    qid = spooled.queue_ids["x0@down.test"]
    assert spooled.queued["x0@down.test"] == f"{qid}.1"
    shown = queue_json(spooled.config, "show", qid)
    assert shown["queue_id"] == qid
    assert [d["id"] for d in shown["deliveries"]] == [f"{qid}.1"]
    # The Message-ID names it as well (as an NNTP answer gives it).
    assert queue_json(spooled.config, "show", "q0@client.test")["queue_id"] == qid
    # Every log line about the message carries id=QID.
    lines = [ln for ln in spooled.gw.log_text().splitlines() if qid in ln]
    assert any("outcome=queued" in ln for ln in lines), lines
    assert any("outcome=temporary" in ln for ln in lines), lines
    assert all(f"id={qid} " in ln for ln in lines if "id=" in ln), lines
    dead_qid = spooled.queue_ids["x@hard.test"]
    dead_lines = [ln for ln in spooled.gw.log_text().splitlines() if dead_qid in ln]
    # A refused delivery is logged once, as dead, not once as refused and once as dead.
    [dead_line] = [ln for ln in dead_lines if "destination=hard" in ln]
    assert f"id={dead_qid} delivery={dead_qid}.1 " in dead_line and "outcome=dead" in dead_line
    out = queue(spooled.config, "drop", qid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"dropped delivery {qid}.1 ")
    assert queue(spooled.config, "show", qid).returncode == 1


def test_show_of_an_unknown_id_exits_1(spooled: Spooled) -> None:
    out = queue(spooled.config, "show", "NOSUCHID")
    assert out.returncode == 1
    assert f"no message or delivery with id NOSUCHID in {spooled.spool}" in out.stderr
    assert out.stdout == ""


def test_dead_lists_the_dead_letters(spooled: Spooled) -> None:
    out = queue(spooled.config, "dead")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "AGE", "ROUTE", "DESTINATION", "RECIPIENTS", "ATTEMPTS", "LAST", "ERROR",
    ]  # fmt: skip
    [row] = lines[1:-1]
    assert row.split()[:6] == [spooled.dead, row.split()[1], "to-hard", "hard", "x@hard.test", "1"]
    assert "500" in row  # smtp-sink's refusal of the recipient
    assert re.fullmatch(r"1 dead letter, oldest \d+[sm]", lines[-1])
    [entry] = queue_json(spooled.config, "dead")
    assert entry["id"] == spooled.dead and entry["state"] == "dead"
    assert "answered 500 5.3.0" in entry["last_error"]
    out = queue(spooled.config, "show", spooled.dead)
    assert re.search(r"^  state: +dead letter$", out.stdout, re.M), out.stdout
    assert re.search(r"    .*  dead letter: .*answered 500 5\.3\.0", out.stdout), out.stdout


def test_retry_makes_deliveries_due_and_the_running_gateway_delivers_them(
    tmp_path: Path, spooled: Spooled
) -> None:
    with SmtpSink(tmp_path / "back", port=spooled.down_port).start() as sink:
        time.sleep(2)  # two polls of the spool: without a retry nothing is due for an hour
        assert sink.captured() == []
        out = queue(spooled.config, "retry", spooled.queued["x0@down.test"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("1 delivery is due now;")
        [first] = sink.wait_for(1, timeout=15)
        assert first.recipients == ["x0@down.test"]

        def one_left() -> list[Any] | None:
            entries = queue_json(spooled.config, "list")
            return entries if len(entries) == 1 else None

        [left] = wait_until(one_left, "the delivered one leaving the queue")
        assert left["id"] == spooled.queued["x1@down.test"]
        assert left["next_try"] > time.time() + 1800  # still waiting for its hour
        # --all also revives the dead letter; its upstream still refuses it.
        out = queue(spooled.config, "retry", "--all")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(
            "2 deliveries are due now (1 revived from the dead-letter queue);"
        ), out.stdout
        got = sink.wait_for(2, timeout=15)
        assert sorted(m.recipients[0] for m in got) == QUEUED_TO
    wait_until(
        lambda: queue(spooled.config, "list").stdout == "the queue is empty\n", "an empty queue"
    )
    # Revived, it began a new schedule: its one try since counts as the first.
    [dead] = wait_until(
        lambda: [d for d in queue_json(spooled.config, "dead") if d["revived"] > 0],
        "the second try of the dead letter",
    )
    assert dead["id"] == spooled.dead and dead["attempts"] == 1
    shown = queue_json(spooled.config, "show", spooled.dead)["deliveries"][0]
    events = [h["event"] for h in shown["history"]]
    assert events[0].startswith("accepted by route")
    assert events[1].startswith("dead letter: ") and events[3].startswith("dead letter: ")
    assert events[2] == "revived from the dead letters by 'gateway queue retry'"


def test_retry_of_an_unknown_id_changes_nothing_and_exits_1(spooled: Spooled) -> None:
    before = queue_json(spooled.config, "list")
    out = queue(spooled.config, "retry", spooled.queued["x0@down.test"], "NOSUCHID")
    assert out.returncode == 1
    assert f"no message or delivery with id NOSUCHID in {spooled.spool}" in out.stderr
    assert "nothing was changed" in out.stderr
    assert queue_json(spooled.config, "list") == before


def test_drop_removes_deliveries(spooled: Spooled) -> None:
    gone = spooled.queued["x0@down.test"]
    out = queue(spooled.config, "drop", gone, spooled.dead)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"dropped delivery {gone} (route to-down, destination down, to x0@down.test)",
        f"dropped dead letter {spooled.dead} (route to-hard, destination hard, to x@hard.test)",
    ]
    assert [e["id"] for e in queue_json(spooled.config, "list")] == [spooled.queued["x1@down.test"]]
    assert queue_json(spooled.config, "dead") == []
    assert queue(spooled.config, "show", gone).returncode == 1
    out = queue(spooled.config, "drop", gone)
    assert out.returncode == 1
    assert f"no message or delivery with id {gone} in {spooled.spool}" in out.stderr


def test_read_only_subcommands_leave_the_spool_as_it_was(spooled: Spooled) -> None:
    assert spooled.gw.stop() == 0  # a stopped gateway leaves the spool files still

    def state() -> dict[str, tuple[str, int]]:
        return {
            p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(spooled.spool.parent.iterdir())
            if p.is_file()
        }

    before = state()
    assert spooled.spool.name in before
    for args in (
        ["list"], ["list", "--json"], ["dead"], ["dead", "--json"],
        ["show", spooled.dead], ["show", spooled.queued["x0@down.test"], "--json"],
    ):  # fmt: skip
        out = queue(spooled.config, *args)
        assert out.returncode == 0, (args, out.stderr)
    assert state() == before


def test_no_spool_yet_exits_1_and_creates_nothing(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        "version: 1\nspool: queue-here\nlisteners:\n"
        "  in: {protocol: smtp, listen: 'tcp:2525:interface=127.0.0.1'}\n"
    )
    for args in (["list"], ["dead", "--json"], ["show", "X"], ["retry", "--all"], ["drop", "X"]):
        out = queue(config, *args)
        assert out.returncode == 1, args
        assert out.stderr == (
            f"error: no spool at {tmp_path / 'queue-here' / 'spool.sqlite'}"
            " (the gateway has not run with this configuration yet)\n"
        )
    assert not (tmp_path / "queue-here").exists()
