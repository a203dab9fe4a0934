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
left, then the server the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for d in names:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def started(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(roots: list[int]) -> dict[int, int]:
    """Every live descendant of the given processes -> the root it descends from."""
    par, owner = parents(), {r: r for r in roots}
    for pid in par:
        chain, p = [], pid
        while p not in owner and p in par and p > 1 and len(chain) < 64:
            chain.append(p)
            p = par[p]
        if p in owner:
            for c in chain:
                owner[c] = owner[p]
    return {p: r for p, r in owner.items() if p not in roots}


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
        mine, me = {c.proc.pid for c in self.children if c.proc is not None}, os.getpid()
        for pid, parent in parents().items():
            if parent == me and pid not in mine:
                try:
                    os.waitpid(pid, os.WNOHANG)
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
        keep = {c.proc.pid for c in last if c.proc is not None}
        keep |= set(descendants(list(keep))) if keep else set()
        roots = [os.getpid()] if self.orphans else [c.proc.pid for c in first if c.proc is not None]
        tree = {p: started(p) for p in descendants(roots) if p not in keep}
        self._terminate([c for c in first if c.proc is not None], tree, grace)
        self._terminate([c for c in last if c.proc is not None], {}, grace)

    def _terminate(self, children: list[Child], others: dict[int, str | None], grace: float) -> None:
        own = {c.proc.pid for c in children}
        for c in children:
            if c.proc.poll() is None:
                _signal(c.proc.pid, signal.SIGTERM, group=True)
        for pid, t in others.items():
            if pid not in own and started(pid) == t:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.reap()
            alive = [c for c in children if c.proc.poll() is None]
            alive_other = [p for p, t in others.items() if p not in own and t is not None and started(p) == t
                           and not _zombie(p)]
            if not alive and not alive_other:
                break
            time.sleep(0.2)
        for c in children:
            if c.proc.poll() is None:
                _signal(c.proc.pid, signal.SIGKILL, group=True)
                self.log(f"{c.name} (pid {c.proc.pid}) did not stop in {grace:.0f} s: killed")
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid, t in others.items():
            if pid not in own and t is not None and started(pid) == t and not _zombie(pid):
                _signal(pid, signal.SIGKILL)
        self.reap()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def install_sigterm() -> None:
    """SIGTERM (a process manager, ``docker stop``) stops serve as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_sigterm)
