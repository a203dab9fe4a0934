"""What the CLI shows while a run goes on: live bars (rich) in a terminal, plain lines in logs.

``display(mode)`` installs the ``pipeline.progress`` sink for the mode. With live bars, Prefect's
console log handlers (each holds its own rich Console on the real stderr) are swapped, through the
``logging`` module's API, for handlers of the same format on the bars' console for the duration,
so log lines scroll above the bars instead of tearing them."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from pipeline import progress


def _prefect_console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [(lg, h) for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


class _ToConsole(logging.Handler):
    """Stands in for a Prefect console handler while bars are live: the same level, filters and
    format, printed through the bars' console so lines scroll above them."""

    def __init__(self, console: Any, like: logging.Handler):
        super().__init__(like.level)
        self.setFormatter(like.formatter)
        self.filters = list(like.filters)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must not raise (logging.Handler's convention)
            self.handleError(record)


@contextmanager
def _logs_to(console: Any) -> Iterator[None]:
    """Prefect's console handlers swapped for ``_ToConsole`` on their loggers (the logging module's
    public API) for the duration."""
    swapped = [(lg, h, _ToConsole(console, h)) for lg, h in _prefect_console_handlers()]
    for lg, h, mine in swapped:
        lg.removeHandler(h)
        lg.addHandler(mine)
    try:
        yield
    finally:
        for lg, h, mine in swapped:
            lg.removeHandler(mine)
            lg.addHandler(h)


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
