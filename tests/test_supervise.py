"""serve's supervisor on plain processes (no Prefect): a child that exits is restarted with a
growing back-off while the others run on; stop() ends children, their descendants and orphans."""

import os
import signal
import sys
import time

import pytest

from flows.supervise import Child, Supervisor, descendants

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc")

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _child(name, cmd):
    return Child(name, cmd, dict(os.environ), os.getcwd())


def _until(cond, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_an_exited_child_is_restarted_with_back_off_and_the_others_keep_running():
    logs = []
    sup = Supervisor(log=logs.append, backoff=0.2, max_backoff=0.4, stable=60, orphans=False)
    steady = sup.start(_child("server", SLEEPER))
    flaky = sup.start(_child("worker", [sys.executable, "-c", "raise SystemExit(3)"]))
    try:
        pid = steady.proc.pid
        assert _until(lambda: (sup.step(), flaky.restarts >= 3)[1])
        assert steady.proc.pid == pid and steady.proc.poll() is None  # never touched
        assert any("worker (pid" in m and "exited with code 3" in m and "restarting it in 0 s" in m for m in logs)
        assert [sup.delay(_child("x", []), 0) for _ in range(1)] == [0.2]
        c = _child("y", [])
        assert [sup.delay(c, 1) for _ in range(4)] == [0.2, 0.4, 0.4, 0.4]  # doubles, capped
        assert sup.delay(c, 61) == 0.2  # it had run a minute: back to the first delay
    finally:
        sup.stop(first=[flaky], last=[steady], grace=5)
    assert steady.proc.poll() is not None


def test_stop_ends_children_their_descendants_and_orphans_quickly():
    """A worker's flow-run process lives in a session of its own; stop() still ends it. (serve
    also ends orphans re-parented to it, its subreaper; here orphans=False spares pytest's own
    children.)"""
    sup = Supervisor(log=lambda m: None, orphans=False)  # not pytest's other children
    grandchild = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    worker = sup.start(_child("worker", [sys.executable, "-c", grandchild]))
    server = sup.start(_child("server", SLEEPER))
    assert _until(lambda: len(descendants([worker.proc.pid])) == 1)
    tree = [worker.proc.pid, server.proc.pid, *descendants([worker.proc.pid])]
    t0 = time.monotonic()
    sup.stop(first=[worker], last=[server], grace=5)
    assert time.monotonic() - t0 < 5
    alive = [p for p in tree if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] != "Z"]
    assert alive == []


def test_sigterm_raises_stop():
    from flows.supervise import Stop, install_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm()
    try:
        with pytest.raises(Stop):
            signal.raise_signal(signal.SIGTERM)  # runs the handler before it returns
    finally:
        signal.signal(signal.SIGTERM, previous)


ZOMBIE_MAKER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'pass']); "
                "time.sleep(60)")  # its child exits at once and is never collected: a zombie


def test_a_zombie_descendant_counts_as_stopped():
    """stop() waits for live processes only: a zombie (dead, waiting for a parent that does not
    collect it) is stopped, although psutil.wait_procs alone reports a non-child zombie alive."""
    import psutil

    from flows.supervise import _live, started

    sup = Supervisor(log=lambda m: None, orphans=False)
    maker = sup.start(_child("maker", [sys.executable, "-c", ZOMBIE_MAKER]))
    try:
        assert _until(lambda: len(descendants([maker.proc.pid])) == 1)
        (zpid,) = descendants([maker.proc.pid])
        z = psutil.Process(zpid)
        assert _until(lambda: z.status() == psutil.STATUS_ZOMBIE)
        assert psutil.wait_procs([z], timeout=0.3)[1] == [z]  # why _live filters zombies
        assert _live([z]) == [] and _live([psutil.Process(maker.proc.pid)]) != []
        assert started(maker.proc.pid) == started(maker.proc.pid) is not None
    finally:
        sup.stop(first=[maker], last=[], grace=5)
    assert started(maker.proc.pid) is None and _live([z]) == []


def test_descendants_are_owned_by_their_nearest_root():
    sup = Supervisor(log=lambda m: None, orphans=False)
    grandchild = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(60)']); time.sleep(60)")
    outer = sup.start(_child("outer", [sys.executable, "-c", grandchild]))
    me, pid = os.getpid(), outer.proc.pid
    try:
        assert _until(lambda: len(descendants([pid])) == 1)
        (inner,) = descendants([pid])
        assert descendants([inner]) == {} and descendants([pid, inner]) == {}  # roots excluded
        for roots in ([me, pid], [pid, me]):
            tree = descendants(roots)
            assert tree[inner] == pid and me not in tree and pid not in tree
        assert descendants([me])[inner] == me
    finally:
        sup.stop(first=[outer], last=[], grace=5)
    assert inner not in descendants([me])
