"""Process supervision for ``advfeatures serve``: start children, restart the ones that exit
(with a back-off), and stop the whole tree on SIGTERM or Ctrl-C.

Why a supervisor: ``serve`` used to wait until *any* child exited and then stop all of them, so
one SIGKILLed shard worker took the Prefect server and the other workers down with it ("Server
stopped!"). Now a child that exits is logged and restarted after 1, 2, 4, ... 60 s (reset once it
has run for a minute); the others never notice.

The tree: every child is started in a session of its own (so a Ctrl-C in the terminal reaches
``serve`` alone, which then stops the children in order), and ``serve`` makes itself the
*subreaper* of its descendants (Linux ``PR_SET_CHILD_SUBREAPER``): a flow-run process whose worker
died is re-parented to ``serve`` instead of init, so it is still stopped at shutdown. Stopping:
SIGTERM to the workers' process groups and to every other descendant (a flow-run process reports
its run Crashed on SIGTERM while the server is still up), up to ``grace`` seconds, SIGKILL what is
left, then the server the same way. The tree is read with psutil, whose process objects carry
their creation time, so a pid reused by a later process is never signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

PR_SET_CHILD_SUBREAPER = 36


class Stop(Exception):
    """SIGTERM received: stop everything, as Ctrl-C does."""


def _on_sigterm(_signum, _frame) -> None:
    raise Stop()


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux); False where unsupported."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def started(pid: int) -> float | None:
    """A process's creation time (seconds since the epoch), to tell it from a later one with its
    pid; None when it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _tree(root: int) -> list[psutil.Process]:
    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []


def descendants(roots: list[int]) -> dict[int, int]:
    """Every live descendant of the given processes -> the root it descends from (the nearest one,
    where one root descends from another)."""
    trees = {r: {p.pid for p in _tree(r)} for r in roots}
    owner: dict[int, int] = {}
    for r in sorted(roots, key=lambda r: -len(trees[r])):  # a nested root's tree is a strict subset
        owner.update(dict.fromkeys(trees[r], r))
    return {p: r for p, r in owner.items() if p not in roots}


def _live(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running: neither gone, nor a later process with the pid, nor a zombie
    (dead, only waiting for its parent to collect it)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _send(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)  # psutil refuses a pid reused by a later process
        except psutil.Error:
            pass


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: str
    proc: subprocess.Popen | None = None
    since: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive exits within ``stable`` seconds of a start
    due: float | None = None  # when to restart it (monotonic), while waiting out the back-off

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, start_new_session=True)
        self.since, self.due = time.monotonic(), None


@dataclass
class Supervisor:
    log: Callable[[str], None] = print
    backoff: float = 1.0  # first restart delay, seconds; doubles per quick failure
    max_backoff: float = 60.0
    stable: float = 60.0  # a child that ran this long before exiting restarts after ``backoff``
    orphans: bool = True  # stop() also ends every other descendant of this process (serve: orphans it reaped)
    children: list[Child] = field(default_factory=list)

    def start(self, child: Child) -> Child:
        child.start()
        self.children.append(child)
        return child

    def delay(self, child: Child, ran: float) -> float:
        child.failures = 0 if ran >= self.stable else child.failures + 1
        return min(self.max_backoff, self.backoff * 2 ** max(0, child.failures - 1))

    def step(self) -> None:
        """Notice children that exited (scheduling their restart), restart those that are due, and
        reap orphans re-parented to us."""
        now = time.monotonic()
        for c in self.children:
            if c.due is None and c.proc is not None and c.proc.poll() is not None:
                wait = self.delay(c, now - c.since)
                c.due = now + wait
                self.log(f"{c.name} (pid {c.proc.pid}) exited with code {c.proc.returncode} after "
                         f"{now - c.since:.0f} s; restarting it in {wait:.0f} s")
            if c.due is not None and now >= c.due:
                c.start()
                c.restarts += 1
                self.log(f"{c.name} restarted (pid {c.proc.pid}, restart {c.restarts})")
        self.reap()

    def reap(self) -> None:
        """Collect exited orphans that were re-parented to this process (never our own children,
        whose exit status Popen reads)."""
        if not self.orphans:
            return
        mine = {c.proc.pid for c in self.children if c.proc is not None}
        try:
            kids = psutil.Process().children()
        except psutil.Error:
            return
        for p in kids:
            if p.pid not in mine:
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def run(self, tick: float = 1.0) -> None:
        """Supervise until SIGTERM (raises Stop) or Ctrl-C (KeyboardInterrupt)."""
        while True:
            self.step()
            time.sleep(tick)

    def stop(self, first: list[Child], last: list[Child], grace: float = 12.0) -> None:
        """Stop ``first`` (workers) and every descendant not under ``last`` (flow-run processes,
        orphans included), then ``last`` (the server): SIGTERM, up to ``grace`` s each, SIGKILL."""
        kept = [c.proc.pid for c in last if c.proc is not None]
        keep = set(kept) | {p.pid for r in kept for p in _tree(r)}
        roots = [os.getpid()] if self.orphans else [c.proc.pid for c in first if c.proc is not None]
        # Process objects remember their creation time: a pid reused meanwhile is never signalled
        tree = {p.pid: p for r in roots for p in _tree(r) if p.pid not in keep and p.pid not in roots}
        self._terminate([c for c in first if c.proc is not None], list(tree.values()), grace)
        self._terminate([c for c in last if c.proc is not None], [], grace)

    def _terminate(self, children: list[Child], others: list[psutil.Process], grace: float) -> None:
        own = {c.proc.pid for c in children}
        others = [p for p in others if p.pid not in own]  # never wait_procs a Popen's child: Popen reaps it
        for c in children:
            if c.proc.poll() is None:
                _signal(c.proc.pid, signal.SIGTERM, group=True)
        _send(others, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while True:
            self.reap()
            others = _live(others)
            alive = [c for c in children if c.proc.poll() is None]
            left = deadline - time.monotonic()
            if (not alive and not others) or left <= 0:
                break
            if others:  # returns as soon as they are gone (zombies are not: _live drops them)
                _, others = psutil.wait_procs(others, timeout=min(0.2, left))
            else:
                time.sleep(min(0.2, left))
        for c in children:
            if c.proc.poll() is None:
                _signal(c.proc.pid, signal.SIGKILL, group=True)
                self.log(f"{c.name} (pid {c.proc.pid}) did not stop in {grace:.0f} s: killed")
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _send(_live(others), signal.SIGKILL)
        self.reap()


def install_sigterm() -> None:
    """SIGTERM (a process manager, ``docker stop``) stops serve as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_sigterm)
