"""Structured logs: one JSON object a line in production, readable text on a terminal. Never payloads.

Never secrets either: the code logs none, and as a second line of defence ``setup_logging(secrets=...)``
(the config's credential values, ``processor.config.secret_values``) masks any that a library or an
exception message would carry, in the message and in the traceback alike."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable

import orjson

MASK = "***"
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words; credentials are longer


class _Masking(logging.Formatter):
    """Masks the secret values in whatever the wrapped formatter writes."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if use_json else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    masked = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    handler.setFormatter(_Masking(formatter, masked) if masked else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def where_failed(exc: BaseException) -> str:
    """An exception as a log line may show it when its message could carry payload values (a KeyError
    naming a field value, a ValueError quoting one): its type and the innermost frame, never its text."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {last.filename.rsplit('/processor/', 1)[-1]}:{last.lineno} in {last.name}"


def log_uncaught() -> None:
    """Route what would end the process (or a thread) with a bare traceback on stderr through logging, so
    the secret masking and the JSON format apply to it too: the last words of a crash are a log line."""
    import threading
    from types import TracebackType

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        logging.getLogger("processor").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        logging.getLogger("processor").critical("uncaught %s in thread %s", args.exc_type.__name__,
                                                args.thread.name if args.thread else "?",
                                                exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = hook
    threading.excepthook = thread_hook
