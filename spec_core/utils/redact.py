"""Secret redaction: the one place that decides what a credential looks like.

Everything specflow persists or logs (the run's config.yaml, Prefect parameters and artifacts,
MLflow params, the regeneration manifest, retry warnings) passes through here, so a credential is
masked the same way everywhere (docs/architecture.md §secrets). Two shapes are recognised:

- inside text: the user-info of a URL (``https://user:pass@host`` -> ``https://***@host``), a
  query parameter with a secret name (``?api_key=...``), ``Authorization: ...`` and
  ``Bearer <token>``;
- inside a mapping: the value of a key whose name says secret (``api_key``, ``token``,
  ``password``, ``secret``, ``authorization``, ...), whatever the value is.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Whole words of a key name (split on _ - . and camelCase) that mark its value secret.
_SECRET_WORDS = (
    "password|passwd|pwd|secret|token|apikey|api_key|auth|authorization|credential|credentials"
    "|bearer|cookie|private_key|access_key|secret_key|session_key"
)
_SECRET_KEY = re.compile(rf"(^|_)({_SECRET_WORDS})($|_)")
# user:password@ (a bare user name, as in git@host, is not a secret)
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/@\s?#:]*:[^/@\s?#]*)@"
)
_QUERY_SECRET = re.compile(
    rf"(?P<key>[?&;](?:[A-Za-z0-9_\-]*?)(?:{_SECRET_WORDS}))=(?P<v>[^&;#\s]*)"
)
# "Authorization: <anything>" and a long "Bearer <token>" (short words after "Bearer" in a path or
# a sentence are left alone)
_BEARER = re.compile(
    r"(?P<kind>(?i:authorization)\s*[:=]\s*(?:(?:Bearer|Basic|Token)\s+)?|\bBearer\s+)"
    r"[A-Za-z0-9._~+/=\-]{12,}"
)


# "token" also means a vocabulary entry: ``mask_token_id``, ``pad_token``, ``max_tokens``.
_VOCAB_TOKEN = re.compile(
    r"(^|_)(mask|pad|bos|eos|unk|sep|cls|special|anchor|start|end|stop|new|max|min|num)_token"
    r"($|_)|_token_(id|ids|index|indices|count|len|length|limit|budget)$"
)


def is_secret_key(name: Any) -> bool:
    """True when a mapping key's name says its value is a credential (``api_key``, ``x-token``),
    not a vocabulary token (``mask_token_id``)."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower().replace("-", "_")
    text = text.replace(".", "_")
    return bool(_SECRET_KEY.search(text)) and not _VOCAB_TOKEN.search(text)


def redact_text(text: str) -> str:
    """``text`` with URL credentials, secret query parameters and bearer tokens masked."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}={MASK}", text)
    return _BEARER.sub(lambda m: f"{m['kind']}{MASK}", text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: mappings, sequences, scalars) with every secret masked."""
    if isinstance(value, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def has_secret(value: Any) -> bool:
    """True when ``redact`` would change ``value``."""
    return redact(value) != value
