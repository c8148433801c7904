"""The FTP server codec in memory: the commands it answers itself, the requests it hands
on, the session state (login, TLS, PROT, TYPE, REST, the current folder), addresses and
listings."""

from __future__ import annotations

import pytest

from gateway.protocols.ftp import codec
from gateway.protocols.ftp.codec import (
    Active,
    FileRequest,
    Login,
    Passive,
    Reply,
    SendReply,
    ServerCodec,
)


def _events(c: ServerCodec, *lines: str) -> list[object]:
    c.receive_data("".join(line + "\r\n" for line in lines).encode())
    out: list[object] = []
    while (event := c.next_event()) is not None:
        out.append(event)
        if not isinstance(event, SendReply):
            break
    return out


def _codes(events: list[object]) -> list[int]:
    return [e.reply.code for e in events if isinstance(e, SendReply)]


def _logged_in(**options: bool) -> ServerCodec:
    c = ServerCodec(tls_available=options.pop("tls_available", True), **options)
    assert _events(c, "USER scan", "PASS pw") == [
        SendReply(Reply(331, "Password required for scan")),
        Login("scan", "pw"),
    ]
    assert c.answer(Reply(230, "Logged in")).reply.code == 230
    assert c.user == "scan"
    return c


def test_replies_on_several_lines_are_framed_as_rfc_959_says() -> None:
    assert Reply(200, "ok").to_bytes() == b"200 ok\r\n"
    text = Reply(211, "Features:\n EPSV\n 211 looks like an end\nEnd").to_bytes()
    assert text == b"211-Features:\r\n EPSV\r\n 211 looks like an end\r\n211 End\r\n"
    # A continuation line that starts with digits would end the reply: it is indented.
    assert Reply(214, "a\n123 b\nc").to_bytes() == b"214-a\r\n 123 b\r\n214 c\r\n"


def test_nothing_but_the_login_and_its_helpers_before_logging_in() -> None:
    c = ServerCodec(tls_available=False)
    assert _codes(_events(c, "RETR x", "LIST", "PASV", "SYST", "FEAT", "NOOP")) == [
        530, 530, 530, 215, 211, 200,
    ]  # fmt: skip
    assert _codes(_events(c, "PASS early")) == [503]
    events = _events(c, "USER scan", "PASS wrong")
    assert events[-1] == Login("scan", "wrong")
    assert _events(c, "NOOP") == []  # the login is pending: nothing else is answered yet
    assert c.answer(Reply(530, "Login incorrect")).reply.code == 530
    assert c.user == ""
    assert _codes(_events(c)) == [200]  # the NOOP, now
    assert _codes(_events(c, "PASS again")) == [503]  # USER again first


def test_a_client_that_must_use_tls_is_told_so_before_its_password() -> None:
    c = ServerCodec(tls_available=True, login_needs_tls=True)
    assert _codes(_events(c, "USER scan")) == [530]
    events = _events(c, "AUTH TLS")
    assert events == [SendReply(Reply(234, "Proceed with TLS negotiation"), start_tls=True)]
    assert c.tls
    assert _codes(_events(c, "AUTH TLS")) == [503]
    assert _codes(_events(c, "USER scan")) == [331]
    # No TLS at all: the client is told it cannot log in here.
    c = ServerCodec(tls_available=False, login_needs_tls=True)
    assert _events(c, "USER scan") == [
        SendReply(Reply(530, "Logins from your address need TLS, which this server does not offer"))
    ]
    assert _codes(_events(c, "AUTH TLS")) == [502]
    assert _codes(_events(c, "AUTH KERBEROS_V4")) == [504]


def test_what_the_client_pipelines_behind_auth_tls_is_thrown_away() -> None:
    c = ServerCodec(tls_available=True)
    c.receive_data(b"AUTH TLS\r\nUSER injected\r\n")
    event = c.next_event()
    assert isinstance(event, SendReply) and event.start_tls
    assert c.discarded_after_starttls == len(b"USER injected\r\n")
    assert c.next_event() is None


def test_pbsz_and_prot_follow_auth_tls() -> None:
    c = ServerCodec(tls_available=True, data_needs_tls=True)
    assert _codes(_events(c, "PBSZ 0", "PROT P")) == [503, 503]
    _events(c, "AUTH TLS")
    assert _codes(_events(c, "PROT P")) == [503]  # PBSZ first
    assert _codes(_events(c, "PBSZ 0", "PROT C", "PROT S", "PROT X", "PROT P")) == [
        200, 534, 536, 504, 200,
    ]  # fmt: skip
    assert c.protected


def test_session_commands_answered_by_the_codec() -> None:
    c = _logged_in()
    assert _codes(_events(c, "TYPE A", "TYPE A N", "TYPE E", "TYPE L 8", "TYPE I")) == [
        200, 200, 504, 200, 200,
    ]  # fmt: skip
    assert not c.ascii
    assert _codes(_events(c, "MODE S", "MODE B", "STRU F", "STRU R")) == [200, 504, 200, 504]
    assert _codes(_events(c, "DELE a", "MKD d", "RNFR a", "SITE CHMOD 777 a")) == [
        550, 550, 550, 550,
    ]  # fmt: skip
    assert _codes(_events(c, "XYZZY", "", "OPTS UTF8 ON", "OPTS FOO")) == [502, 500, 200, 501]
    assert _codes(_events(c, "ABOR", "ALLO 100", "REST x")) == [225, 202, 501]
    assert _events(c, "PWD")[0] == SendReply(Reply(257, '"/" is the current folder'))
    assert _codes(_events(c, "QUIT")) == [221]


def test_file_commands_carry_a_clean_absolute_path() -> None:
    c = _logged_in()
    assert _events(c, "CWD scans/../in") == [FileRequest("CWD", "/in")]
    c.answer(Reply(250, "ok"))
    assert c.cwd == "/in"
    assert _events(c, "PWD")[0] == SendReply(Reply(257, '"/in" is the current folder'))
    assert _events(c, "STOR a.pdf") == [FileRequest("STOR", "/in/a.pdf")]
    c.answer(Reply(226, "ok"))
    # No ".." climbs above the top.
    assert _events(c, "RETR ../../../etc/passwd") == [FileRequest("RETR", "/etc/passwd")]
    c.answer(Reply(550, "no"))
    assert _events(c, "RETR \\boot\\x") == [FileRequest("RETR", "/boot/x")]
    c.answer(Reply(550, "no"))
    # A CWD refused leaves the folder as it was; CDUP climbs one.
    assert _events(c, "CWD nowhere") == [FileRequest("CWD", "/in/nowhere")]
    c.answer(Reply(550, "no"))
    assert c.cwd == "/in"
    assert _events(c, "CDUP") == [FileRequest("CWD", "/")]
    c.answer(Reply(250, "ok"))
    # ls options are not paths; a LIST without one lists the current folder.
    assert _events(c, "LIST -la") == [FileRequest("LIST", "/", given=False)]
    c.answer(Reply(226, "ok"))
    assert _codes(_events(c, "RETR", "STOR")) == [501, 501]


def test_rest_applies_to_the_next_transfer_only() -> None:
    c = _logged_in()
    assert _codes(_events(c, "REST 100")) == [350]
    assert _events(c, "RETR f") == [FileRequest("RETR", "/f", offset=100)]
    c.answer(Reply(226, "ok"))
    assert _events(c, "RETR f") == [FileRequest("RETR", "/f")]
    c.answer(Reply(226, "ok"))
    _events(c, "TYPE A")
    assert _events(c, "STOR t") == [FileRequest("STOR", "/t", ascii=True)]


def test_data_connection_commands() -> None:
    c = _logged_in()
    assert _events(c, "PASV") == [Passive(False)]
    c.answer(Reply(227, "ok"))
    assert _events(c, "EPSV") == [Passive(True)]
    c.answer(Reply(229, "ok"))
    assert _events(c, "PORT 127,0,0,1,4,1") == [Active("127.0.0.1", 1025)]
    c.answer(Reply(200, "ok"))
    assert _events(c, "EPRT |2|::1|5000|") == [Active("::1", 5000)]
    c.answer(Reply(200, "ok"))
    assert _codes(_events(c, "PORT 1,2,3", "EPRT |3|x|1|", "EPRT |1|::1|5|", "EPSV 9")) == [
        501, 501, 522, 522,
    ]  # fmt: skip
    assert _codes(_events(c, "EPSV ALL", "PASV", "PORT 127,0,0,1,4,1")) == [200, 503, 503]
    off = _logged_in(active=False)
    assert _codes(_events(off, "PORT 127,0,0,1,4,1")) == [502]


def test_long_lines_telnet_commands_and_bad_utf8() -> None:
    c = _logged_in()
    c.receive_data(b"N" * (codec.MAX_LINE + 10))
    assert _codes(_events(c)) == [500]
    c.receive_data(b"N" * 100 + b"\r\nNOOP\r\n")  # its end is thrown away, not run
    assert _codes(_events(c)) == [200]
    # Telnet IP and DM (what some clients send before ABOR) are dropped from the line.
    c.receive_data(b"\xff\xf4\xff\xf2ABOR\r\n")
    assert _codes(_events(c)) == [225]
    c.receive_data(b"RETR \xc3\x28\r\n")
    assert _codes(_events(c)) == [501]


@pytest.mark.parametrize(
    ("data", "want"),
    [
        ([b"a\r\nb\r\n"], b"a\nb\n"),
        ([b"a\r", b"\nb\r", b"\n"], b"a\nb\n"),
        ([b"a\rb"], b"a\rb"),
        ([b"end\r"], b"end\r"),
    ],
)
def test_ascii_uploads_lose_their_crs(data: list[bytes], want: bytes) -> None:
    out, held = b"", False
    for block in data:
        converted, held = codec.ascii_to_local(block, held)
        out += converted
    if held:
        out += b"\r"
    assert out == want


def test_ascii_downloads_get_crlf_once() -> None:
    out, last = b"", False
    for block in (b"a\nb\r", b"\nc\r\n", b"d\n"):
        converted, last = codec.local_to_ascii(block, last)
        out += converted
    assert out == b"a\r\nb\r\nc\r\nd\r\n"


def test_listing_lines() -> None:
    now = 1_700_000_000.0
    line = codec.list_line("a.bin", 5, now - 60, False, now)
    assert line == "-rw-r--r-- 1 ftp ftp            5 Nov 14 22:12 a.bin"
    assert codec.list_line("old", None, now - 400 * 86400, True, now).startswith(
        "drwxr-xr-x 1 ftp ftp            0 Oct 10  2022 old"
    )
    assert (
        codec.mlst_facts("a.bin", 5, now, False) == "type=file;size=5;modify=20231114221320; a.bin"
    )
    assert codec.mlst_facts("d", None, None, True) == "type=dir; d"
