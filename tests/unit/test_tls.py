"""The listeners' TLS: the tls: block and its checks, and STARTTLS in the SMTP and NNTP codecs.

Defect (issue 16): the SMTP and NNTP listeners offered no STARTTLS, and a TLS
listener's certificate came only from an ssl: endpoint string, read once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import ConfigError, parse
from gateway.protocols.nntp.codec import ArticleReceived, SendResponse
from gateway.protocols.nntp.codec import ServerCodec as NntpCodec
from gateway.protocols.smtp.codec import MailRequest, SendReply
from gateway.protocols.smtp.codec import ServerCodec as SmtpCodec
from gateway.tls import ServerTls, TlsConfig, load_material, session_cipher, tls_endpoint
from tests.support.tls import write_certificate

# --- the tls: block -----------------------------------------------------------------------


def test_a_matching_key_and_certificate_are_read(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    material = load_material(str(cert), str(key), None)
    assert material.chain == cert.read_bytes() and material.key == key.read_bytes()
    ServerTls(TlsConfig(certificate=str(cert), key=str(key)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mismatched", "the key {key} does not belong to the certificate {cert} (CN=localhost)"),
        ("expired", "the certificate {cert} (CN=localhost) expired on "),
        ("future", "the certificate {cert} (CN=localhost) is not valid before "),
        ("missing", "cannot read the key {key}: No such file or directory"),
        ("not-pem", "{cert} holds no PEM certificate"),
    ],
)
def test_a_bad_certificate_or_key_says_which_file_and_why(
    tmp_path: Path, case: str, message: str
) -> None:
    cert, key = write_certificate(tmp_path)
    if case == "mismatched":
        write_certificate(tmp_path, key=ec.generate_private_key(ec.SECP256R1()))
        cert = tmp_path / "server.pem"
        key.write_bytes(write_certificate(tmp_path, "other")[1].read_bytes())
    elif case == "expired":
        cert, key = write_certificate(tmp_path, days=(-60, -1))
    elif case == "future":
        cert, key = write_certificate(tmp_path, days=(2, 60))
    elif case == "missing":
        key.unlink()
    elif case == "not-pem":
        cert.write_text("hello\n")
    with pytest.raises(ValueError) as caught:
        load_material(str(cert), str(key), None)
    assert message.format(cert=cert, key=key) in str(caught.value)


def _routes(tmp_path: Path, listener: str) -> str:
    return f"""
version: 1
listeners:
  in:
{listener}
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: in, to: box}}
"""


def test_a_tls_block_is_read_with_paths_from_the_files_folder(tmp_path: Path) -> None:
    write_certificate(tmp_path / "pki")
    text = _routes(
        tmp_path,
        "    protocol: smtp\n    listen: [tcp:2525, tls:4650]\n"
        "    tls: {certificate: pki/server.pem, key: pki/server.key, min_version: 1.3,"
        " require: true}",
    )
    config = parse(text, base=tmp_path)
    tls = config.listeners["in"].tls_config()
    assert tls is not None
    assert tls.certificate == str(tmp_path / "pki" / "server.pem")
    assert (tls.min_version, tls.require) == ("1.3", True)


def test_a_bad_certificate_is_a_configuration_error_at_the_tls_block(tmp_path: Path) -> None:
    write_certificate(tmp_path / "pki", days=(-60, -1))
    text = _routes(
        tmp_path,
        "    protocol: smtp\n    listen: tcp:2525\n"
        "    tls: {certificate: pki/server.pem, key: pki/server.key}",
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, base=tmp_path)
    assert "routes.yaml:7:10: listener 'in': 'tls': the certificate " in str(caught.value)
    assert "expired on" in str(caught.value)


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        (
            "    protocol: smtp\n    listen: tls:4650",
            "listener 'in': 'tls:4650' speaks TLS with the listener's tls: block, and it has none",
        ),
        (
            "    protocol: smtp\n    listen: tls:nonsense",
            "endpoint 'tls:nonsense': the port must be a number",
        ),
        (
            "    protocol: smtp\n    listen: tcp:2525\n"
            "    tls: {certificate: a.pem, key: a.key, min_version: 1.1}",
            "'min_version' must be 1.2 or 1.3, not '1.1'",
        ),
    ],
)
def test_tls_mistakes_are_named(tmp_path: Path, listener: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(_routes(tmp_path, listener), base=tmp_path)
    assert message in str(caught.value)


def test_a_tls_endpoint_is_tls_on_a_plain_one() -> None:
    assert tls_endpoint("tls:465:interface=127.0.0.1") == "tcp:465:interface=127.0.0.1"
    assert tls_endpoint("tls:tcp6:465:interface=\\:\\:1") == "tcp6:465:interface=\\:\\:1"
    assert tls_endpoint("tls:systemd:domain=INET6:name=smtps") == (
        "systemd:domain=INET6:name=smtps"
    )


def test_a_plain_transport_has_no_cipher() -> None:
    class Plain:
        def getHandle(self) -> object:
            return object()

    assert session_cipher(Plain()) is None
    assert session_cipher(object()) is None


def test_a_reload_with_new_files_changes_the_context_for_new_connections(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path)
    tls = ServerTls(TlsConfig(certificate=str(cert), key=str(key)))  # type: ignore[arg-type]
    before = tls.serverConnectionForTLS(None).get_context()
    same = TlsConfig(certificate=str(cert), key=str(key))  # type: ignore[arg-type]
    tls.update(same)
    assert tls.serverConnectionForTLS(None).get_context() is before  # nothing changed
    write_certificate(tmp_path)  # renewed: the same paths, new content
    renewed = TlsConfig(certificate=str(cert), key=str(key))  # type: ignore[arg-type]
    assert renewed != same
    tls.update(renewed)
    assert tls.serverConnectionForTLS(None).get_context() is not before


def _handshake(server: object, client_max: int) -> str:
    """The version an in-memory handshake with ``server`` (a ServerTls) agrees on, from a
    client that offers versions up to ``client_max``; "" if it fails."""
    from OpenSSL import SSL

    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_max_proto_version(client_max)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    accepted = server.serverConnectionForTLS(None)  # type: ignore[attr-defined]
    accepted.set_accept_state()
    for _ in range(10):
        for one, other in ((client, accepted), (accepted, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return ""
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
    return str(client.get_protocol_version_name())


def test_ftp_data_connections_get_tls_12_at_most(tmp_path: Path) -> None:
    from OpenSSL import SSL

    cert, key = write_certificate(tmp_path)
    config = TlsConfig(certificate=str(cert), key=str(key))  # type: ignore[arg-type]
    tls = ServerTls(config)
    assert _handshake(tls, SSL.TLS1_3_VERSION) == "TLSv1.3"
    capped = tls.up_to_tls12()
    assert capped is tls.up_to_tls12() and capped.up_to_tls12() is capped
    assert _handshake(capped, SSL.TLS1_3_VERSION) == "TLSv1.2"
    # An operator who allows 1.3 only keeps it there too.
    only13 = TlsConfig(certificate=str(cert), key=str(key), min_version="1.3")  # type: ignore[arg-type]
    assert ServerTls(only13).up_to_tls12().tls13


# --- SMTP STARTTLS (RFC 3207) -------------------------------------------------------------


def _smtp(data: bytes, codec: SmtpCodec) -> list[SendReply | MailRequest]:
    codec.receive_data(data)
    events: list[SendReply | MailRequest] = []
    while (event := codec.next_event()) is not None:
        assert isinstance(event, (SendReply, MailRequest))
        events.append(event)
        if isinstance(event, MailRequest):
            codec.answer(None)
    return events


def _lines(events: list[SendReply | MailRequest]) -> list[bytes]:
    return [e.reply.to_bytes() for e in events if isinstance(e, SendReply)]


def test_smtp_offers_starttls_until_it_is_active() -> None:
    codec = SmtpCodec(hostname="gw.test", max_size=0, starttls=True)
    assert b"250 STARTTLS\r\n" in _lines(_smtp(b"EHLO c\r\n", codec))[0]
    assert b"STARTTLS" in _lines(_smtp(b"HELP\r\n", codec))[0]
    [ready] = _smtp(b"STARTTLS\r\n", codec)
    assert isinstance(ready, SendReply) and ready.start_tls
    assert ready.reply.to_bytes() == b"220 2.0.0 Ready to start TLS\r\n"
    assert codec.helo == "" and codec.tls  # the client says EHLO again
    assert b"STARTTLS" not in _lines(_smtp(b"EHLO c\r\n", codec))[0]
    assert _lines(_smtp(b"STARTTLS\r\n", codec)) == [b"554 5.5.1 Error: TLS already active\r\n"]


def test_smtp_throws_away_what_is_pipelined_behind_starttls() -> None:
    """The CVE-2011-0411 class: commands a man in the middle appends after STARTTLS must not
    run once TLS is up."""
    codec = SmtpCodec(hostname="gw.test", max_size=0, starttls=True)
    _smtp(b"EHLO c\r\n", codec)
    events = _smtp(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<a@b.test>\r\n", codec)
    assert len(events) == 1 and isinstance(events[0], SendReply) and events[0].start_tls
    assert codec.discarded_after_starttls == len(
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<a@b.test>\r\n"
    )
    assert codec.buffered == 0
    # After the handshake the client starts over; nothing of the above is in force.
    assert _lines(_smtp(b"EHLO c\r\nRCPT TO:<a@b.test>\r\n", codec))[1].startswith(b"503 5.5.1")


@pytest.mark.parametrize(
    ("before", "command", "reply"),
    [
        (b"", b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
        (
            b"MAIL FROM:<a@b.test>\r\n",
            b"STARTTLS\r\n",
            b"503 5.5.1 Error: MAIL transaction in progress\r\n",
        ),
    ],
)
def test_smtp_starttls_refusals(before: bytes, command: bytes, reply: bytes) -> None:
    codec = SmtpCodec(hostname="gw.test", max_size=0, starttls=True)
    _smtp(b"EHLO c\r\n" + before, codec)
    assert _lines(_smtp(command, codec)) == [reply]
    assert not codec.tls


def test_smtp_without_tls_answers_starttls_502_and_offers_nothing() -> None:
    codec = SmtpCodec(hostname="gw.test", max_size=0)
    assert b"STARTTLS" not in _lines(_smtp(b"EHLO c\r\n", codec))[0]
    assert _lines(_smtp(b"STARTTLS\r\n", codec)) == [
        b"502 5.5.1 Error: command not implemented\r\n"
    ]


def test_smtp_that_requires_tls_refuses_mail_before_it() -> None:
    codec = SmtpCodec(hostname="gw.test", max_size=0, starttls=True, require_tls=True)
    _smtp(b"EHLO c\r\n", codec)
    assert _lines(_smtp(b"MAIL FROM:<a@b.test>\r\n", codec)) == [
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    ]
    _smtp(b"STARTTLS\r\n", codec)
    assert _lines(_smtp(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", codec))[1] == b"250 2.1.0 Ok\r\n"


# --- NNTP STARTTLS (RFC 4642) ------------------------------------------------------------


def _nntp(data: bytes, codec: NntpCodec) -> list[bytes]:
    codec.receive_data(data)
    out: list[bytes] = []
    while (event := codec.next_event()) is not None:
        if isinstance(event, SendResponse):
            out.append(event.to_bytes())
        elif isinstance(event, ArticleReceived):
            out.append(b"<article>")
            from gateway.protocols.nntp.codec import Response

            codec.answer(Response(239 if event.command == "TAKETHIS" else 240, "ok"))
    return out


def test_nntp_offers_starttls_and_keeps_authinfo_for_after_it() -> None:
    codec = NntpCodec(hostname="gw.test", starttls=True, auth_available=True)
    [caps] = _nntp(b"CAPABILITIES\r\n", codec)
    assert b"\r\nSTARTTLS\r\n" in caps and b"AUTHINFO" not in caps
    assert _nntp(b"AUTHINFO USER joe\r\n", codec) == [
        b"483 Encryption required: use STARTTLS before AUTHINFO\r\n"
    ]
    codec.receive_data(b"STARTTLS\r\nAUTHINFO USER evil\r\n")
    event = codec.next_event()
    assert isinstance(event, SendResponse) and event.start_tls
    assert event.to_bytes() == b"382 Continue with TLS negotiation\r\n"
    assert codec.next_event() is None  # the pipelined AUTHINFO was thrown away
    assert codec.discarded_after_starttls == len(b"AUTHINFO USER evil\r\n")
    [caps] = _nntp(b"CAPABILITIES\r\n", codec)
    assert b"STARTTLS" not in caps and b"AUTHINFO USER" in caps
    assert _nntp(b"STARTTLS\r\n", codec) == [b"502 TLS is already active\r\n"]


def test_nntp_that_requires_tls_answers_483_to_transfers_before_it() -> None:
    codec = NntpCodec(hostname="gw.test", starttls=True, require_tls=True)
    article = b"Subject: s\r\n\r\nbody\r\n.\r\n"
    assert (
        _nntp(b"IHAVE <a@b>\r\nCHECK <a@b>\r\nPOST\r\n", codec)
        == [b"483 Encryption required: use STARTTLS first\r\n"] * 3
    )
    # A TAKETHIS article is read to its end all the same, so the next command is found.
    assert _nntp(b"TAKETHIS <a@b>\r\n" + article + b"DATE\r\n", codec)[0] == (
        b"483 Encryption required: use STARTTLS first\r\n"
    )
    _nntp(b"STARTTLS\r\n", codec)
    assert _nntp(b"TAKETHIS <a@b>\r\n" + article, codec) == [b"<article>", b"239 ok\r\n"]


def test_nntp_without_tls_answers_starttls_502() -> None:
    codec = NntpCodec(hostname="gw.test")
    assert _nntp(b"STARTTLS\r\n", codec) == [b"502 STARTTLS is not available here\r\n"]
