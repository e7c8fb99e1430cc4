"""Library messages go through ``logging``, under the logger named "sparsekit".

    from sparsekit._util.log import logger
    logger.info("resumed from %s", path)

So that a researcher sees what happened without configuring anything, the "sparsekit" logger gets
one handler of its own (as ``transformers`` does for its logger), at INFO, writing
``sparsekit: <message>`` to the current ``sys.stderr`` (looked up at each message, so pytest's capture
and redirected streams see it), and does not propagate to the root logger (no message twice). Unless a
handler is already attached to "sparsekit" when the first message is written: then that one is used.
To silence: ``logging.getLogger("sparsekit").setLevel(logging.WARNING)``. To send messages through the
application's own root handlers instead: ``log = logging.getLogger("sparsekit"); log.handlers.clear();
log.propagate = True`` (after the first message) or attach a handler to it before.
"""
from __future__ import annotations

import logging
import sys

LOGGER_NAME = "sparsekit"


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler bound to whatever ``sys.stderr`` is when a message is written."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


class _DefaultHandlerLogger(logging.LoggerAdapter):
    """The "sparsekit" logger; the first message attaches the default handler if nobody configured logging."""

    def log(self, level, msg, *args, **kwargs):
        _ensure_handler(self.logger)
        super().log(level, msg, *args, **kwargs)


def _ensure_handler(base: logging.Logger) -> None:
    if base.handlers or getattr(base, "_sparsekit_configured", False):
        return
    base._sparsekit_configured = True  # once: a user who removes the handler later keeps it removed
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("sparsekit: %(message)s"))
    base.addHandler(handler)
    if base.level == logging.NOTSET:
        base.setLevel(logging.INFO)
    base.propagate = False


logger = _DefaultHandlerLogger(logging.getLogger(LOGGER_NAME), {})
