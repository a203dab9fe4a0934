"""Integrity: which folder holds an artifact, and checking it against the checksums in its
manifest (``advfeatures verify``)."""

from __future__ import annotations

from advfeatures import data as D
from pipeline.kinds import FOLDER
from storage import arrays as A
from storage.hashing import path_sha256
from storage.store import Store, StoreError


def find(store: Store, key: str) -> str:
    """The store folder holding artifact ``key``."""
    for folder in dict.fromkeys(FOLDER.values()):
        if store.path(folder, key).is_dir():
            return folder
    raise StoreError(f"no artifact {key!r} in the store at {store.root}; `advfeatures show-config` lists keys")


def verify(store: Store, key: str, repair: bool = False) -> list[str]:
    """Check an artifact against the checksums in its manifest; [] when intact.

    datasets: the arrays' content sha256; models: weights.pt's sha256; constructed sets: every
    shard's rows against its marker. With ``repair``, a corrupt artifact is unsealed (manifest
    removed, and for constructed sets only the bad shards' markers), so the next run recomputes
    exactly what is broken.
    """
    folder = find(store, key)
    path = store.path(folder, key)
    if not store.is_complete(folder, key):
        return [f"{folder}/{key} is unfinished (no manifest); the next run completes it"]
    man = store.manifest(folder, key)
    problems: list[str] = []
    bad_shards: list[int] = []
    if folder == "datasets":
        try:
            raw = D.RawDataset(*(D.Split(*A.read_split(path, s)) for s in ("train", "test")), man["classes"])
            if raw.content_sha256() != man["content_sha256"]:
                problems.append("dataset arrays do not match their content sha256")
        except Exception as e:  # noqa: BLE001 - undecodable chunks
            problems.append(f"dataset arrays unreadable ({type(e).__name__}: {e})")
    elif folder == "models":
        weights = path / "weights.pt"
        if not weights.is_file() or path_sha256(weights) != man.get("weights_sha256"):
            problems.append("weights.pt is missing or does not match its sha256")
    elif folder == "constructed":
        found = A.verify_shards(path, man["shards"])
        bad_shards = [p["shard"] for p in found]
        problems += [f"shard {p['shard']} rows {p['start']}:{p['stop']}: {p['problem']}" for p in found]
    if problems and repair:
        for i in bad_shards:
            A.marker_path(path, i).unlink(missing_ok=True)
        (path / "manifest.json").unlink()
    return problems
