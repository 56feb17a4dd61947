"""Fetching an input image by URL through the SSRF-safe client: at most 3 redirects, each one re-checked;
a size limit enforced while reading; one total timeout."""

from __future__ import annotations

import asyncio

import httpx

from .safe_http import OutboundError, parse_url, redact, safe_client

MAX_REDIRECTS = 3


class DownloadError(OutboundError):
    """An image download that failed: transport error, non-2xx, too large or too slow."""


async def fetch_bytes(url: str, *, allow_private: bool, max_bytes: int,
                      timeout: float = 10.0) -> tuple[bytes, str | None]:
    """GET `url` (following at most 3 redirects) and return (body, content-type).

    Raises OutboundURLError for a refused URL (also after a redirect) and DownloadError when the download
    fails, answers non-2xx, is larger than `max_bytes` or takes longer than `timeout` seconds in total.
    """
    purpose = "URL"
    target = parse_url(url, purpose)
    try:
        async with asyncio.timeout(timeout), safe_client(allow_private, timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                request = client.build_request("GET", target, headers={"Accept-Encoding": "identity"})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        target = parse_url(str(response.url.join(response.headers["location"])), purpose)
                        continue
                    return await _read_body(response, max_bytes), response.headers.get("content-type")
                finally:
                    await response.aclose()
            raise DownloadError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")
    except (TimeoutError, httpx.TimeoutException):
        raise DownloadError(f"{redact(url)}: download took longer than {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"{redact(url)}: download failed ({type(exc).__name__}: {exc})") from None


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    where = redact(response.url)
    if not response.is_success:
        raise DownloadError(f"{where}: the server answered HTTP {response.status_code}")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise DownloadError(f"{where}: {length} bytes is more than the limit of {max_bytes}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise DownloadError(f"{where}: the body is more than the limit of {max_bytes} bytes")
    return bytes(body)
