"""HMAC-SHA256 signatures of web hook bodies (``sha256=<hex>``, GitHub's form).

The web hook destination signs what it sends; the ``http_to_mail`` transform
checks what it is sent.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["sign", "signature_matches"]


def sign(secret: str | bytes, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` under ``secret``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_matches(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``sha256=<hex>`` of ``body`` under ``secret``; constant time."""
    if not header:
        return False
    expected = sign(secret, body).encode("ascii")
    # The prefix is case-insensitive in practice, the hex digits too.
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = "sha256=" + given[7:].lower()
    return hmac.compare_digest(expected, given.encode("utf-8", "replace"))
