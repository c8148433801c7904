"""TLS for the listeners, written once: the ``tls:`` block, its policy, STARTTLS and reloads.

A listener with a ``tls:`` block speaks TLS on its ``tls:`` endpoints from the
first byte (SMTP on 465, NNTP on 563, HTTPS, DoH) and offers STARTTLS on its
plain ones where the protocol has it (SMTP, NNTP).  The certificate chain and
key are read and checked when the file is (``gateway check``, a reload): a key
that does not belong to the certificate, or a certificate that has expired or
is not valid yet, is a configuration error, so a SIGHUP with a bad file keeps
the certificate in use.  The files' content is part of the configuration: a
reload after a certificate renewal serves the new one to new connections,
while connections open keep theirs.

Every TLS listener has the same policy (``ssl:`` endpoint strings too, which
carry their key and certificate in the string): TLS 1.2 and 1.3 only, for 1.2
forward-secret key exchange with AEAD ciphers only (Mozilla's "intermediate"
list), session IDs and tickets for resumption, and an ALPN choice that lets a
client offering protocols the listener lacks connect anyway.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import HIDDEN, ConfigPath, doc

__all__ = [
    "TLS_CIPHERS",
    "ServerTls",
    "TlsConfig",
    "TlsMaterial",
    "apply_tls_policy",
    "session_cipher",
    "tls_endpoint",
]

# For TLS 1.2: forward secret key exchange with AEAD ciphers (Mozilla's "intermediate"
# list): no CBC suites (LUCKY13), no static RSA key exchange. TLS 1.3 suites are all AEAD.
TLS_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)

_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class TlsMaterial:
    """The files of a ``tls:`` block as read: PEM bytes, checked to belong together."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    not_after: datetime.datetime


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def load_material(
    certificate: str, key: str, client_ca: str | None, now: datetime.datetime | None = None
) -> TlsMaterial:
    """Read and check the files; ValueError says what is wrong with which file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain = _read(certificate, "certificate")
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise ValueError(f"{certificate} holds no PEM certificate") from None
    key_pem = _read(key, "key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        why = "it is encrypted" if isinstance(exc, TypeError) else "not a PEM private key"
        raise ValueError(f"cannot use the key {key}: {why}") from None
    leaf = certificates[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != private.public_key().public_bytes(der, spki):
        raise ValueError(
            f"the key {key} does not belong to the certificate {certificate}"
            f" ({leaf.subject.rfc4514_string()})"
        )
    now = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        raise ValueError(
            f"the certificate {certificate} ({leaf.subject.rfc4514_string()}) expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if leaf.not_valid_before_utc > now:
        raise ValueError(
            f"the certificate {certificate} ({leaf.subject.rfc4514_string()}) is not valid"
            f" before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    ca = None
    if client_ca is not None:
        ca = _read(client_ca, "client CA file")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ValueError(f"{client_ca} holds no PEM certificate") from None
    return TlsMaterial(chain, key_pem, ca, leaf.not_valid_after_utc)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """A listener's ``tls:`` block: TLS on its ``tls:`` endpoints, STARTTLS on the others."""

    certificate: ConfigPath = field(
        metadata=doc("PEM certificate chain, the server's certificate first")
    )
    key: ConfigPath = field(metadata=doc("PEM private key of the certificate (unencrypted)"))
    client_ca: ConfigPath | None = field(
        default=None,
        metadata=doc("PEM CA certificates: clients must present a certificate they signed"),
    )
    min_version: str = field(default="1.2", metadata=doc("lowest TLS version: 1.2 or 1.3"))
    require: bool = field(
        default=False,
        metadata=doc(
            "refuse mail (SMTP 530 5.7.0) and articles (NNTP 483) until the client has started TLS"
        ),
    )
    # What the files held when the configuration was read (not a key of the file).
    material: TlsMaterial | None = field(default=None, metadata=HIDDEN, repr=False)

    def __post_init__(self) -> None:
        if self.min_version not in _VERSIONS:
            raise ValueError(f"'min_version' must be 1.2 or 1.3, not '{self.min_version}'")
        if self.material is None:
            material = load_material(self.certificate, self.key, self.client_ca)
            object.__setattr__(self, "material", material)


def _select_alpn(connection: Any, offered: list[bytes]) -> Any:
    """Pick the first protocol the listener speaks that the client offers; else go on without.

    Twisted's own choice aborts the handshake ("tlsv1 alert internal error")
    when nothing overlaps, which fails every ALPN client (curl, openssl -alpn)
    on an SMTP or NNTP listener, whose factories name no protocols.
    """
    from OpenSSL.SSL import NO_OVERLAPPING_PROTOCOLS
    from twisted.internet.interfaces import IProtocolNegotiationFactory

    app = connection.get_app_data()
    factory = app.factory.wrappedFactory if hasattr(app, "factory") else None
    negotiation: Any = IProtocolNegotiationFactory(factory, None)
    if negotiation is not None:
        for protocol in negotiation.acceptableProtocols():
            if protocol in offered:
                return protocol
    return NO_OVERLAPPING_PROTOCOLS


def _options(
    private_key: Any,
    certificate: Any,
    chain: list[Any],
    *,
    min_version: str = "1.2",
    client_ca: list[Any] | None = None,
    dh_parameters: Any = None,
) -> Any:
    """CertificateOptions with the listeners' policy, its context made with ALPN."""
    from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

    options = CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        extraCertChain=chain,
        dhParameters=dh_parameters,
        raiseMinimumTo=TLSVersion.TLSv1_3 if min_version == "1.3" else TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS_CIPHERS),  # type: ignore[no-untyped-call]
        enableSessions=True,
        enableSessionTickets=True,
        verify=client_ca is not None,
        caCerts=client_ca,
        requireCertificate=client_ca is not None,
    )
    # The context is made once and cached; each connection is made from it.
    options.getContext().set_alpn_select_callback(_select_alpn)
    return options


def apply_tls_policy(endpoint: Any) -> None:
    """Give an ``ssl:`` endpoint the listeners' TLS: versions, ciphers, resumption, ALPN.

    Twisted's ``ssl:`` endpoint string takes the key and certificates but no
    cipher or version settings, and its defaults offer CBC suites and static RSA
    key exchange and resume no session.  The endpoint's options are made again
    from the same key and certificates with the policy.
    """
    from twisted.internet.ssl import CertificateOptions

    options = getattr(endpoint, "_sslContextFactory", None)
    if not isinstance(options, CertificateOptions):
        return  # not an ssl: endpoint (tcp:, unix:, systemd:)
    endpoint._sslContextFactory = _options(
        options.privateKey,
        options.certificate,
        list(options.extraCertChain or ()),
        dh_parameters=options.dhParameters,
    )


class ServerTls:
    """A listener's TLS at run time: the context new connections get, replaced on reload.

    It is the "connection creator" given to every TLS port and every STARTTLS of
    the listener, so a reload that brings a new certificate serves it to the
    connections made from then on without closing a socket.
    """

    def __init__(self, config: TlsConfig, *, tls13: bool = True) -> None:
        self.config = config
        self.tls13 = tls13  # False: TLS 1.2 at most (see up_to_tls12)
        self._context = self._make(config, tls13)
        self._tls12: ServerTls | None = None

    @staticmethod
    def _make(config: TlsConfig, tls13: bool = True) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from OpenSSL import crypto

        material = config.material
        assert material is not None
        chain = x509.load_pem_x509_certificates(material.chain)
        certificates = [crypto.X509.from_cryptography(c) for c in chain]
        key = crypto.PKey.from_cryptography_key(
            serialization.load_pem_private_key(material.key, password=None)  # type: ignore[arg-type]
        )
        client_ca = None
        if material.client_ca is not None:
            client_ca = [
                crypto.X509.from_cryptography(c)
                for c in x509.load_pem_x509_certificates(material.client_ca)
            ]
        options = _options(
            key,
            certificates[0],
            certificates[1:],
            min_version=config.min_version,
            client_ca=client_ca,
        )
        context = options.getContext()
        if not tls13:
            from OpenSSL import SSL

            context.set_max_proto_version(SSL.TLS1_2_VERSION)
        return context

    def update(self, config: TlsConfig) -> None:
        """New files or settings for new connections (they were checked when read)."""
        if config != self.config:
            self._context = self._make(config, self.tls13)
            self.config = config
            self._tls12 = None

    def up_to_tls12(self) -> ServerTls:
        """The same TLS without version 1.3, for connections whose clients break with it
        (FTP data connections: see gateway.protocols.ftp.data)."""
        if not self.tls13 or self.config.min_version == "1.3":
            return self  # already so; or the operator wants 1.3 only: so be it
        if self._tls12 is None:
            self._tls12 = ServerTls(self.config, tls13=False)
        return self._tls12

    @property
    def require(self) -> bool:
        return self.config.require

    def wrap(self, factory: Any) -> Any:
        """``factory`` behind TLS from the first byte (a ``tls:`` endpoint's)."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        creator: Any = self  # an IOpenSSLServerConnectionCreator (mypy sees no zope)
        return TLSMemoryBIOFactory(creator, False, factory)

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, protocol: Any) -> Any:
        from OpenSSL.SSL import Connection

        return Connection(self._context, None)


def _declare_creator() -> None:
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface import classImplements  # type: ignore[import-untyped]

    classImplements(ServerTls, IOpenSSLServerConnectionCreator)


_declare_creator()


_STREAM_KINDS = ("tcp", "tcp6", "unix", "systemd")


def tls_endpoint(description: str) -> str:
    """The plain endpoint under a ``tls:`` one: ``tls:465:interface=::1`` is on
    ``tcp:465:interface=::1``; ``tls:systemd:name=smtps`` on that systemd socket."""
    rest = description.split(":", 1)[1]
    if rest.split(":", 1)[0].lower() in _STREAM_KINDS:
        return rest
    return "tcp:" + rest


def session_cipher(transport: Any) -> str | None:
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`` for a TLS transport
    (the words of Postfix's Received header), None for a plain one or before the handshake."""
    handle = getattr(transport, "getHandle", None)
    connection: Any = handle() if handle is not None else None
    name = getattr(connection, "get_cipher_name", None)
    if name is None:
        return None
    cipher = name()
    if cipher is None:
        return None
    bits = connection.get_cipher_bits()
    return f"{connection.get_protocol_version_name()} with cipher {cipher} ({bits}/{bits} bits)"
