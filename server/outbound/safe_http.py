"""The SSRF-safe HTTP client every outbound request of the server goes through (image downloads, webhooks,
uploadEndpoint PUTs).

Safe by default. A URL a client hands us is refused unless it is http(s), has a host, and every address
that host resolves to is public. Loopback, private, link-local (including the cloud metadata address
169.254.169.254), unspecified, multicast, reserved and other non-global ranges are refused, and so are
IPv6 forms that embed such an IPv4 address (IPv4-mapped, 6to4, Teredo). `allow_private=True` lifts this
for trusted deployments.

DNS rebinding. Checking a name and then letting the HTTP client resolve it again leaves a window in which
the name can change to an internal address. So the check runs where the connection is made: every
request goes through an httpcore network backend (`_CheckingBackend`) that resolves the host once,
refuses it if any address fails the policy, and then opens the TCP connection to one of exactly those
checked addresses. The URL is not rewritten, so the Host header, TLS SNI and certificate checks still
use the host name (httpcore calls `start_tls(server_hostname=<URL host>)` on the stream we return).
Environment proxies are disabled (`trust_env=False`), because a proxy would make the connection for us.
`check_url` runs the same resolve-and-check up front, so callers can turn a bad URL into a parameter
error when the request arrives. Redirects are never followed for webhooks and uploads; image downloads
follow at most 3, and each hop connects through the same checking backend.

URLs are logged as scheme://host[:port]/path only: query strings and user info can hold credentials.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl

import httpcore
import httpx

log = logging.getLogger("k5serve.outbound")

USER_AGENT = "k5serve"


class OutboundError(Exception):
    """Base class for the errors of this module."""


class OutboundURLError(OutboundError, ValueError):
    """A URL that must not be requested; the message is fit to return to the client."""

    def __init__(self, message: str, purpose: str = ""):
        super().__init__(message)
        self.purpose = purpose


def redact(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path, without user info, query or fragment: safe to log."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    host = f"[{u.host}]" if ":" in u.host else u.host
    port = f":{u.port}" if u.port is not None else ""
    return f"{u.scheme}://{host}{port}{u.path}"


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address must not be connected to, or None if it is public."""
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        for v4 in filter(None, embedded):
            if (why := _refusal(v4)) is not None:
                return f"{why} (embedded in an IPv6 address)"
    checks = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (getattr(ip, "is_site_local", False), "a site-local address"),
        (not ip.is_global, "not a globally routable address"),
    ]
    return next((why for refused, why in checks if refused), None)


async def resolve(host: str, port: int) -> list[str]:
    """All addresses (A and AAAA) of `host`, in the resolver's order; raises OSError if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"no addresses for {host!r}")
    return addresses


async def _checked_addresses(host: str, port: int, *, allow_private: bool, purpose: str) -> list[str]:
    """Resolve `host` and refuse it if any of its addresses is not public (unless allowed)."""
    addresses = await resolve(host, port)
    if not allow_private:
        for address in addresses:
            why = _refusal(ipaddress.ip_address(address.split("%", 1)[0]))  # drop an IPv6 zone id
            if why is not None:
                shown = host if host == address else f"{host} resolves to {address}, which"
                raise OutboundURLError(f"{purpose}: {shown} is {why}; only public hosts are allowed", purpose)
    return addresses


def parse_url(url: str, purpose: str) -> httpx.URL:
    """The URL if it is a well-formed http(s) URL with a host; the DNS check happens later."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise OutboundURLError(f"{purpose}: not a valid URL ({exc})", purpose) from None
    if u.scheme not in ("http", "https"):
        scheme = u.scheme or "(none)"
        raise OutboundURLError(f"{purpose}: scheme {scheme!r} is not allowed; use http or https", purpose)
    if not u.host:
        raise OutboundURLError(f"{purpose}: the URL has no host", purpose)
    return u


async def check_url(url: str, *, allow_private: bool, purpose: str) -> None:
    """Raise OutboundURLError unless `url` may be requested. `purpose` names the parameter in messages.

    Requests made by this module repeat the check when they connect, so this is for early, friendly errors.
    """
    u = parse_url(url, purpose)
    try:
        await _checked_addresses(u.host, u.port or (443 if u.scheme == "https" else 80),
                                 allow_private=allow_private, purpose=purpose)
    except OSError:
        raise OutboundURLError(f"{purpose}: host {u.host!r} could not be resolved", purpose) from None


# --- HTTP client that connects only to checked addresses --------------------------------------------


class _CheckingBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host at connect time, then connects to one of the checked addresses."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            async with asyncio.timeout(timeout):
                addresses = await _checked_addresses(host, port, allow_private=self.allow_private, purpose="URL")
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)  # loading the CA bundle takes ~10 ms: do it once


class _CheckingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_private: bool, max_connections: int = 16):
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx 0.28 has no public parameter for a network backend; httpcore's pool takes one, so swap it in.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(), max_connections=max_connections,
            network_backend=_CheckingBackend(allow_private),
        )


def safe_client(allow_private: bool, timeout: float, max_connections: int = 16) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=_CheckingTransport(allow_private, max_connections), timeout=timeout, follow_redirects=False,
        trust_env=False, headers={"User-Agent": USER_AGENT},
    )
