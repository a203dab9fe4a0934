"""Inputs that cannot work fail before any work: one line on stderr, exit 2, no traceback, and
nothing written to the store (a data source that cannot be read, a Dask scheduler that does not
answer)."""

import shutil
import socket
import zipfile

import pytest

from advfeatures import data as D
from flows.cli import main


def _run(capsys, tmp_path, data, *extra):
    store = tmp_path / "store"
    rc = main(["run", "--profile", "tiny", "--data", str(data), "--store", str(store), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err, store


def _one_line(rc, err, store, match):
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert not store.exists() or not any(store.rglob("*"))


def _zip_of(folder, path, skip=lambda _p: False, damage=lambda _p, b: b):
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not skip(f):
                zf.writestr(str(f.relative_to(folder)), damage(f, f.read_bytes()))
    return path


def test_a_truncated_zip(capsys, tmp_path, tiny_sources):
    p = tmp_path / "data.zip"
    p.write_bytes(tiny_sources["zip"].read_bytes()[:4000])
    _one_line(*_run(capsys, tmp_path, p), "not a readable zip")


def test_a_corrupt_image(capsys, tmp_path, tiny_sources):
    p = _zip_of(tiny_sources["folder"], tmp_path / "data.zip",
                damage=lambda f, b: b"not an image" if f.parent.name == "cat" else b)
    _one_line(*_run(capsys, tmp_path, p), "cannot decode image")


def test_classes_that_differ_between_splits(capsys, tmp_path, tiny_sources):
    p = _zip_of(tiny_sources["folder"], tmp_path / "data.zip",
                skip=lambda f: f.parent.name == "truck" and f.parent.parent.name == "test")
    _one_line(*_run(capsys, tmp_path, p), "differ from test/ classes")


def test_a_missing_test_split(capsys, tmp_path, tiny_sources):
    shutil.copytree(tiny_sources["folder"] / "train", tmp_path / "d" / "train")
    _one_line(*_run(capsys, tmp_path, tmp_path / "d"), "no test/<class>/ folders")


def test_a_dask_scheduler_that_does_not_answer(capsys, tmp_path, tiny_sources):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err, store = _run(capsys, tmp_path, tiny_sources["zip"], "--set", "fanout.executor=dask", "--set",
                          f"dask.address=tcp://127.0.0.1:{port}")
    _one_line(rc, err, store, f"no Dask scheduler answers at dask.address=tcp://127.0.0.1:{port}")


def test_an_unknown_until_kind_names_the_kinds(capsys, tmp_path, tiny_sources):
    rc, err, store = _run(capsys, tmp_path, tiny_sources["zip"], "--until", "nope")
    _one_line(rc, err, store, "--until nope: not a stage kind; choose one of ['construct', 'dataset'")


@pytest.mark.parametrize("fmt", ["folder", "zip", "zip_top", "tar", "cifar_dir", "cifar_parent"])
def test_every_good_source_passes_the_probe(tiny_sources, fmt):
    classes = D.probe(tiny_sources[fmt])
    assert classes in ([], D.read_source(tiny_sources[fmt]).classes)
