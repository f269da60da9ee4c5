"""Credentials never leave the process: URIs and messages as they may be recorded or logged.

A user may name inputs with credentials in them: userinfo (``https://user:password@host/a.wav``)
or a signed URL (``...?X-Goog-Signature=...``, ``X-Amz-Signature``, an Azure SAS ``sig``). Those
URIs are needed to read the data, but every recorded copy (``source_uri`` columns, dead letters,
ledgers, manifests, messages and log lines) goes through :func:`redact` first.
"""

from __future__ import annotations

import re

#: ``scheme://userinfo@`` in a URL (also inside fsspec chained URLs and free text).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:'\"]*(?::[^/@\s'\"]*)?@")
#: Query parameters that carry a secret (signatures, tokens, keys, passwords), case-insensitive.
SECRET_PARAMETERS = (
    "x-goog-signature",
    "x-goog-credential",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "signature",
    "sig",
    "googleaccessid",
    "awsaccesskeyid",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
)
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMETERS) + r")=)[^&#\s'\"]*",
    re.IGNORECASE,
)
REDACTED = "REDACTED"


def redact(text: str) -> str:
    """``text`` with URL userinfo removed and the values of secret query parameters replaced.

    >>> redact("https://ann:pw@host/a.wav?X-Amz-Signature=abc&v=1")
    'https://host/a.wav?X-Amz-Signature=REDACTED&v=1'
    """
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(rf"\g<name>{REDACTED}", _USERINFO.sub(r"\g<scheme>", text))
