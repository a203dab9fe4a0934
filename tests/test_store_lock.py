"""Store.lock / Store.once: one holder across threads and processes, the completeness re-checked
after acquiring, the lock file where gc looks for it (and flock-compatible with gc's probe), a
lock of a SIGKILLed holder released, and URL stores on the installed remote lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from storage.store import Store, StoreError


def _held_by_someone(path) -> bool:
    """gc's probe (pipeline.inventory.held_off): a non-blocking flock on the lock file."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_threads_compute_once_and_hold_the_lock_one_at_a_time(tmp_path):
    store, done, inside, most, calls = Store(tmp_path), threading.Event(), [0], [0], []
    guard = threading.Lock()

    def compute():
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        calls.append(1)
        done.set()
        with guard:
            inside[0] -= 1
        return "computed"

    out = []
    threads = [threading.Thread(target=lambda: out.append(store.once("models", "k" * 16, done.is_set, compute,
                                                                     skipped="skipped")))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(out) == ["computed"] + ["skipped"] * 5 and len(calls) == 1 and most[0] == 1


HOLDER = """
import sys, time
from storage.store import Store
with Store(sys.argv[1]).lock("models", "k" * 16):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(root, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() == "held"
    return p


def test_another_process_waits_and_the_lock_file_is_where_gc_looks(tmp_path):
    path = tmp_path / ".locks" / f"models-{'k' * 16}.lock"
    p = _holder(tmp_path, 1.5)
    try:
        assert path.is_file() and _held_by_someone(path)
        t0 = time.monotonic()
        with Store(tmp_path).lock("models", "k" * 16):
            assert time.monotonic() - t0 > 1.0  # waited for the holder's 1.5 s
            assert _held_by_someone(path)
        assert path.is_file() and not _held_by_someone(path)  # released, the file kept for the next holder
    finally:
        p.kill()
        p.wait()


def test_a_sigkilled_holders_lock_is_released(tmp_path):
    p = _holder(tmp_path, 60)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    got = threading.Event()

    def take():
        with Store(tmp_path).lock("models", "k" * 16):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    assert got.wait(10), "the lock of a killed process was not released"


def test_url_stores_use_the_installed_remote_lock(tmp_path, monkeypatch):
    store, names = Store(f"file://{tmp_path}/url"), []

    @contextlib.contextmanager
    def remote(name):
        names.append(name)
        yield

    monkeypatch.setattr(Store, "remote_lock", None)
    with pytest.raises(StoreError, match="cross-host lock"), store.lock("models", "k" * 16):
        pass
    Store.use_remote_lock(remote)
    assert store.once("models", "k" * 16, lambda: False, lambda: "computed", skipped="skipped") == "computed"
    assert names == [f"models-{'k' * 16}"] and not (tmp_path / "url" / ".locks").exists()
