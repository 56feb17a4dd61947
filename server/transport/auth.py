"""API keys: compared in constant time, never logged; a valid key becomes its `Caller`."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from k5serve.context import ANONYMOUS, Caller, RequestContext, request_id


class Authenticator:
    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode() for k in keys)
        self._callers = {k: Caller.for_key(k) for k in keys}  # by key: computed once, not per request
        if len(set(self._callers.values())) < len(set(keys)):  # (16 hex digits of SHA-256: not in practice)
            raise ValueError("two API keys have the same caller name; use another key")

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

    def identify(self, key: object) -> Caller | None:
        """Who calls with `key`: its `Caller` (named from the key's digest, never the key itself), or None when
        the key is not valid. Every caller of a server without keys is `ANONYMOUS`."""
        if not self.check(key):
            return None
        return ANONYMOUS if self.open else self._callers[key]


def bearer(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def request_context(connection: HTTPConnection, caller: Caller, transport: str, base_url: str) -> RequestContext:
    """The context of a request (or a WebSocket connection) whose key has been checked: who, how, from where,
    under which request id (a W3C `traceparent` header's trace id when there is one)."""
    peer = connection.client
    traceparent = connection.headers.getlist("traceparent")  # several: none is trusted (W3C trace context)
    return RequestContext(caller, transport, client=f"{peer.host}:{peer.port}" if peer else None,
                          request_id=request_id(traceparent[0] if len(traceparent) == 1 else None), base_url=base_url)
