"""Where the commands' log lines go: this package's loggers at the level asked, root left alone.

`logging.basicConfig` in a command did nothing: importing orbax (the checkpoints) makes absl
call a bare `logging.basicConfig()` first, which gives the root logger a stderr handler and
leaves it at WARNING, so no INFO line of `xdistill train` or `prepare` was printed (the compile
times, the loader, "is complete"; until 2026-12-07). Raising the root's level instead (or
`force=True`) would print every INFO line of orbax and absl too. So `configure` sets the level
of this project's loggers (`xdistill_jax`, `data_pipelines`), whose records then reach the
root's handlers; it gives the root a handler in `fmt` where it has none, and `fmt` to a handler
still in the bare `basicConfig()` format ("INFO:name:message").
"""

from __future__ import annotations

import logging

PROJECT_LOGGERS = ("xdistill_jax", "data_pipelines")


def configure(level: int, fmt: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=fmt)  # the root stays at WARNING: other libraries' INFO stays out
    for handler in root.handlers:
        formatter = handler.formatter
        if type(handler) is logging.StreamHandler and (
                formatter is None or getattr(formatter, "_fmt", None) == logging.BASIC_FORMAT):
            handler.setFormatter(logging.Formatter(fmt))
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
