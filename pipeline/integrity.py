"""Integrity: which folder holds an artifact, and checking it against the checksums in its
manifest (``advfeatures verify``)."""

from __future__ import annotations

from pipeline.kinds import folders
from storage import arrays as A
from storage.store import Store, StoreError


def find(store: Store, key: str) -> str:
    """The store folder holding artifact ``key``."""
    for folder in folders():
        if store.path(folder, key).is_dir():
            return folder
    raise StoreError(f"no artifact {key!r} in the store at {store.root}; `advfeatures show-config` lists keys")


def verify(store: Store, key: str, repair: bool = False) -> list[str]:
    """Check an artifact against the checksums in its manifest; [] when intact.

    Each stage kind says what it checks (``StageKind.verify``): datasets their arrays' content
    sha256, models and students weights.pt's sha256, constructed sets every shard's rows against
    its marker. With ``repair``, a corrupt artifact is unsealed (manifest
    removed, and for constructed sets only the bad shards' markers), so the next run recomputes
    exactly what is broken.
    """
    from pipeline.kinds import kind

    folder = find(store, key)
    path = store.path(folder, key)
    if not store.is_complete(folder, key):
        return [f"{folder}/{key} is unfinished (no manifest); the next run completes it"]
    man = store.manifest(folder, key)
    check = kind(man["stage"]["stage"]).verify
    problems, bad_shards = check(store, key, man) if check is not None else ([], [])
    if problems and repair:
        for i in bad_shards:
            A.marker_path(path, i).unlink(missing_ok=True)
        (path / "manifest.json").unlink()
    return problems
