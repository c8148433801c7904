"""STARTTLS and implicit TLS on the SMTP and NNTP listeners, with real clients.

swaks (--tls, --tlsc), openssl s_client (-starttls smtp|nntp), testssl.sh over
STARTTLS, a private Postfix that relays to the gateway with
smtp_tls_security_level = encrypt, and raw sockets for what clients must not
get away with (commands pipelined behind STARTTLS).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.peers import (
    LOOPBACK,
    TESTSSL_IGNORED,
    GatewayProcess,
    PostfixRelay,
    SwaksExit,
    free_port,
    make_ca_signed_cert,
    require_binary,
    run_testssl,
    swaks_send,
    tls_session_resumed,
    wait_until,
)
from tests.support.tls import write_certificate


@dataclasses.dataclass(frozen=True)
class Gateway:
    process: GatewayProcess
    ports: dict[str, int]
    ca: Path
    box: Path
    root: Path


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("starttls")
    ca, chain, key = make_ca_signed_cert(root / "pki")
    names = ("smtp", "smtp_required", "smtps", "nntp", "nntp_required", "nntps")
    ports = {name: free_port() for name in names}
    tls = f"{{certificate: '{chain}', key: '{key}'}}"
    required = f"{{certificate: '{chain}', key: '{key}', require: true}}"
    path = root / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  smtp: {{protocol: smtp, listen: "tcp:{ports["smtp"]}:interface=127.0.0.1", hostname: gw.test, tls: {tls}}}
  smtp_required: {{protocol: smtp, listen: "tcp:{ports["smtp_required"]}:interface=127.0.0.1", hostname: gw.test, tls: {required}}}
  smtps: {{protocol: smtp, listen: "tls:{ports["smtps"]}:interface=127.0.0.1", hostname: gw.test, tls: {tls}}}
  nntp: {{protocol: nntp, listen: "tcp:{ports["nntp"]}:interface=127.0.0.1", hostname: gw.test, tls: {tls}}}
  nntp_required: {{protocol: nntp, listen: "tcp:{ports["nntp_required"]}:interface=127.0.0.1", hostname: gw.test, tls: {required}}}
  nntps: {{protocol: nntp, listen: "tls:{ports["nntps"]}:interface=127.0.0.1", hostname: gw.test, tls: {tls}}}
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: [smtp, smtp_required, smtps, nntp, nntp_required, nntps], to: box}}
"""
    )
    process = GatewayProcess(path)
    process.start(list(ports.values()))
    try:
        yield Gateway(process, ports, ca, root / "box", root)
    finally:
        process.stop()


def delivered(box: Path, marker: str, timeout: float = 15.0) -> bytes:
    """The one message in the Maildir whose text holds marker."""
    found: list[bytes] = []

    def arrived() -> bool:
        new = box / "new"
        found[:] = [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []
        found[:] = [data for data in found if marker.encode() in data]
        return bool(found)

    wait_until(arrived, f"a message with {marker!r} in the Maildir", timeout=timeout)
    [message] = found
    return message


# --------------------------------------------------------------------------- SMTP


def test_swaks_starttls_delivers_and_received_names_the_cipher(gw: Gateway) -> None:
    code, transcript = swaks_send(
        gw.ports["smtp"], "a@box.test", headers={"Subject": "starttls-one"},
        extra_args=["--tls", "--tls-verify", "--tls-ca-path", str(gw.ca),
                    "--tls-sni", "localhost"],
    )  # fmt: skip
    assert code == SwaksExit.OK, transcript
    assert re.search(r"<-  250[- ]STARTTLS", transcript), transcript
    message = delivered(gw.box, "starttls-one")
    received = message.split(b"\n\n", 1)[0].decode()
    assert "with ESMTPS" in received
    assert "(using TLSv1.3 with cipher " in received


def test_swaks_implicit_tls_on_a_tls_endpoint(gw: Gateway) -> None:
    code, transcript = swaks_send(
        gw.ports["smtps"], "a@box.test", headers={"Subject": "implicit-tls"},
        extra_args=["--tlsc", "--tls-verify", "--tls-ca-path", str(gw.ca),
                    "--tls-sni", "localhost"],
    )  # fmt: skip
    assert code == SwaksExit.OK, transcript
    # Already encrypted: STARTTLS is not offered again.
    assert "STARTTLS" not in transcript
    assert "(using TLSv1.3 with cipher " in delivered(gw.box, "implicit-tls").decode()


def test_required_tls_refuses_mail_before_starttls(gw: Gateway) -> None:
    code, transcript = swaks_send(gw.ports["smtp_required"], "a@box.test")
    assert code == SwaksExit.MAIL_REJECTED, transcript
    assert "<** 530 5.7.0 " in transcript
    code, transcript = swaks_send(
        gw.ports["smtp_required"], "a@box.test", headers={"Subject": "required-ok"},
        extra_args=["--tls"],
    )  # fmt: skip
    assert code == SwaksExit.OK, transcript
    delivered(gw.box, "required-ok")


def s_client(port: int, starttls: str, ca: Path) -> str:
    result = subprocess.run(
        [require_binary("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}",
         "-starttls", starttls, "-CAfile", str(ca), "-verify_hostname", "localhost",
         "-verify_return_error"],
        input="QUIT\r\n", capture_output=True, text=True, errors="replace", timeout=30,
        check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.parametrize("protocol", ["smtp", "nntp"])
def test_openssl_s_client_starttls_verifies_the_chain(gw: Gateway, protocol: str) -> None:
    output = s_client(gw.ports[protocol], protocol, gw.ca)
    assert "Verify return code: 0 (ok)" in output, output
    assert "New, TLSv1.3, Cipher is " in output, output


def read_reply(sock: socket.socket | ssl.SSLSocket, buffer: bytearray) -> list[bytes]:
    """One SMTP reply (all its lines), or an NNTP status line."""
    lines: list[bytes] = []
    while True:
        while b"\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed; read so far {lines!r} {bytes(buffer)!r}")
            buffer += data
        line, _, rest = bytes(buffer).partition(b"\r\n")
        buffer[:] = rest
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_smtp_commands_pipelined_behind_starttls_are_discarded(gw: Gateway) -> None:
    """The CVE-2011-0411 class: a man in the middle appends commands to the cleartext
    STARTTLS; they must not run inside the encrypted session."""
    mark = gw.process.log_mark()
    sock = socket.create_connection((LOOPBACK, gw.ports["smtp"]), timeout=15)
    buffer = bytearray()
    assert read_reply(sock, buffer)[0].startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    read_reply(sock, buffer)
    sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert read_reply(sock, buffer)[0].startswith(b"220 2.0.0")
    assert not buffer
    tls = client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"NOOP\r\nEHLO client.test\r\nRCPT TO:<a@box.test>\r\nQUIT\r\n")
    replies = [read_reply(tls, buffer)[0][:3] for _ in range(4)]
    # NOOP, EHLO, then RCPT without MAIL (503: the smuggled MAIL did not run), QUIT.
    assert replies == [b"250", b"250", b"503", b"221"]
    tls.close()
    gw.process.wait_for_log("behind STARTTLS; thrown away", since=mark)


def test_nntp_commands_pipelined_behind_starttls_are_discarded(gw: Gateway) -> None:
    mark = gw.process.log_mark()
    sock = socket.create_connection((LOOPBACK, gw.ports["nntp"]), timeout=15)
    buffer = bytearray()
    assert read_reply(sock, buffer)[0][:3] in (b"200", b"201")
    sock.sendall(b"STARTTLS\r\nDATE\r\nQUIT\r\n")
    assert read_reply(sock, buffer)[0][:3] == b"382"
    tls = client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"MODE READER\r\nQUIT\r\n")
    replies = [read_reply(tls, buffer)[0][:3] for _ in range(2)]
    assert replies[0] in (b"200", b"201") and replies[1] == b"205"
    tls.close()
    gw.process.wait_for_log("behind STARTTLS; thrown away", since=mark)


def nntp_post(sock: socket.socket | ssl.SSLSocket, buffer: bytearray) -> bytes:
    sock.sendall(b"POST\r\n")
    return read_reply(sock, buffer)[0]


def test_nntp_required_tls_answers_483_then_takes_the_post_over_tls(gw: Gateway) -> None:
    sock = socket.create_connection((LOOPBACK, gw.ports["nntp_required"]), timeout=15)
    buffer = bytearray()
    read_reply(sock, buffer)
    assert nntp_post(sock, buffer).startswith(b"483 ")
    sock.sendall(b"IHAVE <a@b.test>\r\n")
    assert read_reply(sock, buffer)[0].startswith(b"483 ")
    sock.sendall(b"STARTTLS\r\n")
    assert read_reply(sock, buffer)[0][:3] == b"382"
    tls = client_context().wrap_socket(sock, server_hostname="localhost")
    assert nntp_post(tls, buffer)[:3] == b"340"
    tls.sendall(
        b"From: poster@client.test\r\nNewsgroups: test.tls\r\nSubject: nntp-over-tls\r\n"
        b"Message-ID: <nntp-over-tls@client.test>\r\n\r\nbody\r\n.\r\n"
    )
    assert read_reply(tls, buffer)[0][:3] == b"240"
    tls.close()
    delivered(gw.box, "nntp-over-tls")


def test_nntp_implicit_tls_on_a_tls_endpoint(gw: Gateway) -> None:
    raw = socket.create_connection((LOOPBACK, gw.ports["nntps"]), timeout=15)
    context = ssl.create_default_context(cafile=str(gw.ca))
    sock = context.wrap_socket(raw, server_hostname="localhost")
    buffer = bytearray()
    assert read_reply(sock, buffer)[0][:3] == b"200"
    sock.sendall(b"CAPABILITIES\r\n")
    assert read_reply(sock, buffer)[0][:3] == b"101"
    capabilities = []
    while True:
        [line] = read_reply(sock, buffer)
        if line == b".":
            break
        capabilities.append(line)
    assert b"STARTTLS" not in capabilities and b"POST" in capabilities
    sock.close()


@pytest.mark.parametrize("protocol", ["smtp", "nntp"])
@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_sessions_started_with_starttls_are_resumed(
    gw: Gateway, protocol: str, version: str
) -> None:
    """testssl.sh hangs up before TLS 1.3 tickets arrive ("connect problem"); s_client waits."""
    assert tls_session_resumed(gw.ports[protocol], gw.ca, version, gw.root, starttls=protocol)


# --------------------------------------------------------------------------- testssl.sh


@pytest.fixture(scope="module")
def scans(gw: Gateway) -> dict[str, dict[str, dict[str, str]]]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {
            name: pool.submit(
                run_testssl, gw.ports[name], gw.ca, gw.root / f"{name}.json", starttls=name
            )
            for name in ("smtp", "nntp")
        }
        return {name: {f["id"]: f for f in run.result()} for name, run in runs.items()}


@pytest.mark.parametrize("protocol", ["smtp", "nntp"])
def test_testssl_over_starttls_finds_nothing_high_or_critical(
    scans: dict[str, dict[str, dict[str, str]]], protocol: str
) -> None:
    scan = scans[protocol]
    serious = [
        f"{f['id']}: {f['finding']}"
        for f in scan.values()
        if f["severity"] in ("HIGH", "CRITICAL", "FATAL") and f["id"] not in TESTSSL_IGNORED
    ]
    assert serious == []
    assert scan["TLS1"]["finding"] == "not offered"
    assert scan["TLS1_1"]["finding"] == "not offered"
    assert scan["TLS1_2"]["finding"] == "offered"
    assert scan["TLS1_3"]["finding"].startswith("offered")
    assert scan["LUCKY13"]["severity"] == "OK"


# --------------------------------------------------------------------------- Postfix


def test_postfix_relays_to_the_gateway_with_tls_encrypt(gw: Gateway, tmp_path: Path) -> None:
    """A real MTA that will not send in clear (smtp_tls_security_level = encrypt) uses
    the gateway as its relayhost."""
    with PostfixRelay(
        tmp_path / "postfix", relay_to=gw.ports["smtp"], client_tls="encrypt"
    ) as postfix:
        code, transcript = swaks_send(
            postfix.port, "x@relay.test", headers={"Subject": "postfix-encrypt"}
        )
        assert code == SwaksExit.OK, transcript
        message = delivered(gw.box, "postfix-encrypt", timeout=30)
        log = postfix.wait_for_log("status=sent")
        assert "TLS connection established to 127.0.0.1" in log, log
        assert "(using TLSv1.3 with cipher " in message.decode()
        assert "from relay.peers.localdomain" in message.decode()


# --------------------------------------------------------------------------- reload


def served_common_name(port: int) -> str:
    with smtplib.SMTP(LOOPBACK, port, timeout=15) as client:
        client.starttls(context=client_context())
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    certificate = x509.load_der_x509_certificate(der)
    [attribute] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def test_sighup_takes_a_renewed_certificate_and_refuses_a_bad_one(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    cert, key = write_certificate(pki, "server", common_name="first")
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  in: {{protocol: smtp, listen: "tcp:{port}:interface=127.0.0.1", hostname: gw.test,
        tls: {{certificate: '{cert}', key: '{key}'}}}}
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: in, to: box}}
"""
    )
    with GatewayProcess(path) as process:
        process.start(port)
        assert served_common_name(port) == "first"

        # A session that is open across the reloads keeps working.
        held = smtplib.SMTP(LOOPBACK, port, timeout=15)
        held.starttls(context=client_context())
        held.ehlo("held.test")

        mark = process.log_mark()
        write_certificate(pki, "server", common_name="renewed")
        process.hup()
        process.wait_for_log("configuration reloaded", since=mark)
        assert served_common_name(port) == "renewed"

        # An expired certificate: refused, named, and the renewed one stays.
        saved = pki / "saved"
        saved.mkdir()
        for name in ("server.pem", "server.key"):
            shutil.copy(pki / name, saved / name)
        mark = process.log_mark()
        write_certificate(pki, "server", common_name="expired", days=(-30, -1))
        process.hup()
        log = process.wait_for_log("reload refused", since=mark)
        assert f"{cert}" in log and "expired" in log, log
        assert served_common_name(port) == "renewed"

        # A certificate whose key is another one's: refused too.
        shutil.copy(saved / "server.key", pki / "server.key")
        other, _ = write_certificate(tmp_path / "other", "server", common_name="other")
        shutil.copy(other, pki / "server.pem")
        mark = process.log_mark()
        process.hup()
        log = process.wait_for_log("reload refused", since=mark)
        assert "does not belong to the certificate" in log, log
        assert served_common_name(port) == "renewed"

        assert held.noop()[0] == 250
        held.quit()
