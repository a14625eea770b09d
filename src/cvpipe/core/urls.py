"""Credentials in URLs: the one set of rules for every stored or printed form of a URL.

A source or model URL may carry secrets (``https://user:pass@host/ds.zip?token=...``, signed
``X-Amz-*``/``X-Goog-*`` parameters). The full URL is used only in memory, to fetch; manifests,
journals, cache metadata, params summaries, the app's ``/model`` and every message carry
:func:`redact_url`'s form. Standard library only, so every layer and image (ingest's, the app's)
can use it. Written here because no library in the lock does it: ``urllib.parse`` would normalize
the URL (and a redacted URL must stay character-for-character equal when it has no secret).

A committed params.yaml holds no secret either: ``ingest.source`` may name ``${NAME}`` environment
variables (:func:`expand_env_refs`, expanded in memory by the stage that fetches), and ``cvpipe init``
writes every secret part of a SOURCE it was given as such a reference (:func:`with_env_refs`), the
way DVC keeps remote credentials out of ``.dvc/config``. ``os.path.expandvars`` is not used: it
leaves an unset variable in place (a fetch of ``.../${TOKEN}`` would fail far from the cause) and
also expands ``$NAME``, which a URL may hold literally.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Mapping, Optional
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


def _map_secret_params(text: str, replace: Callable[[str, str], str]) -> str:
    """*text* (a query or fragment, without its ``?``/``#``) with each secret parameter's value
    replaced by ``replace(name, value)``; every other character as written."""
    out = []
    for pair in text.split("&"):
        name, eq, value = pair.partition("=")
        out.append(f"{name}={replace(name, value)}" if eq and value and _is_secret_param(name) else pair)
    return "&".join(out)


def _split_url(url: str) -> tuple[str, str, str, str, str]:
    """``(scheme://, userinfo, host and path, ?query, #fragment)`` of *url*, as written (nothing normalized)."""
    scheme, _, rest = url.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    return f"{scheme}://", userinfo + at, host + slash + path, qmark + query, hash_ + fragment


def _rewrite_secrets(url: str, userinfo: Callable[[str], str], param: Callable[[str, str], str]) -> str:
    """*url* with its userinfo (``user:pass``, without the ``@``) replaced by ``userinfo(it)`` and each
    secret query or fragment parameter's value by ``param(name, value)``; the rest as written. The one
    walk over a URL's secret parts that :func:`redact_url` and :func:`with_env_refs` share."""
    if "://" not in url:
        return url
    scheme, info, rest, query, fragment = _split_url(url)
    if info:
        info = userinfo(info[:-1]) + "@"
    if query:
        query = "?" + _map_secret_params(query[1:], param)
    if "=" in fragment:
        fragment = "#" + _map_secret_params(fragment[1:], param)
    return scheme + info + rest + query + fragment


def redact_url(url: str) -> str:
    """*url* without its credentials: the userinfo (``user:pass@``) becomes ``***@`` and the value of every
    secret query (or fragment) parameter -- ``token``, ``key``, ``sig``, ``signature``, ``password``,
    ``secret``, ``access_token``, ``X-Amz-*``, ``X-Goog-*``... any case -- becomes ``***``.

    The form every stored or printed URL takes (manifests, journals, cache metadata, messages); a URL
    without credentials, and any local path, is returned unchanged, character for character.
    """
    return _rewrite_secrets(url, lambda _info: REDACTED, lambda _name, _value: REDACTED)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env_refs(text: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """*text* with every ``${NAME}`` replaced by the value of the environment variable NAME, verbatim.

    Raises ``KeyError(NAME)`` for the first variable that is not set (an empty value is a value)."""
    env = os.environ if environ is None else environ

    def value(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise KeyError(m.group(1))
        return env[m.group(1)]

    return _ENV_REF.sub(value, text)


def _ref_name(prefix: str, part: str) -> str:
    return f"{prefix}_" + (re.sub(r"[^A-Z0-9]+", "_", unquote_plus(part).upper()).strip("_") or "SECRET")


def with_env_refs(
    url: str, prefix: str = "CVPIPE_SOURCE", taken: Optional[dict[str, str]] = None
) -> tuple[str, dict[str, str]]:
    """*url* with each secret part -- the password of ``user:pass@`` (the whole userinfo when it has no
    ``:``) and the value of each parameter :func:`redact_url` hides -- replaced by a ``${NAME}`` reference,
    and ``{NAME: the part as written}``, so that ``expand_env_refs(ref, that) == url``.

    NAME is *prefix* + the parameter's name (``token`` -> ``CVPIPE_SOURCE_TOKEN``; ``PASSWORD`` or
    ``USERINFO`` for the userinfo). *taken* (the names already given, with their values, for the other
    URLs of one params file) is extended; a name taken with another value gets ``_2``, ``_3``... A part
    that already is a reference stays as it is. A URL without secrets comes back unchanged.
    """
    taken = {} if taken is None else taken
    found: dict[str, str] = {}

    def ref(part: str, value: str) -> str:
        if _ENV_REF.fullmatch(value):
            return value
        name, n = _ref_name(prefix, part), 1
        while taken.get(f"{name}_{n}" if n > 1 else name, value) != value:
            n += 1
        name = f"{name}_{n}" if n > 1 else name
        taken[name] = found[name] = value
        return "${" + name + "}"

    def userinfo(info: str) -> str:
        user, colon, password = info.partition(":")
        return f"{user}:{ref('password', password)}" if colon and password else info if colon else ref("userinfo", user)

    return _rewrite_secrets(url, userinfo, ref), found


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
