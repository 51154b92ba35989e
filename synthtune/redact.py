"""Secrets (API keys) read from the environment, and their redaction from every message.

A key is checked when it is read, so a malformed one fails with the name of its variable, never
its value: ``http.client`` refuses a header holding a control character with a ValueError that
quotes the whole header, key included, and a traceback would print it. Every key read here is
remembered for the life of the process, and ``redact`` replaces it with ``***`` wherever it
appears, in the plain, JSON-escaped or repr form a server echo or an exception may use. The CLI
runs errors, tracebacks and log records through it (``RedactingFilter``), so a key that slipped
into any message is still not printed.

>>> register_secret("sk-doc-0123456789")
>>> redact('server said: {"auth": "Bearer sk-doc-0123456789"}')
'server said: {"auth": "Bearer ***"}'
"""

from __future__ import annotations

import json
import logging
import os
import threading

from synthtune.errors import ConfigError

MASK = "***"

_lock = threading.Lock()
_forms: tuple[str, ...] = ()  # every spelling of every registered secret, longest first


def register_secret(value: str) -> None:
    """Remember ``value`` so that ``redact`` hides it from now on."""
    global _forms
    # a JSON body, a repr() or a bytes repr spells the key with escapes (quotes, backslashes)
    spellings = {value, json.dumps(value)[1:-1], repr(value)[1:-1], repr(value.encode("utf-8", "replace"))[2:-1]}
    with _lock:
        _forms = tuple(sorted(set(_forms) | {s for s in spellings if s}, key=len, reverse=True))


def has_secrets() -> bool:
    return bool(_forms)


def redact(text: str) -> str:
    """``text`` with every spelling of every registered secret replaced by ``***``."""
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact_bytes(data: bytes) -> bytes:
    """``redact`` for raw bytes (a server's response body, before anything parses or cuts it)."""
    for form in _forms:
        raw = form.encode("utf-8", "replace")
        if raw in data:
            data = data.replace(raw, MASK.encode())
    return data


def secret_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as a Bearer token (None when it can), without quoting it.

    HTTP header values cannot hold control characters, and a token has no spaces (RFC 6750); a
    non-ASCII character is encoded differently by each client, so no server would match it.

    >>> secret_problem("sk-abc\\r")
    'holds a carriage return (\\\\r) at character 7 of 7 (the last)'
    """
    names = {"\r": "a carriage return (\\r)", "\n": "a line feed (\\n)", "\t": "a tab", " ": "a space"}
    for i, ch in enumerate(value):
        if "!" <= ch <= "~":
            continue
        what = names.get(ch) or (f"a control character (U+{ord(ch):04X})" if ord(ch) < 0x20 or ord(ch) == 0x7F
                                 else "a non-ASCII character")
        last = " (the last)" if i == len(value) - 1 else " (the first)" if i == 0 else ""
        return f"holds {what} at character {i + 1} of {len(value)}{last}"
    return None


def secret_from_env(env: str, field: str = "api_key_env") -> str:
    """The secret held in ``$env``, checked and registered for redaction; ConfigError names ``env`` only."""
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"{field}={env}, but ${env} is not set (or empty); export the server's API key in "
                          f"it, or drop --{field.replace('_', '-')} for a server without keys")
    problem = secret_problem(value)
    if problem:
        # the key is not printed, not even in part: the variable's name is enough to find it
        raise ConfigError(f"{field}={env}: ${env} {problem}, which an HTTP header cannot carry (a key "
                          f"file saved with Windows line endings leaves a \\r at the end). Export the key "
                          f"alone, e.g. export {env}=\"$(tr -d ' \\r\\n' < KEY_FILE)\"")
    register_secret(value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that redacts registered secrets from a record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _forms:
            return True
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
