"""Who is asking, and through what: the `RequestContext` each transport builds once, at the edge.

It travels explicitly from the transport to the dispatcher, every task handler and `Worker.submit`; the
task record keeps its caller (the `caller` column), and the task's log lines carry the caller and the
request id. It authorises nothing by itself: it says who it is.

- `Caller`: which API key matched, by a stable name that is not the key (`key-` and the first 16 hex digits
  of the key's SHA-256), and whether it is an operator. Every key of `--api-key` is an operator (each sees
  every task, as it always has); a server without keys has one caller, `anonymous`, an operator too.
- `request_id`: the trace id of a W3C `traceparent` header when the request carries a valid one, so a log
  line can be found from the client's trace; else a new random id (32 hex digits, the same shape).
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import uuid
from dataclasses import dataclass, field

TRANSPORTS = ("http", "websocket", "openai")  # openai: the OpenAI Images API (over HTTP)


@dataclass(frozen=True)
class Caller:
    name: str  # stable and not secret: in logs, on task records, in admission counts and session ownership
    operator: bool = False
    weight: float = 1.0  # its share of the generation slots against other callers' (the tenants file)

    def sees(self, owner: str | None) -> bool:
        """Whether this caller may see a task of `owner` (None: a record written before callers were kept)."""
        return self.operator or owner == self.name

    @classmethod
    def for_key(cls, key: str, *, operator: bool = True) -> Caller:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return cls(f"key-{digest[:16]}", operator)


ANONYMOUS = Caller("anonymous", operator=True)  # every caller of a server without keys

# version "-" trace-id "-" parent-id "-" flags, lower-case hex (https://www.w3.org/TR/trace-context/)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def request_id(traceparent: str | None = None) -> str:
    """The trace id of a valid `traceparent` (version ff, an all-zero trace or parent id, or extra fields on
    version 00 make it invalid, as the specification says), else a new random id."""
    if traceparent:
        found = _TRACEPARENT.match(traceparent.strip())
        if found:
            version, trace, parent, _, extra = found.groups()
            if version != "ff" and trace != "0" * 32 and parent != "0" * 16 and not (version == "00" and extra):
                return trace
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RequestContext:
    caller: Caller
    transport: str  # one of TRANSPORTS
    client: str | None = None  # the peer's "host:port", as the ASGI server reports it
    request_id: str = field(default_factory=request_id)
    base_url: str = ""  # where this request reached the server: image URLs in answers start with it

    def log_fields(self) -> dict[str, str]:
        """What a log line about this request says about it (never a key)."""
        return {"caller": self.caller.name, "requestId": self.request_id, "transport": self.transport}


# The request a log line is about: set with the task (dispatcher, worker), read by the log formatters.
current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("k5serve_request",
                                                                                       default=None)
