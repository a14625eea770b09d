"""Credentials in URLs: the one set of rules for every stored or printed form of a URL.

A source or model URL may carry secrets (``https://user:pass@host/ds.zip?token=...``, signed
``X-Amz-*``/``X-Goog-*`` parameters). The full URL is used only in memory, to fetch; manifests,
journals, cache metadata, params summaries, the app's ``/model`` and every message carry
:func:`redact_url`'s form. Standard library only, so every layer and image (ingest's, the app's)
can use it. Written here because no library in the lock does it: ``urllib.parse`` would normalize
the URL (and a redacted URL must stay character-for-character equal when it has no secret).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional
from urllib.parse import unquote_plus

_SECRET_PARAMS = frozenset({
    "token", "key", "sig", "signature", "password", "passwd", "pwd", "pass", "secret", "access_token",
    "refresh_token", "id_token", "auth", "authorization", "api_key", "apikey", "api-key", "credential",
    "credentials", "client_secret", "session", "sessiontoken", "session_token", "security_token", "policy",
    "key-pair-id", "private_key", "code",
})
_SECRET_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
_SECRET_SUFFIXES = ("token", "secret", "signature", "password", "_key", "-key", "apikey", "credential", "credentials")
REDACTED = "***"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def _is_secret_param(name: str) -> bool:
    n = unquote_plus(name).strip().lower()
    return n in _SECRET_PARAMS or n.startswith(_SECRET_PREFIXES) or n.endswith(_SECRET_SUFFIXES)


def _redact_params(query: str) -> str:
    out = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        out.append(f"{name}={REDACTED}" if eq and value and _is_secret_param(name) else pair)
    return "&".join(out)


def _split_url(url: str) -> tuple[str, str, str, str, str]:
    """``(scheme://, userinfo, host and path, ?query, #fragment)`` of *url*, as written (nothing normalized)."""
    scheme, _, rest = url.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    return f"{scheme}://", userinfo + at, host + slash + path, qmark + query, hash_ + fragment


def redact_url(url: str) -> str:
    """*url* without its credentials: the userinfo (``user:pass@``) becomes ``***@`` and the value of every
    secret query (or fragment) parameter -- ``token``, ``key``, ``sig``, ``signature``, ``password``,
    ``secret``, ``access_token``, ``X-Amz-*``, ``X-Goog-*``... any case -- becomes ``***``.

    The form every stored or printed URL takes (manifests, journals, cache metadata, messages); a URL
    without credentials, and any local path, is returned unchanged, character for character.
    """
    if "://" not in url:
        return url
    scheme, userinfo, rest, query, fragment = _split_url(url)
    if userinfo:
        userinfo = f"{REDACTED}@"
    if query:
        query = "?" + _redact_params(query[1:])
    if "=" in fragment:
        fragment = "#" + _redact_params(fragment[1:])
    return scheme + userinfo + rest + query + fragment


def url_secrets(url: str) -> list[str]:
    """The secret parts of *url* (userinfo, its password, secret parameter values), raw and percent-decoded."""
    if "://" not in url:
        return []
    _, userinfo, _, query, fragment = _split_url(url)
    found = []
    if userinfo:
        found += [userinfo[:-1], *userinfo[:-1].split(":", 1)[1:]]
    for part in (query[1:], fragment[1:]):
        for pair in part.split("&") if part else ():
            name, eq, value = pair.partition("=")
            if eq and value and _is_secret_param(name):
                found.append(value)
    found += [unquote_plus(v) for v in found]
    return sorted({v for v in found if len(v) >= 3}, key=len, reverse=True)


def redact_text(text: str, urls: Iterable[Optional[str]] = ()) -> str:
    """*text* (an error message) with every URL in it redacted (:func:`redact_url`), and any secret
    part of *urls* (the URLs the failing call used) removed wherever else it appears."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    for url in urls:
        for secret in url_secrets(url or ""):
            text = text.replace(secret, REDACTED)
    return text
