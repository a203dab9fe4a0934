"""source_sha256(path, store): a source is hashed again only when its path, size or mtime (a
folder: any file's) changed since its dataset was ingested; the dataset's key does not change."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from advfeatures.config import resolve
from pipeline.inventory import scan
from pipeline.plan import dataset_spec
from pipeline.stages import dataset as DS
from storage.hashing import path_sha256
from storage.store import Store, atomic_write_json


def _unread(monkeypatch):
    """Reading the source now fails the test: the sha256 must come from the manifest."""
    def boom(path):
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(DS, "path_sha256", boom)


@pytest.fixture
def ingested(tmp_path, tiny_tar):
    """A private copy of the tiny tarball, ingested: (source path, store, dataset spec)."""
    src = tmp_path / "src" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    shutil.copy(tiny_tar, src)
    cfg = resolve("tiny", [], data=str(src), store=str(tmp_path / "store"))
    store = Store(cfg.runtime.store)
    spec = dataset_spec(DS.source_sha256(src, store))  # nothing ingested yet: hashed
    DS.ingest(store, cfg.data, spec)
    return src, store, spec


def test_ingest_records_the_source_and_an_unchanged_one_is_not_read_again(ingested, monkeypatch):
    src, store, spec = ingested
    man = store.manifest("datasets", spec.key)
    st = src.stat()
    assert (man["source_path"], man["source_size"], man["source_mtime_ns"]) == (str(src.resolve()), st.st_size,
                                                                                 st.st_mtime_ns)
    assert "source_listing" not in man and man["stage"]["config"] == {"source_sha256": path_sha256(src)}
    assert dataset_spec(path_sha256(src)).key == spec.key  # the key: the source's sha256 alone, as before
    _unread(monkeypatch)
    assert DS.source_sha256(src, store) == man["source_sha256"]
    with pytest.raises(AssertionError, match="was hashed"):
        DS.source_sha256(src)  # no store: always hashed


def test_a_changed_size_or_mtime_is_hashed_again(ingested, monkeypatch):
    src, store, spec = ingested
    old = store.manifest("datasets", spec.key)["source_sha256"]
    st = src.stat()
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # other bytes, same size
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = DS.source_sha256(src, store)
    assert new == hashlib.sha256(bytes(data)).hexdigest() != old
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # the recorded mtime, but another size
    with open(src, "ab") as f:
        f.write(b"x")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert DS.source_sha256(src, store) == hashlib.sha256(bytes(data) + b"x").hexdigest()
    data[-1] ^= 0xFF
    src.write_bytes(bytes(data))  # the ingested bytes again, at the recorded mtime: not read
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    _unread(monkeypatch)
    assert DS.source_sha256(src, store) == old
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched, same bytes: read again
    with pytest.raises(AssertionError, match="was hashed"):
        DS.source_sha256(src, store)


def test_a_copy_or_a_touched_source_is_hashed_once(ingested, tmp_path, monkeypatch):
    """The same bytes at another path, or touched: hashed the first time, then remembered beside the
    datasets (DS.RESTATS) and not read again while unchanged; other bytes are never remembered."""
    src, store, spec = ingested
    old = store.manifest("datasets", spec.key)["source_sha256"]
    copy = tmp_path / "copy.tar.gz"
    shutil.copy2(src, copy)  # same size and mtime, another path
    with monkeypatch.context() as m:
        _unread(m)
        with pytest.raises(AssertionError, match="was hashed"):
            DS.source_sha256(copy, store)  # not the recorded path: read
    assert DS.source_sha256(copy, store) == old
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert DS.source_sha256(src, store) == old
    with monkeypatch.context() as m:
        _unread(m)
        assert DS.source_sha256(copy, store) == old and DS.source_sha256(src, store) == old
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched again: read again
        with pytest.raises(AssertionError, match="was hashed"):
            DS.source_sha256(src, store)
    other = tmp_path / "other.tar.gz"
    other.write_bytes(src.read_bytes() + b"x")  # bytes no dataset holds: hashed every time
    assert DS.source_sha256(other, store) == path_sha256(other)
    with monkeypatch.context() as m:
        _unread(m)
        with pytest.raises(AssertionError, match="was hashed"):
            DS.source_sha256(other, store)
    assert (store.root / "datasets" / DS.RESTATS).is_file()
    assert [a.key for a in scan(store)] == [spec.key]  # not an artifact to ls or gc


def test_a_source_changed_after_planning_records_no_stat(tmp_path, tiny_tar):
    src = tmp_path / "cifar-10-python.tar.gz"
    shutil.copy(tiny_tar, src)
    cfg = resolve("tiny", [], data=str(src), store=str(tmp_path / "store"))
    store = Store(cfg.runtime.store)
    spec = dataset_spec("0" * 64)  # planned from other bytes than those ingested
    DS.ingest(store, cfg.data, spec)
    man = store.manifest("datasets", spec.key)
    assert "source_size" not in man and DS.source_sha256(src, store) == path_sha256(src)


def test_a_folder_source_is_hashed_again_when_any_file_changes(tiny_sources, tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    shutil.copytree(tiny_sources["folder"], folder)
    store, sha = Store(tmp_path / "store"), path_sha256(folder)
    stat = DS.source_stat(folder)
    assert set(stat) == {"source_path", "source_size", "source_mtime_ns", "source_listing"}
    (store.root / "datasets" / ("f" * 16)).mkdir(parents=True)
    atomic_write_json(store.root / "datasets" / ("f" * 16) / "manifest.json", {"source_sha256": sha, **stat})
    one = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    with monkeypatch.context() as m:
        _unread(m)
        assert DS.source_sha256(folder, store) == sha
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # one file touched
    assert DS.source_stat(folder) != stat
    with monkeypatch.context() as m:
        _unread(m)
        with pytest.raises(AssertionError, match="was hashed"):
            DS.source_sha256(folder, store)
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert DS.source_stat(folder) == stat
    one.rename(one.with_name("renamed-" + one.name))  # same sizes and mtimes, another listing
    assert DS.source_stat(folder) != stat


def test_a_folder_listing_names_its_files(tmp_path):
    for name in ("a/1.bin", "b/2.bin"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"same")
        os.utime(tmp_path / name, ns=(0, 10**18))
    stat = DS.source_stat(tmp_path)
    (tmp_path / "b/2.bin").rename(tmp_path / "b/3.bin")  # same size and mtime: only the name differs
    assert DS.source_stat(tmp_path) != stat
    assert stat["source_size"] == 8 and stat["source_mtime_ns"] == 10**18


def test_a_source_changed_while_hashed_is_not_remembered(ingested, tmp_path, monkeypatch):
    """The stat recorded is the one before hashing: a source touched meanwhile gets no record."""
    src, store, spec = ingested
    copy = tmp_path / "copy.tar.gz"
    shutil.copy2(src, copy)
    real = DS.path_sha256

    def touching(path):
        sha = real(path)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return sha

    monkeypatch.setattr(DS, "path_sha256", touching)
    DS.source_sha256(copy, store)
    assert not (store.root / "datasets" / DS.RESTATS).exists()

