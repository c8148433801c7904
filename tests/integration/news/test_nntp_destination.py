"""The nntp destination against a real INN2: post, ihave and stream modes, duplicates,
a moderated group, INN stopped and back, and AUTHINFO.

Articles reach the gateway over its own NNTP listener (IHAVE, like a peer
feeding it) and leave through the destination under test.  INN's readers.conf
in the fixture authenticates by address only, so AUTHINFO is tested against
the gateway's own NNTP listener with ``require_auth`` (a second listener of the
same gateway), the way a news peer with accounts would answer.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.news.conftest import GROUP, MODERATED_GROUP
from tests.peers import GatewayProcess, free_port, make_tls_cert
from tests.peers_news import Inn, NntpConnection, article_bytes, fresh_message_id, header_values
from tests.support.users import hashed

FEEDS = (
    "post", "ihave", "stream", "auth-good", "auth-bad", "tls-feed", "tls-bad-feed",
    "auth-in", "tls-in",
)  # fmt: skip


class Gateway:
    def __init__(self, process: GatewayProcess, ports: dict[str, int], root: Path) -> None:
        self.process = process
        self.ports = ports
        self.root = root

    def offer(self, feed: str, article: bytes) -> tuple[int, str]:
        """IHAVE the article to the gateway listener ``feed``; the final reply."""
        msgid = header_values(article, "Message-ID")[0]
        with NntpConnection(self.ports[feed], reader=False) as conn:
            code, text = conn.command(f"IHAVE {msgid}")
            if code != 335:
                return code, text
            lines = article.split(b"\n")
            if lines[-1] == b"":
                lines.pop()
            payload = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
            conn.sock.sendall(payload + b".\r\n")
            return conn.reply()

    def outcomes(self, msgid: str, destination: str, since: int = 0) -> list[str]:
        return [
            line
            for line in self.process.log_text(since).splitlines()
            if f"msgid={msgid} " in line
            and f"destination={destination} " in line
            and " outcome=" in line
        ]

    def wait_outcome(
        self, msgid: str, destination: str, outcome: str, timeout: float = 60.0
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.outcomes(msgid, destination):
                if f"outcome={outcome} " in line:
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no outcome={outcome} for {msgid} at {destination} in {timeout} s;"
                    f" seen: {self.outcomes(msgid, destination)}\n{self.process.log_text()[-3000:]}"
                )
            time.sleep(0.1)


def transit_article(msgid: str, group: str = GROUP, **kw: object) -> bytes:
    return article_bytes(msgid, group, extra=[("Path", "feeder.test!not-for-mail")], **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, inn_server: Inn) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("nntp-destination")
    ports = {name: free_port() for name in FEEDS}
    inn = f"tcp:127.0.0.1:{inn_server.port}"
    retry = (
        "retry_min: 1s\n    retry_max: 2s\n    connect_timeout: 5s\n    timeout: 30s\n"
        "    idle_timeout: 1s"
    )
    listeners = "".join(
        f"  {name}:\n    protocol: nntp\n    listen: tcp:{port}:interface=127.0.0.1\n"
        f"    hostname: gw-{name}.test\n"
        for name, port in ports.items()
        if name not in ("auth-in", "tls-in")
    )
    cert, key = make_tls_cert(root / "tls")
    ca_dir = root / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(cert.read_bytes())
    other_cert, _ = make_tls_cert(root / "other-tls")
    other_ca_dir = root / "other-ca"
    other_ca_dir.mkdir()
    (other_ca_dir / "ca.pem").write_bytes(other_cert.read_bytes())
    config = f"""
version: 1
spool: spool
listeners:
{listeners}  auth-in:
    protocol: nntp
    listen: tcp:{ports["auth-in"]}:interface=127.0.0.1
    hostname: gw-auth.test
    users: {{gw: '{hashed("right")}'}}
    require_auth: true
  tls-in:
    protocol: nntp
    listen: ssl:{ports["tls-in"]}:interface=127.0.0.1:privateKey={key}:certKey={cert}
    hostname: gw-tls.test
destinations:
  inn-post:
    protocol: nntp
    connect: {inn}
    mode: post
    {retry}
  inn-ihave:
    protocol: nntp
    connect: {inn}
    mode: ihave
    {retry}
  inn-stream:
    protocol: nntp
    connect: {inn}
    mode: stream
    max_connections: 2
    {retry}
  self-good:
    protocol: nntp
    connect: tcp:127.0.0.1:{ports["auth-in"]}
    mode: ihave
    user: gw
    password: right
    {retry}
  self-bad:
    protocol: nntp
    connect: tcp:127.0.0.1:{ports["auth-in"]}
    mode: stream
    user: gw
    password: wrong
    {retry}
  self-tls:
    protocol: nntp
    connect: ssl:host=127.0.0.1:port={ports["tls-in"]}:caCertsDir={ca_dir}:hostname=localhost
    mode: ihave
    {retry}
  self-tls-bad:
    protocol: nntp
    connect: ssl:host=127.0.0.1:port={ports["tls-in"]}:caCertsDir={other_ca_dir}:hostname=localhost
    mode: ihave
    {retry}
  box:
    protocol: maildir
    path: box
routes:
  - {{name: post, from: post, to: inn-post}}
  - {{name: ihave, from: ihave, to: inn-ihave}}
  - {{name: stream, from: stream, to: inn-stream}}
  - {{name: auth-good, from: auth-good, to: self-good}}
  - {{name: auth-bad, from: auth-bad, to: self-bad}}
  - {{name: auth-in, from: auth-in, to: box}}
  - {{name: tls-feed, from: tls-feed, to: self-tls}}
  - {{name: tls-in, from: tls-in, to: box}}
  - {{name: tls-bad-feed, from: tls-bad-feed, to: self-tls-bad}}
"""
    path = root / "routes.yaml"
    path.write_text(config)
    process = GatewayProcess(path)
    with process:
        process.start(list(ports.values()))
        yield Gateway(process, ports, root)


@pytest.mark.parametrize("mode", ["post", "ihave", "stream"])
def test_article_reaches_inn(gateway: Gateway, inn: Inn, mode: str) -> None:
    mid = fresh_message_id(mode)
    body = b".starts with a dot\n..two\n\xc3\xa4 8-bit\n"
    assert gateway.offer(mode, transit_article(mid, body=body))[0] == 235
    line = gateway.wait_outcome(mid, f"inn-{mode}", "delivered")
    expected = {"post": "240", "ihave": "235", "stream": "239"}[mode]
    assert f"answered {expected}" in line
    # Log lines of an article say where it goes: its newsgroups.
    assert f" to={GROUP} " in line
    queued = [ln for ln in gateway.process.log_text().splitlines() if "outcome=queued" in ln]
    assert any(f"msgid={mid} " in ln and f" to={GROUP} " in ln for ln in queued), queued
    assert inn.stat(mid) == 223
    stored = inn.wait_for_article(mid)
    assert stored.split(b"\n\n", 1)[1] == body
    assert header_values(stored, "Path")[0].startswith("inn.localdomain!")


@pytest.mark.parametrize("mode", ["post", "ihave", "stream"])
def test_article_inn_already_has_counts_as_delivered(gateway: Gateway, inn: Inn, mode: str) -> None:
    mid = fresh_message_id(f"dup-{mode}")
    assert inn.post(article_bytes(mid, GROUP))[0] == 240
    assert gateway.offer(mode, transit_article(mid))[0] == 235
    line = gateway.wait_outcome(mid, f"inn-{mode}", "delivered")
    expected = {"post": "441 435", "ihave": "435", "stream": "438"}[mode]
    assert f"answered {expected}" in line and "already has this Message-ID" in line
    assert len(gateway.outcomes(mid, f"inn-{mode}")) == 1


def test_stream_many_articles(gateway: Gateway, inn: Inn) -> None:
    mids = [fresh_message_id(f"many{i}") for i in range(30)]
    for mid in mids:
        assert gateway.offer("stream", transit_article(mid))[0] == 235
    for mid in mids:
        assert "answered 239" in gateway.wait_outcome(mid, "inn-stream", "delivered")
    assert all(inn.stat(mid) == 223 for mid in mids)


def test_moderated_group_post_goes_to_the_moderator(gateway: Gateway, inn: Inn) -> None:
    mid = fresh_message_id("mod-post")
    assert gateway.offer("post", transit_article(mid, MODERATED_GROUP))[0] == 235
    line = gateway.wait_outcome(mid, "inn-post", "delivered")
    assert "answered 240" in line
    capture = inn.wait_for_mta(mid.encode())
    assert any("test-gateway-moderated@localhost" in r for r in capture.recipients)
    assert inn.stat(mid) == 430  # INN mailed it rather than storing it


def test_moderated_group_ihave_without_approved_is_a_dead_letter(
    gateway: Gateway, inn: Inn
) -> None:
    mid = fresh_message_id("mod-ihave")
    assert gateway.offer("ihave", transit_article(mid, MODERATED_GROUP))[0] == 235
    line = gateway.wait_outcome(mid, "inn-ihave", "dead")
    assert "answered 437" in line
    # One line for the refused try: it is the dead letter's.
    [only] = gateway.outcomes(mid, "inn-ihave")
    assert " outcome=dead " in only
    assert inn.stat(mid) == 430


def test_post_refused_by_inn_keeps_inn_reason(gateway: Gateway, inn: Inn) -> None:
    mid = fresh_message_id("old")
    old = transit_article(mid).replace(
        header_values(transit_article(mid), "Date")[0].encode(), b"Mon, 01 Jan 2001 00:00:00 GMT"
    )
    assert gateway.offer("post", old)[0] == 235
    line = gateway.wait_outcome(mid, "inn-post", "dead")
    assert "answered 441" in line and "past" in line


def test_inn_stopped_then_back(gateway: Gateway, inn: Inn) -> None:
    mids = {mode: fresh_message_id(f"down-{mode}") for mode in ("post", "ihave", "stream")}
    # Let pooled sessions idle out: INN's reader processes outlive innd and would
    # take a POST (spooling it) while innd is down.
    time.sleep(2.5)
    inn.stop()
    try:
        for mode, mid in mids.items():
            assert gateway.offer(mode, transit_article(mid))[0] == 235
        for mode, mid in mids.items():
            line = gateway.wait_outcome(mid, f"inn-{mode}", "temporary")
            assert "connection refused" in line or "not trying" in line
        time.sleep(2)  # a few more tries against the stopped server
    finally:
        inn.start()
    for mode, mid in mids.items():
        gateway.wait_outcome(mid, f"inn-{mode}", "delivered", timeout=120)
        assert inn.stat(mid) == 223


def test_authinfo_accepted(gateway: Gateway) -> None:
    mid = fresh_message_id("auth")
    assert gateway.offer("auth-good", transit_article(mid))[0] == 235
    line = gateway.wait_outcome(mid, "self-good", "delivered")
    assert "answered 235" in line
    gateway.wait_outcome(mid, "box", "delivered")
    files = list((gateway.root / "box" / "new").iterdir())
    assert any(mid.encode() in f.read_bytes() for f in files)


def test_authinfo_refused_is_temporary_and_retried(gateway: Gateway) -> None:
    mid = fresh_message_id("badauth")
    assert gateway.offer("auth-bad", transit_article(mid))[0] == 235
    line = gateway.wait_outcome(mid, "self-bad", "temporary")
    assert "refused AUTHINFO for 'gw': 481" in line
    # The listener without a login answers 480: the gateway says what to configure.
    with NntpConnection(gateway.ports["auth-in"], reader=False) as conn:
        assert conn.command(f"IHAVE {mid}")[0] == 480


def test_nntps_with_a_verified_certificate(gateway: Gateway) -> None:
    mid = fresh_message_id("tls")
    assert gateway.offer("tls-feed", transit_article(mid))[0] == 235
    line = gateway.wait_outcome(mid, "self-tls", "delivered")
    assert "answered 235" in line
    gateway.wait_outcome(mid, "box", "delivered")


def test_nntps_certificate_from_another_ca_is_refused(gateway: Gateway) -> None:
    mid = fresh_message_id("tls-bad")
    assert gateway.offer("tls-bad-feed", transit_article(mid))[0] == 235
    line = gateway.wait_outcome(mid, "self-tls-bad", "temporary")
    assert "certificate verify failed" in line
    assert not gateway.outcomes(mid, "box")


def test_the_inn_the_tests_run_reads_no_load_limit(inn: Inn) -> None:
    """A loaded CI machine made nnrpd answer "400 load at 17.35, try later" to MODE READER:
    the fixture's inn.conf turns the limit off, as INN itself reads it."""
    out = subprocess.run(
        ["/usr/lib/news/bin/innconfval", "nnrpdloadlimit"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
