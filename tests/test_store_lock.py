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
    """Six threads reach one stage at once: the one that computes holds it until every other has
    found it not done and gone for the lock, so all six contend; one computes, five skip."""
    store, done, inside, most, calls = Store(tmp_path), threading.Event(), [0], [0], []
    guard, arrived = threading.Condition(), set()

    def first_check():
        with guard:
            arrived.add(threading.get_ident())
            guard.notify_all()
        return done.is_set()

    def compute():
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            assert guard.wait_for(lambda: len(arrived) == 6, timeout=30), "the other threads never came"
        calls.append(1)
        done.set()
        with guard:
            inside[0] -= 1
        return "computed"

    out = []
    threads = [threading.Thread(target=lambda: out.append(store.once("models", "k" * 16, first_check, compute,
                                                                     skipped="skipped")))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == ["computed"] + ["skipped"] * 5 and len(calls) == 1 and most[0] == 1


HOLDER = """
import sys
from storage.store import Store
with Store(sys.argv[1]).lock("models", "k" * 16):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says release
print("released", flush=True)
"""


def _holder(root):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() == "held"
    return p


def test_another_process_waits_and_the_lock_file_is_where_gc_looks(tmp_path):
    path = tmp_path / ".locks" / f"models-{'k' * 16}.lock"
    p = _holder(tmp_path)
    released, got, inside = threading.Event(), threading.Event(), []

    def take():
        with Store(tmp_path).lock("models", "k" * 16):
            inside.append((released.is_set(), _held_by_someone(path)))
            got.set()

    try:
        assert path.is_file() and _held_by_someone(path)
        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not got.wait(1.0)  # it waits while the other process holds the lock ...
        released.set()
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "released"
        assert got.wait(30), "not acquired after the holder released it"
        assert inside == [(True, True)]  # ... and got it only after the release, holding it then
        taker.join(30)  # out of its `with` (got is set inside it: on a busy machine it may not have left)
        # released, the file kept for the next holder
        assert not taker.is_alive() and path.is_file() and not _held_by_someone(path)
    finally:
        p.kill()
        p.wait()


def test_a_sigkilled_holders_lock_is_released(tmp_path):
    p = _holder(tmp_path)
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
