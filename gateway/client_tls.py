"""TLS for the gateway's clients (web hooks, DNS over HTTPS, FTP destinations).

A CA file named in the configuration becomes a trust root; ``verify: false``
becomes a connection creator that checks nothing but still sends SNI.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["UnverifiedTls", "is_ip", "load_trust_root"]


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address, as opposed to a host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_trust_root(path: str) -> Any:
    """The certificates of the PEM file at ``path``; ValueError says what is wrong with it."""
    try:
        with open(path, "rb") as pem_file:
            text = pem_file.read()
    except OSError as exc:
        raise ValueError(f"cannot read the CA file {path}: {exc.strerror}") from None
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, flags=re.DOTALL
    )
    if not blocks:
        raise ValueError(f"the CA file {path} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
        return trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ValueError(
            f"the CA file {path} holds a certificate that cannot be read: {exc}"
        ) from None


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTls:
    """TLS without certificate checks (verify: false), still sending SNI for DNS names.

    ``acceptable_protocols`` are offered by ALPN; None offers nothing.
    """

    def __init__(self, hostname: str, acceptable_protocols: Sequence[bytes] | None = None) -> None:
        protocols = None if acceptable_protocols is None else list(acceptable_protocols)
        self._options = CertificateOptions(verify=False, acceptableProtocols=protocols)
        self._sni = None if is_ip(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection
