"""Requests the server makes: the SSRF-safe HTTP client (`safe_http`), input image downloads
(`downloads`) and the webhook/upload delivery loop (`outbox`). Imports `protocol` and `store`."""
