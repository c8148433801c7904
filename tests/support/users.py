"""Password hashes for tests: made once per password (Argon2 is slow on purpose)."""

from __future__ import annotations

import functools

from gateway.users import hash_password


@functools.cache
def hashed(password: str) -> str:
    return hash_password(password)
