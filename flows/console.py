"""What the CLI shows while a run goes on: live bars (rich) in a terminal, plain lines in logs.

``display(mode)`` installs the ``pipeline.progress`` sink for the mode. With live bars, Prefect's
console log handlers are pointed at the bars' console for the duration, so log lines scroll above
the bars instead of tearing them (Prefect's handler holds its own rich Console on the real stderr)."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from pipeline import progress


def _prefect_console_handlers() -> list[Any]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return list({id(h): h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}.values())


@contextmanager
def _logs_to(console: Any) -> Iterator[None]:
    handlers = _prefect_console_handlers()
    saved = [h.console for h in handlers]
    for h in handlers:
        h.console = console
    try:
        yield
    finally:
        for h, c in zip(handlers, saved):
            h.console = c


@contextmanager
def display(mode: str = "auto") -> Iterator[Any]:
    """Progress for the duration of a run: 'auto' (bars on a terminal, lines otherwise), 'rich',
    'plain' or 'none'."""
    sink = progress.auto_sink(mode)
    with ExitStack() as stack:
        if isinstance(sink, progress.RichSink):
            stack.enter_context(sink)
            stack.enter_context(_logs_to(sink.console))
        if sink is not None:
            stack.enter_context(progress.sink(sink))
        yield sink



_LAST: list[str] = []


def print_last(line: str | None) -> None:
    """Print ``line`` as the process's very last output. Called once with None before a run
    starts (registering an exit hook that runs after Prefect's own: a temporary server logs its
    stop at exit), then with the line; with a real server (PREFECT_API_URL) it prints at once."""
    if line is None:
        if not os.environ.get("PREFECT_API_URL"):
            atexit.register(lambda: _LAST and print(_LAST[-1], flush=True))
            _LAST.append("")
        return
    if _LAST:
        _LAST.append(line)
    else:
        print(line, flush=True)
