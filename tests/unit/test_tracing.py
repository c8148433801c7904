"""The tracer behind ``gateway trace``: nothing when no one watches, filters, slow readers."""

from __future__ import annotations

from typing import Any

from gateway.tracing import BACKLOG, Tracer, Watcher, describe


def test_events_go_to_the_watchers_that_want_them_and_stop_with_them() -> None:
    tracer = Tracer()
    assert not tracer.active
    tracer.emit("routed", routes=["a"])  # nobody watches: nothing kept anywhere
    got: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    stop_all = tracer.watch(Watcher(lambda e: got.append(e) or True))
    tracer.watch(Watcher(lambda e: mine.append(e) or True, route="b", listener="in"))
    assert tracer.active
    tracer.emit("routed", routes=["a"], listener="in")
    tracer.emit("routed", routes=["b"], listener="other")
    tracer.emit("routed", routes=["b"], listener="in", client="192.0.2.7")
    tracer.emit("delivery", route="b", listener="in")
    assert [e["routes"] if "routes" in e else e["route"] for e in got] == [["a"], ["b"], ["b"], "b"]
    assert [e.get("client") for e in mine] == ["192.0.2.7", None]
    stop_all()
    tracer.emit("routed", routes=["a"])
    assert len(got) == 4


def test_match_finds_text_anywhere_in_the_event() -> None:
    tracer = Tracer()
    got: list[dict[str, Any]] = []
    tracer.watch(Watcher(lambda e: got.append(e) or True, match="bob@"))
    tracer.emit("routed", to=["alice@example.test"])
    tracer.emit("routed", to=["bob@example.test"])
    assert [e["to"] for e in got] == [["bob@example.test"]]


def test_a_slow_watcher_gets_its_backlog_later_and_is_told_what_it_lost() -> None:
    tracer = Tracer()
    got: list[dict[str, Any]] = []
    ready = {"now": False}

    def send(event: dict[str, Any]) -> bool:
        if ready["now"]:
            got.append(event)
        return ready["now"]

    watcher = Watcher(send)
    tracer.watch(watcher)
    for n in range(BACKLOG + 5):
        tracer.emit("routed", n=n)
    assert got == [] and watcher.dropped == 5
    ready["now"] = True
    tracer.flush(watcher)
    assert got[0]["event"] == "dropped" and got[0]["count"] == 5
    assert [e["n"] for e in got[1:]] == list(range(BACKLOG))
    tracer.emit("routed", n="next")
    assert got[-1]["n"] == "next"


def test_describe_is_one_line_with_the_steps_below() -> None:
    text = describe(
        {"at": 0, "event": "routed", "id": "Q1", "to": ["a@x", "b@x"], "detail": "",
         "steps": ["route 'r' matches"]}
    )  # fmt: skip
    first, step = text.split("\n")
    assert first.endswith(" routed id=Q1 to=a@x,b@x")
    assert step == "    route 'r' matches"
