"""API keys: compared in constant time, never logged."""

from __future__ import annotations

import hmac


class Authenticator:
    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def check(self, key: object) -> bool:
        if self.open:
            return True
        if not isinstance(key, str) or not key:
            return False
        candidate = key.encode("utf-8", "surrogatepass")  # a lone surrogate cannot match, and must not raise
        # Compare against every key, without an early exit, so timing says nothing about which matched.
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(candidate, known)
        return matched


def bearer(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
