import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from advfeatures import data as D
from advfeatures.config import DataConfig
from pipeline.stages import locate_source, source_sha256


@pytest.mark.parametrize("fmt", ["folder", "zip", "zip_top", "tar", "cifar_dir", "cifar_parent"])
def test_every_source_format_loads_the_same_arrays(tiny_sources, tiny_arrays, fmt):
    tx, ty, vx, vy = tiny_arrays
    path = tiny_sources[fmt]
    raw = D.read_source(path)
    assert raw.classes[:2] == ["airplane", "automobile"] and len(raw.classes) == 10
    # ImageFolder sources are read in (class, file) order; CIFAR batches keep their order
    order = np.lexsort((np.arange(len(ty)), ty)) if fmt in ("folder", "zip", "zip_top") else np.arange(len(ty))
    vorder = np.lexsort((np.arange(len(vy)), vy)) if fmt in ("folder", "zip", "zip_top") else np.arange(len(vy))
    assert raw.train.images.dtype == np.uint8 and raw.train.images.shape == (200, 3, 32, 32)
    assert np.array_equal(raw.train.images, tx[order]) and np.array_equal(raw.train.labels, ty[order])
    assert np.array_equal(raw.test.images, vx[vorder]) and np.array_equal(raw.test.labels, vy[vorder])


def test_folder_and_its_zip_have_one_content_hash(tiny_sources):
    hashes = {D.read_source(tiny_sources[f]).content_sha256() for f in ("folder", "zip", "zip_top")}
    assert len(hashes) == 1
    assert len({D.read_source(tiny_sources[f]).content_sha256() for f in ("tar", "cifar_dir")}) == 1


def test_source_fingerprint_is_content_based(tiny_sources, tmp_path):
    import shutil

    copy = tmp_path / "copy.tar.gz"
    shutil.copy(tiny_sources["tar"], copy)
    assert source_sha256(copy) == source_sha256(tiny_sources["tar"])
    assert source_sha256(tiny_sources["folder"]) != source_sha256(tiny_sources["cifar_dir"])


def _expect(path, match):
    with pytest.raises(D.DataSourceError, match=match) as e:
        D.read_source(D.locate(str(path)))
    assert "Expected" in str(e.value) or "decode" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(D.DataSourceError, match="does not exist.*Expected an ImageFolder"):
        D.locate(str(tmp_path / "nope.zip"))


def test_empty_folder(tmp_path):
    _expect(tmp_path, "neither train/ and test/")


def test_folder_without_test_split(tmp_path, tiny_sources):
    import shutil

    shutil.copytree(tiny_sources["folder"] / "train", tmp_path / "train")
    _expect(tmp_path, "no test/<class>/ folders")


def test_mismatched_classes(tmp_path, tiny_sources):
    import shutil

    shutil.copytree(tiny_sources["folder"], tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "test" / "truck")
    _expect(tmp_path / "d", "differ from test/ classes")


def test_corrupt_image(tmp_path, tiny_sources):
    import shutil

    shutil.copytree(tiny_sources["folder"], tmp_path / "d")
    victim = next((tmp_path / "d" / "train" / "cat").iterdir())
    victim.write_bytes(b"not an image")
    with pytest.raises(D.DataSourceError, match="cannot decode image train/cat/"):
        D.read_source(tmp_path / "d")


def test_not_a_zip(tmp_path):
    p = tmp_path / "data.zip"
    p.write_bytes(b"garbage")
    _expect(p, "not a readable zip")


def test_zip_without_splits(tmp_path):
    p = tmp_path / "data.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("readme.txt", "hi")
    _expect(p, "no train/<class>/ folders")


def test_truncated_tar(tmp_path, tiny_sources):
    p = tmp_path / "cifar-10-python.tar.gz"
    p.write_bytes(tiny_sources["tar"].read_bytes()[:500])
    _expect(p, "not a readable tar")


def test_tar_missing_batches(tmp_path):
    p = tmp_path / "c.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        blob = pickle.dumps({b"label_names": [b"a"]})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(blob)
        import io

        tf.addfile(info, io.BytesIO(blob))
    _expect(p, "CIFAR batches missing")


def test_unsupported_file(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("1,2")
    _expect(p, "unsupported file type")


def test_torchvision_without_internet_names_the_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(D.DataSourceError, match="--data PATH"):
        locate_source(DataConfig(source="torchvision", download_root=str(tmp_path)))


def test_torchvision_source_reuses_a_downloaded_archive(tmp_path, tiny_sources):
    import shutil

    shutil.copy(tiny_sources["tar"], tmp_path / "cifar-10-python.tar.gz")
    path = locate_source(DataConfig(source="torchvision", download_root=str(tmp_path)))
    assert D.read_source(path).train.images.shape == (200, 3, 32, 32)


def test_classes_in_turn_takes_each_class_in_turn_whatever_the_order():
    """Known answers: a class-sorted split (as an ImageFolder or zip gives) yields the first image of
    each class, then the second...; an interleaved one (CIFAR's batches) its head; n past the end
    (or 0) the whole split; a class that runs out leaves the turn to the others."""
    from advfeatures.data import classes_in_turn

    sorted_y = np.repeat(np.arange(10), 1000)
    idx = classes_in_turn(sorted_y, 1000)
    assert np.bincount(sorted_y[idx]).tolist() == [100] * 10 and idx[:3].tolist() == [0, 1, 2]
    assert idx[100] == 1000  # class 1's first image
    assert np.array_equal(classes_in_turn(np.tile(np.arange(10), 1000), 1000), np.arange(1000))
    y = np.array([2, 2, 0, 1, 1, 1])
    assert classes_in_turn(y, 4).tolist() == [0, 2, 3, 4]  # 0, 1, 2 in turn, then class 1's second
    assert classes_in_turn(y, 5).tolist() == [0, 1, 2, 3, 4] and classes_in_turn(y, 6).tolist() == list(range(6))
    assert classes_in_turn(y, 0).tolist() == list(range(6))
