"""The shard protocol's two steps that every sharded set kind shares (PGD sets, inversion sets):
create the arrays once under the set's lock, and run a shard's body at most once per shard
(DESIGN.md, "shard protocol"). A kind supplies its layout and its shard body; nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import progress
from pipeline.kinds import StageSpec, sharded
from storage import arrays as A
from storage.store import Store


def prepare(store: Store, spec: StageSpec, layout: Callable[[], A.Layout], kind: str) -> list[int] | None:
    """Create the set's arrays (idempotent); return the indices of unfinished shards, or None when
    the set is complete (checked once, under the set's lock). ``layout`` is called under the lock,
    only when the set is not complete."""
    store.ensure_writable()
    path = store.path(spec.folder, spec.key)
    with store.lock(spec.folder, spec.key):
        if store.is_complete(spec.folder, spec.key):
            return None
        lay = layout()
        A.create_constructed(path, lay)
        pending = A.pending_shards(path, lay)
    if pending:
        progress.emit({"event": "pgd_set", "key": spec.key, "kind": kind,
                       "rows": sum(b - a for a, b in map(lay.rows, pending)), "shards": len(pending),
                       "total_shards": lay.num_shards})
    return pending


def once(store: Store, spec: StageSpec, shard: int, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body(path)`` for one shard unless the shard (or the whole set) is done already; the
    per-shard lock means one writer per shard, ever."""
    path = store.path(spec.folder, spec.key)
    return store.once(spec.folder, f"{spec.key}-shard{shard}",
                      lambda: store.is_complete(spec.folder, spec.key) or A.shard_done(path, shard),
                      lambda: body(path), skipped={"shard": shard, "skipped": True})


def report_done(path: Path, spec: StageSpec, shard: int) -> None:
    """A shard written by another process (a Dask worker): its progress event here, from its marker."""
    layout, event = A.stored_layout(path), sharded(spec).event
    if layout is not None and event is not None:
        marker = A.read_json(A.marker_path(path, shard))
        progress.emit(event(spec, marker, layout.num_shards, layout.num_shards - len(A.pending_shards(path, layout))))
