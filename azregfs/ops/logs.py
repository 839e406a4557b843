"""Where the daemon's log lines go, and in which shape.

- ``log_file``: appended to that file (mode 0640);
- in the foreground under systemd (stderr is the journal: ``JOURNAL_STREAM`` names it),
  each line starts with its syslog priority (``<3>`` for ERROR, sd-daemon(3)), so
  ``journalctl -p err`` finds errors; the journal adds time and unit name itself;
- in the foreground elsewhere: stderr, with a timestamp;
- forked into the background: syslog (``/dev/log``), priority mapped by the handler.

``log_format: json`` makes every line one JSON object (time, level, logger, message, and
the exception when there is one), which log shippers take without parsing rules. Log lines
never hold a credential: the driver's messages are built without them (driver.describe).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

from ..config import Config

# sd-daemon(3) priorities for the journal's stderr stream.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {}
        if self.with_time:
            entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) \
                + f".{int(record.msecs):03d}Z"
        entry.update(level=record.levelname, logger=record.name, message=record.getMessage())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Prefix each line with its priority, as journald reads it from a stream."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        # A multi-line message (a traceback) keeps its priority on every line.
        return "\n".join(f"<{priority}>{line}"
                         for line in self.inner.format(record).splitlines() or [""])


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def setup_logging(cfg: Config, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(cfg.log_level.upper())
    as_json = cfg.log_format == "json"
    formatter: logging.Formatter = JsonFormatter() if as_json else logging.Formatter(TEXT)
    handler: logging.Handler
    if cfg.log_file:
        handler = logging.FileHandler(cfg.log_file)
        os.chmod(cfg.log_file, 0o640)
    elif foreground and stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        formatter = JournalFormatter(JsonFormatter(with_time=False) if as_json else
                                     logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        formatter = JsonFormatter(with_time=False) if as_json else logging.Formatter(
            "%(levelname)s %(name)s: %(message)s")
        handler.ident = f"azregfs[{os.getpid()}]: "
    else:
        handler = logging.NullHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
