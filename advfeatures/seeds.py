"""Seeds derived from what a random stream is for, so that no two streams of a plan coincide.

    derive_seed(*parts) = first 8 bytes of sha256(json(parts)), little-endian, as a 63-bit int

A model's initial weights use ``derive_seed("init", role, ..., seed)`` and its data order and
augmentation ``derive_seed("data", role, ..., seed)``: a student of seed 0 does not start from
the source's initial weights (seed 0 too), and the source and its students never see batches in
the same order. A PGD row's random start uses ``derive_seed("start", set seed, image index)``, so
it does not depend on the shard or batch the row falls in.

Every random number is drawn by a CPU generator and then moved to the device: a stream gives the
same numbers on a CPU and on a GPU, so the device is not part of any cache key.
"""

from __future__ import annotations

import hashlib
import json

import torch


def derive_seed(*parts: str | int) -> int:
    """A 63-bit seed from strings and integers (stable across processes and machines)."""
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise TypeError(f"seed parts must be str or int, got {p!r}")
    blob = json.dumps(list(parts), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def model_seeds(role: str, identity: tuple[str | int, ...], seed: int) -> dict[str, int]:
    """The seeds of a model's initial weights and of its data order + augmentation."""
    return {"init": derive_seed("init", role, *identity, seed), "data": derive_seed("data", role, *identity, seed)}
