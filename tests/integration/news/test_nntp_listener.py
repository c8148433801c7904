"""The gateway's NNTP listener as a real process: clients over sockets, and INN2 feeding it.

Every test starts its own gateway on free ports of 127.0.0.1 with an
``nntp`` listener routed to a Maildir; the INN tests use the session's INN2
(tests/integration/news/conftest.py) and its own ``innxmit``.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.news.conftest import GROUP
from tests.peers import LOOPBACK, GatewayProcess, free_port
from tests.peers_news import NEWS_BIN, Inn, article_bytes, fresh_message_id, header_values
from tests.support.users import hashed

PLUGIN = """
from gateway.plugins import transform

@transform("fragile", accepts=["article"])
def fragile(msg, options):
    if b"explode" in msg.body:
        raise RuntimeError("this plugin cannot handle explosions")
    return msg
"""

BODY = b"line one\n.starts with a dot\n..two dots\n.\n8-bit: caf\xc3\xa9 \xff\n\n-- \nsig\n"


class Ports:
    def __init__(self) -> None:
        self.main = free_port()
        self.auth = free_port()
        self.deny = free_port()
        self.idle = free_port()
        self.big = free_port()

    def all(self) -> list[int]:
        return [self.main, self.auth, self.deny, self.idle, self.big]


def config_text(ports: Ports) -> str:
    return f"""
version: 1
plugins: [plugins]
shutdown_timeout: 20s
listeners:
  news-in:
    protocol: nntp
    listen: tcp:{ports.main}:interface=127.0.0.1
    hostname: gw.test
    max_size: 64KiB
    allow: [127.0.0.0/8]
  news-auth:
    protocol: nntp
    listen: tcp:{ports.auth}:interface=127.0.0.1
    hostname: gw.test
    users: {{feeder: '{hashed("s3cret")}'}}
    users_file: users.txt
    require_auth: true
    posting: false
  news-deny:
    protocol: nntp
    listen: tcp:{ports.deny}:interface=127.0.0.1
    allow: [10.0.0.0/8]
  news-idle:
    protocol: nntp
    listen: tcp:{ports.idle}:interface=127.0.0.1
    idle_timeout: 1s
  news-big:
    protocol: nntp
    listen: tcp:{ports.big}:interface=127.0.0.1
    hostname: gw.test
    max_size: 8MiB
destinations:
  box:
    protocol: maildir
    path: news
    retry_min: 1s
    retry_max: 2s
routes:
  - name: news
    from: [news-in, news-auth, news-idle, news-big]
    match: {{header: {{Newsgroups: '^(test|local)\\.'}}}}
    transforms: [fragile]
    to: box
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, Ports, Path]]:
    ports = Ports()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fragile.py").write_text(PLUGIN)
    (tmp_path / "users.txt").write_text(f"# peers\nreader:{hashed('pw2')}\n")
    path = tmp_path / "routes.yaml"
    path.write_text(config_text(ports))
    gw = GatewayProcess(path)
    gw.start(ports.all())
    try:
        yield gw, ports, tmp_path / "news"
    finally:
        gw.stop()


class Client:
    """A plain NNTP client over a socket, reading responses line by line."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.response()

    def close(self) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def response(self) -> tuple[int, str]:
        line = self.line()
        return int(line[:3]), line[4:].decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: str) -> tuple[int, str]:
        self.send(text.encode() + b"\r\n")
        return self.response()

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def wire(article: bytes) -> bytes:
    """Dot-stuffed CRLF block, written out here independently of the gateway's codec."""
    lines = article.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def maildir(box: Path) -> dict[str, bytes]:
    """Message-ID -> article of every file in the Maildir's new/."""
    found: dict[str, bytes] = {}
    new = box / "new"
    if new.is_dir():
        for path in new.iterdir():
            data = path.read_bytes()
            [mid] = header_values(data, "Message-ID")
            assert mid not in found, f"{mid} was delivered twice"
            found[mid] = data
    return found


def wait_maildir(box: Path, ids: set[str], timeout: float = 30.0) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        found = maildir(box)
        if ids <= set(found) or time.monotonic() > deadline:
            assert ids <= set(found), f"missing from the Maildir: {ids - set(found)}"
            return found
        time.sleep(0.05)


def body_of(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[1]


def test_post_ihave_and_streaming_reach_the_maildir(
    gateway: tuple[GatewayProcess, Ports, Path],
) -> None:
    _, ports, box = gateway
    client = Client(ports.main)
    assert client.greeting[0] == 200
    code, _ = client.command("CAPABILITIES")
    assert code == 101
    caps = []
    while (line := client.line()) != b".":
        caps.append(line.decode())
    assert caps[0] == "VERSION 2" and {"IHAVE", "STREAMING", "POST"} <= set(caps)

    posted = article_bytes("<unused@x>", GROUP, body=BODY).replace(b"Message-ID: <unused@x>\n", b"")
    assert client.command("POST")[0] == 340
    client.send(wire(posted))
    code, text = client.response()
    assert code == 240, text
    post_id = text.split()[-1]
    assert post_id.startswith("<") and post_id.endswith("@gw.test>")

    ihave_id = fresh_message_id("ihave")
    assert client.command(f"IHAVE {ihave_id}")[0] == 335
    relayed = article_bytes(ihave_id, GROUP, body=BODY, extra=[("Path", "peer.test!not-for-mail")])
    client.send(wire(relayed))
    assert client.response()[0] == 235

    # Streaming, pipelined: every answer comes in order and names its message-id.
    assert client.command("MODE STREAM")[0] == 203
    stream_ids = [fresh_message_id(f"s{n}") for n in range(5)]
    batch = b"".join(f"CHECK {mid}\r\n".encode() for mid in stream_ids)
    for mid in stream_ids:
        art = article_bytes(mid, GROUP, body=BODY, extra=[("Path", "peer.test!not-for-mail")])
        batch += f"TAKETHIS {mid}\r\n".encode() + wire(art)
    client.send(batch + b"QUIT\r\n")
    answers = [client.response() for _ in range(2 * len(stream_ids) + 1)]
    assert [(c, t.split()[0]) for c, t in answers[:5]] == [(238, m) for m in stream_ids]
    assert [(c, t.split()[0]) for c, t in answers[5:10]] == [(239, m) for m in stream_ids]
    assert answers[10][0] == 205

    found = wait_maildir(box, {post_id, ihave_id, *stream_ids})
    assert len(found) == 7
    for data in found.values():
        assert body_of(data) == BODY
    post = found[post_id]
    assert header_values(post, "Path") == ["gw.test!.POSTED.127.0.0.1!not-for-mail"]
    assert header_values(post, "Injection-Info") == ['gw.test; posting-host="127.0.0.1"']
    assert len(header_values(post, "Injection-Date")) == 1
    assert header_values(found[ihave_id], "Path") == ["gw.test!peer.test!not-for-mail"]


def test_duplicates_refusals_and_bad_input(gateway: tuple[GatewayProcess, Ports, Path]) -> None:
    _, ports, box = gateway
    client = Client(ports.main)
    mid = fresh_message_id("dup")
    art = article_bytes(mid, GROUP, extra=[("Path", "peer.test!not-for-mail")])
    assert client.command(f"IHAVE {mid}")[0] == 335
    client.send(wire(art))
    assert client.response()[0] == 235
    assert client.command(f"IHAVE {mid}")[0] == 435
    assert client.command(f"CHECK {mid}") == (438, f"{mid} duplicate: article already received")
    client.send(f"TAKETHIS {mid}\r\n".encode() + wire(art))
    code, text = client.response()
    assert code == 439 and text.startswith(mid)

    # No route for the group: refused for good, in each command's terms.
    other = fresh_message_id("noroute")
    art = article_bytes(other, "alt.elsewhere", extra=[("Path", "peer.test!not-for-mail")])
    assert client.command(f"IHAVE {other}")[0] == 335
    client.send(wire(art))
    assert client.response()[0] == 437
    assert client.command("POST")[0] == 340
    client.send(wire(art))
    assert client.response()[0] == 441

    # Bad input never ends the session.
    assert client.command("FROBNICATE")[0] == 500
    assert client.command("IHAVE not-a-message-id")[0] == 501
    assert client.command("IHAVE <" + "x" * 600 + "@y>")[0] == 501
    client.send(b"A" * 100_000 + b"\r\n")
    assert client.response()[0] == 501
    assert client.command("DATE")[0] == 111
    big = fresh_message_id("big")
    art = article_bytes(big, GROUP, body=b"x" * 100 + b"\n" * 1000, extra=[("Path", "p!x")])
    art += (b"y" * 70 + b"\n") * 1000  # over the listener's 64 KiB
    client.send(f"TAKETHIS {big}\r\n".encode() + wire(art) + b"DATE\r\n")
    code, text = client.response()
    assert code == 439 and text.startswith(big) and "too large" in text
    assert client.response()[0] == 111
    assert client.command(f"IHAVE {big}")[0] == 335
    client.send(wire(art))
    assert client.response()[0] == 437
    # An article without a Message-ID, or with another one than the command's.
    nomid = fresh_message_id("nomid")
    client.send(
        f"TAKETHIS {nomid}\r\n".encode()
        + wire(article_bytes("<x@y>", GROUP, extra=[("Path", "p!x")]))
    )
    code, text = client.response()
    assert code == 439 and "does not match" in text
    assert client.command("QUIT")[0] == 205
    time.sleep(0.5)
    assert set(maildir(box)) == {mid}


def test_temporary_failure_of_takethis_closes_and_loses_nothing(
    gateway: tuple[GatewayProcess, Ports, Path],
) -> None:
    _, ports, box = gateway
    client = Client(ports.main)
    first, fragile, after = (fresh_message_id(t) for t in ("first", "fragile", "after"))
    stream = b""
    for mid, body in ((first, b"fine\n"), (fragile, b"explode\n"), (after, b"fine\n")):
        art = article_bytes(mid, GROUP, body=body, extra=[("Path", "peer.test!not-for-mail")])
        stream += f"TAKETHIS {mid}\r\n".encode() + wire(art)
    client.send(stream)
    assert client.response() == (239, f"{first} Article received")
    code, text = client.response()
    assert code == 400 and "explosions" in text
    assert client.closed_by_server()
    # The third article was never acknowledged: the peer still has it and sends it again.
    again = Client(ports.main)
    art = article_bytes(after, GROUP, body=b"fine\n", extra=[("Path", "peer.test!not-for-mail")])
    again.send(f"TAKETHIS {after}\r\n".encode() + wire(art))
    assert again.response()[0] == 239
    assert set(wait_maildir(box, {first, after})) == {first, after}


def test_auth_posting_allow_and_idle_timeout(gateway: tuple[GatewayProcess, Ports, Path]) -> None:
    gw, ports, box = gateway
    client = Client(ports.auth)
    assert client.greeting[0] == 201
    mid = fresh_message_id("auth")
    assert client.command(f"IHAVE {mid}")[0] == 480
    assert client.command("AUTHINFO PASS s3cret")[0] == 482
    assert client.command("AUTHINFO USER feeder")[0] == 381
    assert client.command("AUTHINFO PASS wrong")[0] == 481
    assert client.command(f"CHECK {mid}")[0] == 480
    assert client.command("AUTHINFO USER reader")[0] == 381  # from users_file
    assert client.command("AUTHINFO PASS pw2")[0] == 281
    assert client.command("AUTHINFO USER feeder")[0] == 502
    assert client.command("POST")[0] == 440
    assert client.command(f"IHAVE {mid}")[0] == 335
    client.send(wire(article_bytes(mid, GROUP, extra=[("Path", "peer.test!not-for-mail")])))
    assert client.response()[0] == 235
    wait_maildir(box, {mid})

    denied = Client(ports.deny)
    assert denied.greeting == (502, "Access denied for 127.0.0.1")
    assert denied.closed_by_server()

    idle = Client(ports.idle)
    assert idle.greeting[0] == 200
    started = time.monotonic()
    assert idle.response()[0] == 400
    assert idle.closed_by_server()
    assert time.monotonic() - started < 10
    assert gw.is_running()


def test_five_megabyte_article(gateway: tuple[GatewayProcess, Ports, Path]) -> None:
    _, ports, box = gateway
    client = Client(ports.big, timeout=120)
    body = b"".join(b".%07d " % n + b"\xe2\x82\xac" * 20 + b"\n" for n in range(75_000))
    assert 5_000_000 < len(body) < 8_000_000
    mid = fresh_message_id("big")
    art = article_bytes(mid, GROUP, body=body, extra=[("Path", "peer.test!not-for-mail")])
    assert client.command(f"IHAVE {mid}")[0] == 335
    started = time.monotonic()
    client.send(wire(art))
    assert client.response()[0] == 235
    assert time.monotonic() - started < 60
    found = wait_maildir(box, {mid}, timeout=60)
    assert body_of(found[mid]) == body


def test_acknowledged_article_survives_a_crash(tmp_path: Path) -> None:
    """The 239 comes only once the article is in the spool: a kill -9 right after loses nothing."""
    ports = Ports()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fragile.py").write_text(PLUGIN)
    (tmp_path / "users.txt").write_text("")
    # The Maildir's parent is a file at first, so delivery fails and the article stays spooled.
    (tmp_path / "blocker").write_text("not a folder")
    text = config_text(ports).replace("path: news", "path: blocker/news")
    text = text.replace(
        f"    users: {{feeder: '{hashed('s3cret')}'}}\n    users_file: users.txt\n", ""
    )
    text = text.replace("    require_auth: true\n", "")
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    gw = GatewayProcess(path)
    gw.start(ports.all())
    try:
        client = Client(ports.main)
        mid = fresh_message_id("crash")
        art = article_bytes(mid, GROUP, body=BODY, extra=[("Path", "peer.test!not-for-mail")])
        client.send(f"TAKETHIS {mid}\r\n".encode() + wire(art))
        assert client.response()[0] == 239
        gw.kill9()
        gw.wait()
        (tmp_path / "blocker").unlink()
        (tmp_path / "blocker").mkdir()
        gw.start(ports.all())
        found = wait_maildir(tmp_path / "blocker" / "news", {mid}, timeout=60)
        assert body_of(found[mid]) == BODY
    finally:
        gw.stop()


# --------------------------------------------------------------------------- INN2 feeds us


def _inn_batch(inn: Inn, ids: list[str]) -> Path:
    """A batch file of storage tokens that the news user can read and rewrite."""
    folder = Path(tempfile.mkdtemp(prefix="gw-innxmit-"))
    shutil.chown(folder, "news", "news")
    lines = []
    for mid in ids:
        found = subprocess.run(
            ["su", "news", "-s", "/bin/sh", "-c", f"{NEWS_BIN / 'grephistory'} '{mid}'"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        token = found.stdout.strip()
        assert found.returncode == 0 and token.startswith("@"), f"{mid}: {found}"
        lines.append(f"{token} {mid}\n")
    batch = folder / "batch"
    batch.write_text("".join(lines))
    shutil.chown(batch, "news", "news")
    return batch


def _innxmit(port: int, batch: Path, *flags: str) -> str:
    program = NEWS_BIN / "innxmit"
    assert program.exists(), f"{program} is missing: install the inn2 package"
    command = " ".join([str(program), "-d", "-t", "30", "-T", "120", *flags, "-P", str(port)])
    result = subprocess.run(
        ["su", "news", "-s", "/bin/sh", "-c", f"{command} 127.0.0.1 {batch}"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"innxmit failed: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["stream", "takethis", "ihave"])
def test_inn_feeds_the_listener_with_innxmit(
    inn: Inn, gateway: tuple[GatewayProcess, Ports, Path], mode: str
) -> None:
    _, ports, box = gateway
    ids = [fresh_message_id(f"inn-{mode}{n}") for n in range(4)]
    bodies = [BODY, b".\n..\n.x\n", b"x" * 2000 + b"\n", b"\n\nlast\n"]
    for mid, body in zip(ids, bodies, strict=True):
        code, text = inn.post(article_bytes(mid, GROUP, subject=f"feed {mode}", body=body))
        assert code == 240, f"INN refused the article: {code} {text}"
    stored = {mid: inn.wait_for_article(mid) for mid in ids}
    flags = {"stream": (), "takethis": ("-c",), "ihave": ("-s",)}[mode]
    log = _innxmit(ports.main, _inn_batch(inn, ids), *flags)
    if mode == "ihave":
        assert "TAKETHIS" not in log and log.count("< 235 ") == len(ids), log
    else:
        assert "MODE STREAM" in log, log
        assert ("CHECK" in log) == (mode == "stream"), log
        for mid in ids:
            assert f"< 239 {mid}" in log, log
    found = wait_maildir(box, set(ids))
    for mid in ids:
        got = found[mid]
        assert body_of(got) == body_of(stored[mid])
        [path] = header_values(got, "Path")
        assert path.startswith("gw.test!") and "inn.localdomain" in path
    # A second feed of the same articles is refused as duplicates; nothing is delivered twice.
    log = _innxmit(ports.main, _inn_batch(inn, ids), *flags)
    duplicate = {"stream": "438 {}", "takethis": "439 {}", "ihave": "435 "}[mode]
    for mid in ids:
        assert f"< {duplicate.format(mid)}" in log, log
    time.sleep(0.5)
    assert set(maildir(box)) == set(ids)
    assert os.path.exists(box / "new")


def test_shutdown_tells_idle_clients_and_finishes_a_transfer(
    gateway: tuple[GatewayProcess, Ports, Path],
) -> None:
    gw, ports, box = gateway
    idle = Client(ports.main)
    busy = Client(ports.main)
    mid = fresh_message_id("drain")
    art = article_bytes(mid, GROUP, body=BODY, extra=[("Path", "peer.test!not-for-mail")])
    assert busy.command(f"IHAVE {mid}")[0] == 335
    data = wire(art)
    busy.send(data[:50])  # the transfer is under way when the stop comes
    mark = gw.log_mark()
    gw.term()
    gw.wait_for_log("shutting down", since=mark)
    code, text = idle.response()
    assert code == 400 and "shutting down" in text
    assert idle.closed_by_server()
    busy.send(data[50:])
    assert busy.response()[0] == 235
    assert gw.wait() == 0
    # Delivered before the stop, or from the spool after the next start.
    gw.start(ports.all())
    assert set(wait_maildir(box, {mid})) == {mid}


def _malformed(message_id: str, variant: str) -> bytes:
    """An article with one defect, LF line endings."""
    lines = [
        b"Path: peer.test!not-for-mail",
        b"From: Tester <tester@client.test>",
        b"Newsgroups: " + GROUP.encode(),
        b"Subject: malformed " + variant.encode(),
        b"Date: " + email.utils.formatdate(usegmt=True).encode(),
        b"Message-ID: " + message_id.encode(),
    ]
    body = [b"", b"body line"]
    if variant == "no colon":
        lines.insert(3, b"This line has no colon")
    elif variant == "space before colon":
        lines.insert(3, b"X-Note : spaced")
    elif variant == "nul in header":
        lines[3] = b"Subject: a \x00 nul"
    elif variant == "nul in body":
        body = [b"", b"a \x00 nul"]
    elif variant == "no body":
        body = []
    return b"\n".join(lines + body) + b"\n"


@pytest.mark.parametrize(
    "variant", ["no colon", "space before colon", "nul in header", "nul in body", "no body"]
)
def test_malformed_articles_are_refused_as_inn_refuses_them(
    gateway: tuple[GatewayProcess, Ports, Path], inn: Inn, variant: str
) -> None:
    """Defect: a header line without a colon, a NUL, or no header/body separator were
    accepted with 235/240 (the bad line and what followed became the body). INN refuses
    each with 437 to IHAVE and 441 to POST; the gateway answers the same codes, and the
    same words for IHAVE."""
    _, ports, box = gateway
    answers: dict[str, list[tuple[int, str]]] = {}
    for server, port in (("inn", inn.port), ("gateway", ports.main)):
        client = Client(port)
        try:
            message_id = fresh_message_id("malformed")
            assert client.command(f"IHAVE {message_id}")[0] == 335
            client.send(wire(_malformed(message_id, variant)))
            ihave = client.response()
            posted = _malformed(fresh_message_id("malformed"), variant).replace(
                b"Path: peer.test!not-for-mail\n", b""
            )
            if server == "inn":
                assert client.command("MODE READER")[0] in (200, 201)
            assert client.command("POST")[0] == 340
            client.send(wire(posted))
            answers[server] = [ihave, client.response()]
        finally:
            client.close()
    assert [code for code, _ in answers["gateway"]] == [437, 441]
    assert [code for code, _ in answers["inn"]] == [437, 441]
    assert answers["gateway"][0][1] == answers["inn"][0][1]
    assert maildir(box) == {}
