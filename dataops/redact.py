"""Keep secrets out of every line a person or a log store will see.

Two layers: URLs lose their password wherever they appear in text, and every secret
value read from config is registered so that it is masked even when it shows up bare
(for example inside a libpq error message).
"""

from __future__ import annotations

import re
import threading
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_secrets: set[str] = set()
_lock = threading.Lock()

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<at>@)")
# key=value secrets in libpq conninfo strings or query strings
_KV_SECRET = re.compile(r"(?i)\b(password|passwd|sslpassword|secret|secret_access_key|token)=([^\s&'\"]+)")
_SECRET_QUERY_KEYS = {"password", "passwd", "sslpassword", "secret", "token"}


def register_secret(value: str | None) -> None:
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}{m.group('at')}", text)
    text = _KV_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_url(url: str) -> str:
    """A database or storage URL with its password (and secret query parameters) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = [(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="/:*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
