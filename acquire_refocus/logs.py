"""Structured logging: one `key=value` line per event, so logs can be grepped and parsed on a scope PC."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from acquire_refocus.errors import UserError
from acquire_refocus.outputs import output_folder

if TYPE_CHECKING:
    from acquire_refocus.config import LogFileConfig

_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
LOG_FILE_NAME = "acquire-refocus.log"

if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]  # generic in typeshed only, not at run time
else:
    _StreamHandler = logging.StreamHandler


class _CurrentStderrHandler(_StreamHandler):
    """Writes to whatever `sys.stderr` is now, so a redirected or closed stderr (tests, daemons) never breaks it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """Send our log lines to stderr once; repeated calls only change the level."""
    root = logging.getLogger("acquire_refocus")
    root.setLevel(level.upper())
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.propagate = False


class _RotatingLogFile(logging.handlers.RotatingFileHandler):
    """A rotating log file that a full disk or a vanished folder cannot turn into a traceback on every line: the
    first failed write closes the file and says so once (stderr keeps the log); the daemon runs on."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        self.close()
        logging.getLogger(__name__).error(
            kv("log_file_failed", path=self.baseFilename, error=error, note="the log goes on on stderr only")
        )

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered lines cannot be flushed (a full disk): they are on stderr already
            pass


@contextmanager
def log_file(settings: LogFileConfig, default_folder: Path | None) -> Iterator[Path | None]:
    """Also write our log lines, in the stderr format, to a size-rotated file while the block runs.

    The file is `settings.folder` (or `default_folder`, the daemon's output folder) / acquire-refocus.log and is
    appended to across restarts; yields its path, or None when it is off or there is no folder to put it in.
    """
    folder = settings.folder if settings.folder is not None else default_folder
    if not settings.enabled or folder is None:
        yield None
        return
    option = "log_file.folder" if settings.folder is not None else "--output"
    path = output_folder(folder, option) / LOG_FILE_NAME
    try:
        handler = _RotatingLogFile(
            path,
            maxBytes=max(1, round(settings.max_file_mb * 2**20)),
            backupCount=settings.keep_files,
            encoding="utf-8",
        )
    except OSError as exc:
        raise UserError(
            f"{option} {folder}: cannot write the log file {path} ({exc.strerror or exc}); choose another {option}"
        ) from None
    handler.setFormatter(logging.Formatter(_FORMAT))
    ours = logging.getLogger("acquire_refocus")
    ours.addHandler(handler)
    try:
        ours.info(kv("log_file", path=path, max_file_mb=settings.max_file_mb, keep_files=settings.keep_files))
        yield path
    except Exception as exc:
        # the CLI prints an error to stderr alone once this block has ended; the file keeps it too
        handler.handle(
            ours.makeRecord(
                ours.name, logging.ERROR, __file__, 0, kv("stopped", error=f"{type(exc).__name__}: {exc}"), (), None
            )
        )
        raise
    finally:
        ours.removeHandler(handler)
        handler.close()


def kv(event: str, **fields: Any) -> str:
    """Format an event and its fields as `event=... key=value ...`, quoting values with spaces."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() for c in text) or '"' in text:
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
