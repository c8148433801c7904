"""SMTP AUTH (RFC 4954, PLAIN and LOGIN) in the codec and the listener, the users file,
``senders:`` and the ``authenticated``/``user`` match keys, in memory."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred

from gateway.config import ConfigError, Rate, parse
from gateway.protocols.smtp.codec import (
    AuthRequest,
    MailRequest,
    RcptRequest,
    Reply,
    SendReply,
    ServerCodec,
)
from gateway.protocols.smtp.config import SmtpLimits
from gateway.protocols.smtp.listener import SmtpListener
from gateway.protocols.smtp.server import SmtpSession
from gateway.routing import Router
from gateway.users import (
    FAILURE_DELAY,
    Users,
    UsersError,
    hash_password,
    read_users_file,
    write_user,
)
from tests.support.port import FakePort, runtime_of
from tests.support.users import hashed


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Auth:
    """A codec driven as the server shell drives it; logins succeed for alice/s3cret."""

    def __init__(self, *, tls: bool = True, insecure: bool = False, **options: Any) -> None:
        self.codec = ServerCodec(hostname="gw.test", max_size=0, auth=True, **options)
        self.codec.tls = tls
        self.codec.auth_insecure = insecure
        self.logins: list[AuthRequest] = []

    def feed(self, data: bytes) -> list[bytes]:
        self.codec.receive_data(data)
        out: list[bytes] = []
        while (event := self.codec.next_event()) is not None:
            if isinstance(event, SendReply):
                out.append(event.reply.to_bytes())
            elif isinstance(event, AuthRequest):
                self.logins.append(event)
                good = (event.user, event.password) == ("alice", "s3cret")
                self.codec.answer(
                    Reply(235, "2.7.0", "ok") if good else Reply(535, "5.7.8", "invalid")
                )
            elif isinstance(event, (MailRequest, RcptRequest)):
                self.codec.answer(None)
            else:
                raise AssertionError(event)
        return out

    def codes(self, data: bytes) -> list[int]:
        return [int(reply[:3]) for reply in self.feed(data)]


def test_auth_is_offered_after_tls_and_not_before() -> None:
    clear = Auth(tls=False)
    [ehlo] = clear.feed(b"EHLO c.test\r\n")
    assert b"AUTH" not in ehlo
    [reply] = clear.feed(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert reply.startswith(b"538 5.7.11 ")
    assert clear.logins == []
    secure = Auth(tls=True)
    [ehlo] = secure.feed(b"EHLO c.test\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in ehlo or ehlo.endswith(b"250 AUTH PLAIN LOGIN\r\n")


def test_a_client_on_the_loopback_interface_may_log_in_without_tls() -> None:
    local = Auth(tls=False, insecure=True)
    assert b"AUTH PLAIN LOGIN" in local.feed(b"EHLO c.test\r\n")[0]
    assert local.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode()) == [
        235
    ]


def test_auth_is_not_implemented_without_users() -> None:
    codec = ServerCodec(hostname="gw.test", max_size=0)
    codec.tls = True
    codec.receive_data(b"EHLO c\r\nAUTH PLAIN\r\n")
    replies = []
    while (event := codec.next_event()) is not None:
        assert isinstance(event, SendReply)
        replies.append(event.reply.code)
    assert replies == [250, 502]


def test_plain_with_an_initial_response() -> None:
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    [reply] = auth.feed(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert reply == b"235 2.7.0 ok\r\n"
    assert auth.codec.user == "alice"
    [login] = auth.logins
    assert (login.user, login.password, login.mechanism) == ("alice", "s3cret", "PLAIN")
    assert "s3cret" not in repr(login)  # never in a log line
    assert auth.codes(b"AUTH PLAIN =\r\n") == [503]  # once is enough


def test_plain_with_a_challenge_and_an_authorization_identity() -> None:
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    assert auth.feed(b"AUTH plain\r\n") == [b"334 \r\n"]  # the space is required
    assert auth.codes(f"{b64('alice' + chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode()) == [
        235
    ]
    other = Auth()
    other.feed(b"EHLO c.test\r\n")
    # Acting as another user is not something a users file can allow.
    assert other.codes(
        f"AUTH PLAIN {b64('bob' + chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode()
    ) == [535]
    assert other.logins == [] and other.codec.user is None


def test_login_asks_for_the_name_then_the_password() -> None:
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    assert auth.feed(b"AUTH LOGIN\r\n") == [b"334 VXNlcm5hbWU6\r\n"]
    assert auth.feed(f"{b64('alice')}\r\n".encode()) == [b"334 UGFzc3dvcmQ6\r\n"]
    assert auth.codes(f"{b64('wrong')}\r\n".encode()) == [535]
    assert auth.codec.user is None and auth.codec.errors == 1
    # With the name as the initial response.
    assert auth.feed(f"AUTH LOGIN {b64('alice')}\r\n".encode()) == [b"334 UGFzc3dvcmQ6\r\n"]
    assert auth.codes(f"{b64('s3cret')}\r\n".encode()) == [235]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"AUTH PLAIN", b"*"], b"501 5.0.0 "),
        ([b"AUTH LOGIN", b"*"], b"501 5.0.0 "),
        ([b"AUTH PLAIN not*base64"], b"501 5.5.2 "),
        ([b"AUTH PLAIN", b"%%%"], b"501 5.5.2 "),
        ([b"AUTH PLAIN " + base64.b64encode(b"no-nul-here")], b"501 5.5.2 "),
        ([b"AUTH PLAIN " + base64.b64encode(b"\0\xff\xfe\0pw")], b"501 5.5.2 "),
        ([b"AUTH CRAM-MD5"], b"504 5.5.4 "),
        ([b"AUTH"], b"501 5.5.4 "),
        ([b"AUTH PLAIN a b"], b"501 5.5.4 "),
    ],
)
def test_bad_auth_gets_its_code_and_the_session_goes_on(lines: list[bytes], reply: bytes) -> None:
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    out = auth.feed(b"".join(line + b"\r\n" for line in lines))
    assert out[-1].startswith(reply), out
    assert auth.logins == []
    assert auth.codes(b"NOOP\r\n") == [250]  # the next line is a command again


def test_auth_needs_ehlo_and_no_open_transaction() -> None:
    auth = Auth()
    assert auth.codes(b"AUTH PLAIN =\r\n") == [503]
    auth.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    [reply] = auth.feed(b"AUTH PLAIN =\r\n")
    assert reply.startswith(b"503 5.5.1 Error: MAIL transaction in progress")


def test_a_long_initial_response_is_taken() -> None:
    """RFC 4954 4: an AUTH line may be 12,288 octets, longer than a command line."""
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    password = "p" * 6000
    assert auth.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + password)}\r\n".encode()) == [
        535
    ]
    assert auth.logins[0].password == password
    assert auth.codes(b"NOOP " + b"x" * 5000 + b"\r\n") == [500]  # other commands are not


def test_require_auth_refuses_mail_until_logged_in_and_takes_the_auth_parameter() -> None:
    auth = Auth(require_auth=True)
    auth.feed(b"EHLO c.test\r\n")
    [refused] = auth.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert refused.startswith(b"530 5.7.0 Authentication required")
    auth.feed(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert auth.codes(b"MAIL FROM:<a@b.test> AUTH=<>\r\n") == [250]


def test_starttls_forgets_the_login() -> None:
    codec = ServerCodec(hostname="gw.test", max_size=0, auth=True, starttls=True)
    codec.auth_insecure = True
    codec.user = "alice"
    codec.receive_data(b"EHLO c\r\nSTARTTLS\r\n")
    while codec.next_event() is not None:
        pass
    assert codec.tls and codec.user is None


def test_help_lists_auth_when_offered() -> None:
    auth = Auth()
    [reply] = auth.feed(b"HELP\r\n")
    assert b" AUTH " in reply


# --------------------------------------------------------------------------- users file


def test_write_user_adds_and_changes_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# the submission users\n")
    assert write_user(path, "alice", "one")
    assert write_user(path, "bob", "two")
    assert not write_user(path, "alice", "three")
    text = path.read_text()
    assert text.startswith("# the submission users\n")
    users = read_users_file(path)
    assert set(users) == {"alice", "bob"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    checker = Users(None, "test")
    checker.configure({}, str(path))
    assert _verify(checker, "alice", "three") and not _verify(checker, "alice", "one")
    with pytest.raises(UsersError, match="no spaces or colons"):
        write_user(path, "a b", "x")


def _verify(users: Users, user: str, password: str) -> bool:
    result: list[bool] = []
    ensureDeferred(users.verify(user, password)).addCallback(result.append)
    return result[0]


def test_a_user_listed_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"a:{hashed('x')}\na:{hashed('y')}\n")
    with pytest.raises(UsersError, match="users:2: 'a' is listed twice"):
        read_users_file(path)


# --------------------------------------------------------------------------- listener


SUBMISSION = """
version: 1
listeners:
  submit:
    protocol: smtp
    listen: "tcp:5870"
    hostname: gw.test
    require_auth: true
    users_file: users
    senders: {{alice: [alice@example.test, "@alice.test"]}}
    limits: {{auth_failure_rate: 2/h, message_rate: 2/h}}
destinations:
  relay: {{protocol: smtp, connect: "tcp:127.0.0.1:2526"}}
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: submit, match: {{user: bob}}, to: box}}
  - {{from: submit, match: {{authenticated: true}}, to: relay}}
"""


def submission(tmp_path: Path) -> tuple[SmtpListener, FakePort]:
    (tmp_path / "users").write_text(f"alice:{hashed('s3cret')}\nbob:{hashed('pw')}\n")
    config = parse(SUBMISSION.format(), "routes.yaml", tmp_path)
    port = FakePort(runtime_of(config))
    config = port.current().config.listeners["submit"]  # type: ignore[attr-defined]
    return SmtpListener(config, port, port.reactor), port


def session(user: str = "", host: str = "192.0.2.7") -> SmtpSession:
    return SmtpSession(host, 40000, "c.test", True, True, "TLSv1.3", user)


def login(listener: SmtpListener, user: str, password: str, host: str = "192.0.2.7") -> Reply:
    result: list[Reply] = []
    ensureDeferred(listener.on_auth(session(host=host), user, password)).addBoth(
        result.append  # type: ignore[arg-type]
    )
    listener.reactor.advance(FAILURE_DELAY)
    assert result and isinstance(result[0], Reply), result
    return result[0]


def test_the_listener_checks_passwords_and_slows_failures(tmp_path: Path) -> None:
    listener, _ = submission(tmp_path)
    assert listener.factory().auth and listener.factory().require_auth
    assert login(listener, "alice", "s3cret").code == 235
    result: list[Reply] = []
    ensureDeferred(listener.on_auth(session(), "alice", "wrong")).addBoth(result.append)  # type: ignore[arg-type]
    assert result == []  # answered FAILURE_DELAY later
    listener.reactor.advance(FAILURE_DELAY)
    assert result[0].code == 535 and result[0].status == "5.7.8"
    assert login(listener, "nobody", "s3cret").code == 535
    assert listener.guard.auth_failures == 2
    assert listener.guard.over("auth_failure_rate", "192.0.2.7") > 0
    assert listener.guard.over("auth_failure_rate", "192.0.2.8") == 0


def test_a_user_may_only_send_as_its_own_addresses(tmp_path: Path) -> None:
    listener, _ = submission(tmp_path)
    alice = session("alice")
    assert listener.on_sender(alice, "alice@example.test", {}) is None
    assert listener.on_sender(alice, "Alice@Example.TEST", {}) is None
    assert listener.on_sender(alice, "anything@alice.test", {}) is None
    assert listener.on_sender(alice, "", {}) is None  # bounces are nobody's
    refused = listener.on_sender(alice, "ceo@example.test", {})
    assert refused is not None and (refused.code, refused.status) == (553, "5.7.1")
    assert "not owned by alice" in refused.text
    # bob is not listed in senders: it may use no address.
    refused = listener.on_sender(session("bob"), "bob@example.test", {})
    assert refused is not None and refused.code == 553


def test_routes_match_on_the_login(tmp_path: Path) -> None:
    listener, port = submission(tmp_path)
    router: Router = port.current().router  # type: ignore[attr-defined]
    assert router.accepts_recipient("submit", "a@b.test", "x@far.test", "192.0.2.7", "alice")
    assert router.accepts_recipient("submit", "a@b.test", "x@far.test", "192.0.2.7", "bob")
    assert not router.accepts_recipient("submit", "a@b.test", "x@far.test", "192.0.2.7", "")
    # The listener asks with the session's user: no relaying for a client not logged in.
    refused = listener.on_recipient(session(""), "a@b.test", "x@far.test", {})
    assert refused is not None and refused.code == 550
    assert listener.on_recipient(session("alice"), "a@b.test", "x@far.test", {}) is None


def test_the_message_carries_the_user_and_received_says_esmtpsa(tmp_path: Path) -> None:
    listener, port = submission(tmp_path)
    result: list[Reply] = []
    ensureDeferred(
        listener.on_message(session("alice"), "alice@example.test", ("x@far.test",), b"S: x\n\nb\n")
    ).addBoth(result.append)  # type: ignore[arg-type]
    [message] = port.submitted
    assert message.user == "alice"
    received = message.headers.get("Received")  # type: ignore[attr-defined]
    assert "with ESMTPSA id" in received


def test_limits_count_a_logged_in_user_wherever_it_connects_from(tmp_path: Path) -> None:
    listener, _ = submission(tmp_path)
    guard = listener.guard
    assert guard.throttle("message_rate", "192.0.2.1", "alice") == 0
    assert guard.throttle("message_rate", "192.0.2.2", "alice") == 0
    assert guard.throttle("message_rate", "192.0.2.3", "alice") > 0
    assert guard.throttle("message_rate", "192.0.2.3") == 0  # the address has its own count


def test_config_errors(tmp_path: Path) -> None:
    def check(listener: str) -> None:
        parse(
            f"version: 1\nlisteners:\n  s: {listener}\ndestinations: {{}}\nroutes: []\n",
            base=tmp_path,
        )

    with pytest.raises(ConfigError, match="require_auth needs 'users' or 'users_file'"):
        check("{protocol: smtp, listen: 'tcp:1', require_auth: true}")
    with pytest.raises(ConfigError, match="the password of user 'a' is not an Argon2 hash"):
        check("{protocol: smtp, listen: 'tcp:1', users: {a: clear}}")
    with pytest.raises(ConfigError, match="cannot read the users file"):
        check("{protocol: smtp, listen: 'tcp:1', users_file: nosuch}")
    with pytest.raises(ConfigError, match="'alice' is neither an address"):
        check("{protocol: smtp, listen: 'tcp:1', senders: {a: [alice]}}")
    limits = SmtpLimits(auth_failure_rate=Rate.parse("3/m"))
    assert limits.rates() == {"auth_failure_rate": Rate.parse("3/m")}
    assert dataclasses.fields(SmtpLimits)


def test_match_keys_parse(tmp_path: Path) -> None:
    config = parse(
        "version: 1\nlisteners:\n  s: {protocol: smtp, listen: 'tcp:1'}\n"
        "destinations: {b: {protocol: maildir, path: b}}\n"
        "routes:\n  - {from: s, match: {authenticated: false, user: [a, b]}, to: b}\n",
        base=tmp_path,
    )
    match = config.routes[0].match
    assert match.authenticated is False and match.user == ("a", "b")
    with pytest.raises(ConfigError, match="authenticated"):
        parse(
            "version: 1\nlisteners:\n  s: {protocol: smtp, listen: 'tcp:1'}\n"
            "destinations: {b: {protocol: maildir, path: b}}\n"
            "routes:\n  - {from: s, match: {authenticated: maybe}, to: b}\n",
            base=tmp_path,
        )


def test_a_user_name_with_control_characters_is_refused_without_asking() -> None:
    """Found by fuzzing: AUTH LOGIN handed a name with NULs to the handler (and its logs)."""
    auth = Auth()
    auth.feed(b"EHLO c.test\r\n")
    auth.feed(b"AUTH LOGIN\r\n")
    assert auth.codes(f"{b64('al' + chr(0) + 'ce')}\r\n".encode()) == [535]
    plain = b64(chr(0) + "al\x1bce" + chr(0) + "pw")
    assert auth.codes(f"AUTH PLAIN {plain}\r\n".encode()) == [535]
    assert auth.logins == []


def test_a_good_login_is_remembered_for_a_while_and_a_bad_one_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twisted.internet.task import Clock

    from gateway import users as users_module

    checks: list[str] = []
    real = users_module._check

    def counted(hashed: str | None, password: str) -> bool:
        checks.append(password)
        return real(hashed, password)

    monkeypatch.setattr(users_module, "_check", counted)
    clock = Clock()
    checker = Users(clock, "test")
    checker.configure({"alice": hash_password("right")}, None)
    assert _verify(checker, "alice", "right") and _verify(checker, "alice", "right")
    assert checks == ["right"]  # the second login needed no Argon2 check
    assert not _verify(checker, "alice", "wrong") and not _verify(checker, "alice", "wrong")
    assert checks == ["right", "wrong", "wrong"]
    clock.advance(users_module.CACHE_TTL + 1)
    assert _verify(checker, "alice", "right")
    assert checks[-1] == "right" and len(checks) == 4
    # A new password (a new hash) is not taken on the strength of the old one.
    checker.configure({"alice": hash_password("new")}, None)
    assert not _verify(checker, "alice", "right") and _verify(checker, "alice", "new")
