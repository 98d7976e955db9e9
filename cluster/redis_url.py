"""Redis URLs: the one check of their scheme and the one way to show them without a password."""

from __future__ import annotations

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with `url` as a Redis URL, or None when nothing is."""
    if url.startswith(REDIS_URL_SCHEMES):
        return None
    return f"expected redis://, rediss:// or unix://, got {url!r}"


def redact_url(url: str) -> str:
    """The URL with its credentials (anything before '@') replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
