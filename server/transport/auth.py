"""API keys: compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac

ANONYMOUS = "anonymous"  # the caller of a server without keys


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

    def identify(self, key: object) -> str | None:
        """Who calls with `key`: an id derived from the key (a digest, never the key itself), or None when the
        key is not valid. Every caller of a server without keys is `ANONYMOUS`."""
        if not self.check(key):
            return None
        if self.open:
            return ANONYMOUS
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def bearer(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
