"""API keys: checked against the tenants in force (`server.tenants`), in constant time, never logged; a valid key
becomes its `Caller`."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from k5serve.context import Caller, RequestContext, request_id

from ..protocol.errors import invalid_api_key
from ..tenants import Tenants


class Authenticator:
    def __init__(self, tenants: Tenants):
        self.tenants = tenants

    @property
    def open(self) -> bool:
        return self.tenants.open

    def check(self, key: object) -> bool:
        return self.identify(key) is not None

    def identify(self, key: object) -> Caller | None:
        """Who calls with `key`: its tenant's `Caller` (a name, never the key), or None when no tenant has that
        key. Every caller of a server without keys is `anonymous`."""
        return self.tenants.identify(key)


def bearer_caller(connection: HTTPConnection, auth: Authenticator) -> Caller:
    """The caller of a read-only endpoint keyed by `Authorization: Bearer <key>` (GET /tasks, GET /usage), or
    the 401 TaskError that refuses it."""
    key = bearer(connection.headers.get("authorization", ""))
    caller = auth.identify(key)
    if caller is None:
        raise invalid_api_key() if key else invalid_api_key("Missing API key: send Authorization: Bearer <key>.")
    return caller


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
