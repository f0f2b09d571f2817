"""Store URLs without their secrets, for messages and logs: ``redact`` hides them,
``url_secrets`` lists them (to scrub from any text that may quote them). Beneath
every module that reports a URL (the factory, the Redis store, the CLI, the demo)."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_SECRET_OPTION = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|secret|token)[^=&]*=)[^&]*")


def _cut_userinfo(url: str) -> tuple[int, int] | None:
    """Where the user part of ``url`` starts and ends (after its '@') when a bare
    '/', '?' or '#' in it (a base64 password) makes ``urlsplit`` see none; else None."""
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    end = url.rfind("@")
    if end < start:
        return None
    try:
        if "@" in urlsplit(url).netloc:
            return None
    except ValueError:
        pass
    return start, end + 1


def url_secrets(url: str) -> list[str]:
    """The secrets ``redact`` hides in ``url`` (and their pieces at '/', '?', '#',
    which a parser's message may quote alone), longest first, to scrub from any text
    that may quote them."""
    found: list[str] = []
    cut = _cut_userinfo(url)
    if cut is not None:
        userinfo = url[cut[0] : cut[1] - 1]
    else:
        try:
            netloc = urlsplit(url).netloc
        except ValueError:
            netloc = ""
        userinfo = netloc.rsplit("@", 1)[0] if "@" in netloc else ""
    if userinfo:
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    query = url.partition("?")[2]
    found += [m.group(0).split("=", 1)[1] for m in _SECRET_OPTION.finditer(query)]
    pieces = [p for s in found for p in re.split(r"[/?#&]", s)]
    every = {t for t in (*found, *(unquote(s) for s in found), *pieces) if len(t) >= 3}
    return sorted(every, key=len, reverse=True)  # (shorter: no secret, and would mangle)


def redact(url: str) -> str:
    """The URL without its secrets: the password of its user part (all of a user part
    without a colon, which the cluster and sentinel forms take as the password, as a
    ``redis://`` URL may name a user alone), and the value of every query option that
    names a password, secret or token (``?password=...``)."""
    cut = _cut_userinfo(url)
    if cut is not None:  # a password with a bare '/', '?' or '#' cut the user part short
        return redact(f"{url[: cut[0]]}***@{url[cut[1] :]}")
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = _SECRET_OPTION.sub(r"\1***", query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    redacted = parts._replace(netloc=netloc, query=query).geturl()
    if not netloc and url[len(parts.scheme) :].startswith(":///"):  # unix:///path?...
        redacted = f"{parts.scheme}://{redacted[len(parts.scheme) + 1 :]}"
    return redacted
