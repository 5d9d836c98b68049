"""Logging for the daemon: text or JSON lines on stderr, secrets masked.

Masking happens on the final formatted line, after the message, its
arguments and any traceback have been rendered, so a secret cannot slip
through an exception text or a URL that some library put in its message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"

# Attributes every LogRecord has; anything else came from `extra=` and is
# emitted as a structured field in JSON mode.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class SecretMasker:
    """Replaces every configured secret, plain or URL-encoded, with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.update(
                    {
                        secret,
                        quote(secret, safe=""),
                        quote(secret),
                        quote_plus(secret),  # urlencode's form, as in a query
                        json.dumps(secret, ensure_ascii=False)[1:-1],  # JSON lines
                    }
                )
        # Longest first, so a secret containing another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text


class _MaskingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, mask: SecretMasker) -> None:
        super().__init__()
        self._inner = inner
        self._mask = mask

    def format(self, record: logging.LogRecord) -> str:
        return self._mask(self._inner.format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", log_format: str = "text", secrets: Iterable[str] = ()
) -> SecretMasker:
    """Send every log record to stderr in the chosen format, secrets masked.

    Returns the masker so that other output (dry-run lines, dead letters)
    can be scrubbed the same way.
    """
    mask = SecretMasker(secrets)
    if log_format == "json":
        inner: logging.Formatter = JsonFormatter()
    else:
        inner = logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter(inner, mask))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs every retry and connection with full URLs at debug.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
    return mask
