"""HMAC-SHA256 signatures of web hook bodies (``sha256=<hex>``, GitHub's form).

The web hook destination signs what it sends; the ``http_to_mail`` transform
checks what it is sent.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["sign", "sign_file", "signature_matches"]


def sign(secret: str | bytes, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` under ``secret``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def sign_file(secret: str | bytes, prefix: bytes, path: str, suffix: bytes) -> str:
    """``sign`` of ``prefix`` + the file at ``path`` + ``suffix``, read a block at a time
    (blocking: run it in a thread)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    digest = hmac.new(key, prefix, hashlib.sha256)
    with open(path, "rb") as source:
        while block := source.read(1024 * 1024):
            digest.update(block)
    digest.update(suffix)
    return "sha256=" + digest.hexdigest()


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
