"""Tenants: who may call, under which name, with which share and limits. Configuration, re-read while serving.

A tenants file (`--tenants FILE`, `K5SERVE_TENANTS`) is TOML, one `[[tenant]]` table per tenant:

    [[tenant]]
    name = "web-app"            # in logs, metrics, usage and the queue view; never the key
    key_sha256 = "…64 hex…"     # the SHA-256 of the key (or `key = "…"` in clear; exactly one of the two)
    weight = 2                  # fair-share weight, default 1
    max_queued = 20             # tasks queued or running at once, default unlimited
    max_per_minute = 120        # tasks submitted per minute, default unlimited
    admin = true                # sees every tenant's tasks and usage, default false

Every key of `--api-key` / `K5SERVE_API_KEYS` is a tenant too, named `key-` and the first 16 hex digits of the
key's SHA-256, an admin with weight 1 and no limits: deployments without a tenants file behave as before. A
server with neither has one caller, `anonymous`, an admin.

A key is checked by hashing it once and comparing the digest with every tenant's, each comparison in constant
time and none skipped, so the time taken says nothing about which tenant (if any) matched. Keys are never
kept in clear after parsing and never logged. `Tenants.reload` re-reads the file (the server calls it when
the file changes and on SIGHUP); a file that does not parse leaves the tenants in force and says why.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k5serve.context import ANONYMOUS, Caller

log = logging.getLogger("k5serve.tenants")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a Prometheus label value: kept plain
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_FIELDS = {"name", "key", "key_sha256", "weight", "max_queued", "max_per_minute", "admin"}


class TenantError(ValueError):
    """A tenants file that cannot be used; the message names the tenant and the field."""


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str  # lower-case hex
    weight: float = 1.0
    max_queued: int | None = None
    max_per_minute: int | None = None
    admin: bool = False

    @property
    def caller(self) -> Caller:
        return Caller(self.name, operator=self.admin, weight=self.weight)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def from_api_key(key: str) -> Tenant:
    """A `--api-key` key as a tenant: the caller name it always had, an admin, no limits."""
    return Tenant(Caller.for_key(key).name, key_digest(key), admin=True)


def _tenant(entry: Any, index: int) -> Tenant:
    where = f"tenant {index + 1}"
    if not isinstance(entry, dict):
        raise TenantError(f"{where}: each [[tenant]] must be a table")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise TenantError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_FIELDS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise TenantError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit")
    where = f"tenant {name!r}"
    if ("key" in entry) == ("key_sha256" in entry):
        raise TenantError(f"{where}: give exactly one of key and key_sha256")
    if "key" in entry:
        if not isinstance(entry["key"], str) or not entry["key"]:
            raise TenantError(f"{where}: key must be a non-empty string")
        digest = key_digest(entry["key"])
    else:
        if not isinstance(entry["key_sha256"], str) or not _HEX64.match(entry["key_sha256"]):
            raise TenantError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of the key)")
        digest = entry["key_sha256"].lower()
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.001 <= weight <= 1000:
        raise TenantError(f"{where}: weight must be a number from 0.001 to 1000")
    limits = {}
    for field in ("max_queued", "max_per_minute"):
        value = entry.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TenantError(f"{where}: {field} must be a whole number of at least 1")
        limits[field] = value
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise TenantError(f"{where}: admin must be true or false")
    return Tenant(name, digest, float(weight), admin=admin, **limits)


def parse_tenants(text: str) -> list[Tenant]:
    """The tenants of a tenants file's text, or TenantError saying what is wrong (and where)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantError(f"not valid TOML: {exc}") from None
    unknown = set(data) - {"tenant"}
    if unknown:
        raise TenantError(f"unknown top-level key(s) {', '.join(sorted(unknown))}: tenants are [[tenant]] tables")
    entries = data.get("tenant", [])
    if not isinstance(entries, list):
        raise TenantError("tenants are [[tenant]] tables (an array of tables)")
    return [_tenant(entry, i) for i, entry in enumerate(entries)]


def _check_unique(tenants: list[Tenant]) -> None:
    names, digests = set(), set()
    for tenant in tenants:
        if tenant.name in names:
            raise TenantError(f"tenant {tenant.name!r} is named twice")
        if tenant.key_sha256 in digests:
            raise TenantError(f"tenant {tenant.name!r} has the key of another tenant")
        names.add(tenant.name)
        digests.add(tenant.key_sha256)


class Tenants:
    """The tenants in force: those of `--api-key` and those of the tenants file, by key digest and by name."""

    def __init__(self, api_keys: tuple[str, ...] = (), path: Path | None = None):
        self.path = path
        self._fixed = [from_api_key(key) for key in api_keys]
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, Tenant] = {}
        self._by_name: dict[str, Tenant] = {}
        self.error: str | None = None  # why the file's last version is not in force
        self.loaded_at: float | None = None
        self._seen: tuple[float, int] | None = None  # the file's (mtime, size) when last read
        self._install(self._fixed + (self._read() if path is not None else []))  # a bad file at start: an error

    @property
    def open(self) -> bool:
        """No keys at all: every caller is `anonymous`, an admin."""
        return not self._by_digest and self.path is None

    def _read(self) -> list[Tenant]:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_bytes().decode("utf-8")
        except OSError as exc:
            self._seen = None  # (looked at again once it is back)
            raise TenantError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            self._seen = (stat.st_mtime, stat.st_size)
            raise TenantError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        self._seen = (stat.st_mtime, stat.st_size)
        return parse_tenants(text)

    def _install(self, tenants: list[Tenant]) -> None:
        _check_unique(tenants)
        by_digest = {bytes.fromhex(t.key_sha256): t for t in tenants}
        with self._lock:
            self._by_digest, self._by_name = by_digest, {t.name: t for t in tenants}
        self.loaded_at = time.time()

    def changed(self) -> bool:
        """Whether the file's modification time or size differ from when it was last read."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
        except OSError:
            return self._seen is not None  # gone since it was last read: once
        return (stat.st_mtime, stat.st_size) != self._seen

    def reload(self) -> set[str] | None:
        """Re-read the file: the names of the tenants that are gone, or whose key or admin flag changed (their
        connections should close: they were authenticated as what they no longer are), or None when the file
        could not be used (the tenants in force stay; `error` says why)."""
        if self.path is None:
            return set()
        before = dict(self._by_name)
        try:
            self._install(self._fixed + self._read())
        except TenantError as exc:
            self.error = str(exc)
            log.error("tenants file %s not loaded, the previous tenants stay in force: %s", self.path, exc)
            return None
        self.error = None
        gone = {name for name, t in before.items() if name not in self._by_name
                or (self._by_name[name].key_sha256, self._by_name[name].admin) != (t.key_sha256, t.admin)}
        added = set(self._by_name) - set(before)
        log.info("tenants file %s loaded: %d tenant(s)%s%s", self.path, len(self._by_name),
                 f", added {', '.join(sorted(added))}" if added else "",
                 f", removed or re-keyed {', '.join(sorted(gone))}" if gone else "")
        return gone

    def identify(self, key: object) -> Caller | None:
        """The caller whose key this is, or None. Every tenant's digest is compared, in constant time each."""
        if self.open:
            return ANONYMOUS
        if not isinstance(key, str) or not key:
            return None
        candidate = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            table = self._by_digest
        found = None
        for digest, tenant in table.items():
            if hmac.compare_digest(candidate, digest):
                found = tenant
        return found.caller if found is not None else None

    def get(self, name: str) -> Tenant | None:
        """The tenant in force under this name (its weight and limits), or None."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def status(self) -> dict[str, Any]:
        """For /health: the file, how many tenants are in force, and why the file's last version is not."""
        body: dict[str, Any] = {"count": len(self._by_name)}
        if self.path is not None:
            body["file"] = str(self.path)
            if self.loaded_at is not None:
                body["loadedAt"] = round(self.loaded_at, 3)
            if self.error:
                body["error"] = self.error
        return body
