"""SMTP AUTH on a submission listener, with swaks as the mail client and smtp-sink behind.

The listener relays only for users who logged in (route ``match:
{authenticated: true}``), lets each use only its own sender addresses, and
counts failed logins per client. Users come from a file ``gateway passwd``
wrote.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    REPO_ROOT,
    GatewayProcess,
    SmtpSink,
    SwaksExit,
    free_port,
    make_tls_cert,
    swaks_send,
    wait_until,
)


def passwd(users: Path, user: str, password: str) -> None:
    gateway = REPO_ROOT / ".venv" / "bin" / "gateway"
    result = subprocess.run(
        [str(gateway), "passwd", "-f", str(users), "--stdin", user],
        input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    with SmtpSink(tmp_path_factory.mktemp("sink")).start() as s:
        yield s


@pytest.fixture(scope="module")
def submission(
    tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink
) -> Iterator[tuple[GatewayProcess, int, Path]]:
    root = tmp_path_factory.mktemp("submission")
    cert, key = make_tls_cert(root / "tls")
    passwd(root / "users", "alice", "s3cret word")
    passwd(root / "users", "bob", "hunter2")
    port = free_port()
    path = root / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  submit:
    protocol: smtp
    listen: "tcp:{port}:interface=127.0.0.1"
    hostname: gw.test
    tls: {{certificate: '{cert}', key: '{key}'}}
    users_file: users
    require_auth: true
    auth_without_tls: []
    senders: {{alice: [alice@example.test], bob: ["@bob.test"]}}
    limits: {{auth_failure_rate: 3/h}}
destinations:
  relay: {{protocol: smtp, connect: "tcp:127.0.0.1:{sink.port}", retry_min: 1s}}
routes:
  - {{from: submit, match: {{authenticated: true}}, to: relay}}
"""
    )
    process = GatewayProcess(path)
    process.start(port)
    try:
        yield process, port, cert
    finally:
        process.stop()


def send(port: int, cert: Path, *args: str, sender: str = "alice@example.test", **kw: object):  # type: ignore[no-untyped-def]
    return swaks_send(
        port, "friend@far.test", sender=sender,
        extra_args=["--tls", "--tls-ca-path", str(cert), *args], **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_user_who_logs_in_is_relayed(
    submission: tuple[GatewayProcess, int, Path], sink: SmtpSink, mechanism: str
) -> None:
    _, port, cert = submission
    subject = f"auth-{mechanism}"
    code, transcript = send(
        port, cert, "--auth", mechanism, "--auth-user", "alice",
        "--auth-password", "s3cret word", headers={"Subject": subject},
    )  # fmt: skip
    assert code == SwaksExit.OK, transcript
    assert "235 2.7.0 " in transcript
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m.raw for m in sink.messages() if subject.encode() in m.raw]
        return bool(found)

    wait_until(arrived, f"the message {subject!r} at the sink", timeout=20)
    assert b"with ESMTPSA id" in found[0].split(b"\n\n", 1)[0]


def test_auth_is_offered_only_after_starttls(submission: tuple[GatewayProcess, int, Path]) -> None:
    _, port, _ = submission
    code, transcript = swaks_send(
        port, "friend@far.test",
        extra_args=["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "s3cret word"],
    )  # fmt: skip
    # Without TLS the server does not advertise AUTH; swaks gives up before MAIL.
    assert code == SwaksExit.AUTH_FAILED, transcript
    assert "250-AUTH" not in transcript and "250 AUTH" not in transcript


def test_mail_without_login_gets_530(submission: tuple[GatewayProcess, int, Path]) -> None:
    _, port, cert = submission
    code, transcript = send(port, cert)
    assert code == SwaksExit.MAIL_REJECTED, transcript
    assert "530 5.7.0 Authentication required" in transcript


def test_a_user_may_not_send_as_someone_else(submission: tuple[GatewayProcess, int, Path]) -> None:
    _, port, cert = submission
    code, transcript = send(
        port, cert, "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "hunter2",
        sender="alice@example.test",
    )  # fmt: skip
    assert code == SwaksExit.MAIL_REJECTED, transcript
    assert "553 5.7.1 <alice@example.test>: Sender address rejected: not owned by bob" in (
        transcript
    )


def test_failed_logins_are_slowed_and_then_cut_off(
    submission: tuple[GatewayProcess, int, Path],
) -> None:
    process, port, cert = submission
    mark = process.log_mark()
    for _ in range(3):
        code, transcript = send(
            port, cert, "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "guess"
        )
        assert code == SwaksExit.AUTH_FAILED, transcript
        assert "535 5.7.8 " in transcript
    # The fourth try from this address is not even checked, right password or not.
    code, transcript = send(
        port, cert, "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "s3cret word"
    )
    assert "421 4.7.0 gw.test Too many failed logins from 127.0.0.1" in transcript, transcript
    log = process.wait_for_log("authentication of 127.0.0.1 as alice failed", since=mark)
    assert "guess" not in log  # passwords are never logged
