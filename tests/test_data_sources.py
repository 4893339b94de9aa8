"""Data sources on data the tests make: digits, image folders, EDM zips, npz, tfds ArrayRecord."""

import io
import json
import os
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest

from edm_jax.data import load_source, make_pipeline

tfds = pytest.importorskip("tensorflow_datasets")


def _cfg(**kw):
    """A data config with defaults."""
    return {"name": "digits", "resolution": 32, "channels": 3, "use_labels": False, **kw}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    """PNG bytes of an array (optionally converted to a PIL mode)."""
    img = PIL.Image.fromarray(array)
    img = img.convert(mode) if mode else img
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pattern(h, w, c, seed):
    """Deterministic uint8 test image [h,w,c]."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------- digits


@pytest.mark.parametrize("resolution,k,pad", [(32, 4, 0), (28, 3, 2), (8, 1, 0)])
def test_digits_exact_pixels_and_labels(resolution, k, pad):
    from sklearn.datasets import load_digits

    ref = load_digits()
    src = load_source(_cfg(resolution=resolution, channels=3, use_labels=True))
    assert (len(src), src.num_classes, src.resolution, src.channels) == (1797, 10, resolution, 3)
    for i in (0, 5, 1796):
        rec = src[i]
        digit = np.round(ref.images[i] * 255 / 16).astype(np.uint8)
        big = np.kron(digit, np.ones((k, k), np.uint8))
        want = np.pad(big, ((pad, pad), (pad, pad)))
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (resolution, resolution, 3)
        np.testing.assert_array_equal(rec["image"], np.repeat(want[..., None], 3, -1))
        assert rec["label"] == ref.target[i] and rec["label"].dtype == np.int32


def test_digits_unlabeled_and_grey_from_configdict():
    from ml_collections import ConfigDict

    src = load_source(ConfigDict(_cfg(resolution=16, channels=1, use_labels=False)))
    assert src.num_classes == 0 and src[3]["label"] == 0 and src[3]["image"].shape == (16, 16, 1)


# ---------------------------------------------------------------- image folders


@pytest.fixture
def class_folder(tmp_path):
    """cat/: 32x32 RGB, 40x32 RGB (crop), P-mode; dog/: L, RGBA, 16-bit, 64x64 constant."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    a = _pattern(32, 32, 3, 0)
    b = _pattern(32, 40, 3, 1)  # H=32, W=40: centre crop keeps columns 4..35
    pal = PIL.Image.fromarray(_pattern(32, 32, 3, 2)).quantize(colors=16)
    (root / "cat" / "a.png").write_bytes(_png(a))
    (root / "cat" / "b.jpg").write_bytes(_png(b))  # PNG data with a .jpg name decodes fine
    pal.save(root / "cat" / "c.png")
    grey = _pattern(32, 32, 1, 3)[..., 0]
    (root / "dog" / "d.png").write_bytes(_png(grey))
    rgba = _pattern(32, 32, 4, 4)
    (root / "dog" / "e.png").write_bytes(_png(rgba))
    deep = (_pattern(32, 32, 1, 5)[..., 0].astype(np.uint16) << 8) | 0x7F
    PIL.Image.fromarray(deep).save(root / "dog" / "f.png")  # mode I;16
    (root / "dog" / "g.png").write_bytes(_png(np.full((64, 64, 3), (10, 200, 99), np.uint8)))
    (root / "notes.txt").write_text("not an image")
    return root, dict(a=a, b=b, pal=pal, grey=grey, rgba=rgba, deep=deep)


def test_folder_classes_modes_and_sizes(class_folder):
    root, img = class_folder
    src = load_source(_cfg(name="folder", path=str(root), use_labels=True))
    assert len(src) == 7 and src.num_classes == 2 and src.class_names == ["cat", "dog"]
    labels = [int(src[i]["label"]) for i in range(7)]
    assert labels == [0, 0, 0, 1, 1, 1, 1]
    images, batch_labels = src.get_batch(np.array([6, 0, 3]))
    assert batch_labels.tolist() == [1, 0, 1] and images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(src[0]["image"], img["a"])
    np.testing.assert_array_equal(src[1]["image"], img["b"][:, 4:36])
    np.testing.assert_array_equal(src[2]["image"], np.asarray(img["pal"].convert("RGB")))
    np.testing.assert_array_equal(src[3]["image"], np.repeat(img["grey"][..., None], 3, -1))
    np.testing.assert_array_equal(src[4]["image"], img["rgba"][..., :3])
    top = (img["deep"] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(src[5]["image"], np.repeat(top[..., None], 3, -1))
    const = src[6]["image"]  # 64 -> 32 Lanczos keeps a constant image constant
    np.testing.assert_array_equal(const, np.broadcast_to(np.uint8([10, 200, 99]), (32, 32, 3)))


def test_folder_grey_channels_and_unlabeled(class_folder):
    root, img = class_folder
    src = load_source(_cfg(name="folder", path=str(root), channels=1, use_labels=False))
    assert src.num_classes == 0 and src[3]["label"] == 0
    np.testing.assert_array_equal(src[3]["image"][..., 0], img["grey"])
    want = np.asarray(PIL.Image.fromarray(img["a"]).convert("L"))
    np.testing.assert_array_equal(src[0]["image"][..., 0], want)


def test_folder_with_loose_images_needs_no_labels(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(_pattern(16, 16, 3, 0)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.png").write_bytes(_png(_pattern(16, 16, 3, 1)))
    assert len(load_source(_cfg(name="folder", path=str(tmp_path), resolution=16))) == 2
    with pytest.raises(ValueError, match="outside class subfolders.*x.png"):
        load_source(_cfg(name="folder", path=str(tmp_path), resolution=16, use_labels=True))


# ---------------------------------------------------------------- EDM zip, npz


def _edm_zip(path, images, labels):
    """A zip laid out like NVlabs/edm dataset_tool.py output."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, im in zip(names, images, strict=True):
            z.writestr(name, _png(im))
        meta = None if labels is None else [[n, int(y)] for n, y in zip(names, labels, strict=True)]
        z.writestr("dataset.json", json.dumps({"labels": meta}))
    return names


def test_edm_zip_labels_and_pixels(tmp_path):
    images = [_pattern(16, 16, 3, i) for i in range(12)]
    labels = [7, 0, 3, 3, 1, 2, 9, 9, 0, 4, 5, 6]
    _edm_zip(tmp_path / "ds.zip", images, labels)
    src = load_source(
        _cfg(name="zip", path=str(tmp_path / "ds.zip"), resolution=16, use_labels=True)
    )
    assert len(src) == 12 and src.num_classes == 10
    for i in range(12):
        np.testing.assert_array_equal(src[i]["image"], images[i])
        assert src[i]["label"] == labels[i]
    import pickle

    clone = pickle.loads(pickle.dumps(src))  # picklable for worker processes
    np.testing.assert_array_equal(clone[5]["image"], images[5])


def test_edm_zip_without_labels(tmp_path):
    _edm_zip(tmp_path / "u.zip", [_pattern(8, 8, 3, 0)], None)
    cfg = _cfg(name="zip", path=str(tmp_path / "u.zip"), resolution=8)
    assert load_source(cfg).num_classes == 0
    with pytest.raises(ValueError, match="use_labels=True but .* has no labels"):
        load_source({**cfg, "use_labels": True})


def test_npz_source(tmp_path):
    images = np.stack([_pattern(16, 16, 1, i)[..., 0] for i in range(5)])
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5) * 2)
    src = load_source(
        _cfg(name="npz", path=str(tmp_path / "d.npz"), resolution=16, channels=1, use_labels=True)
    )
    assert src.num_classes == 9 and src[4]["label"] == 8
    np.testing.assert_array_equal(src[2]["image"][..., 0], images[2])


# ---------------------------------------------------------------- tfds (ArrayRecord, offline)


class TinyEdmImages(tfds.core.GeneratorBasedBuilder):
    """Tiny offline image dataset: image i has pixel [0,0,0] == i, label i % 4."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(12, 12, 3)),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png(tiny_image(i)), "label": i % 4}  # PNG bytes: no TF needed


def tiny_image(i: int) -> np.ndarray:
    """Image i of TinyEdmImages."""
    im = _pattern(12, 12, 3, 100 + i)
    im[0, 0, 0] = i
    return im


def test_tfds_array_record_roundtrip(tmp_path):
    TinyEdmImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert list((tmp_path / "tiny_edm_images" / "1.0.0").glob("*.array_record*"))
    cfg = _cfg(
        name="tfds",
        tfds_name="tiny_edm_images",
        tfds_data_dir=str(tmp_path),
        split="train",
        resolution=12,
        use_labels=True,
    )
    src = load_source(cfg)
    assert len(src) == 20 and src.num_classes == 4
    seen = set()
    for j in range(20):
        rec = src[j]
        i = int(rec["image"][0, 0, 0])
        np.testing.assert_array_equal(rec["image"], tiny_image(i))
        assert rec["label"] == i % 4 and rec["label"].dtype == np.int32
        seen.add(i)
    assert seen == set(range(20))
    batch = next(make_pipeline(src, global_batch_size=20, seed=0, shard_index=0, shard_count=1))
    ids = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert sorted(ids) == list(range(20)) and np.array_equal(batch["label"], ids % 4)
    cached = load_source({**cfg, "cache": True})
    assert cached.num_classes == 4 and len(cached) == 20
    for j in (0, 7, 19):
        np.testing.assert_array_equal(cached[j]["image"], src[j]["image"])
        assert cached[j]["label"] == src[j]["label"]
    with pytest.raises(ValueError, match="split 'test'"):
        load_source({**cfg, "split": "test"})
    with pytest.raises(ValueError, match="12x12 but resolution=16"):
        load_source({**cfg, "resolution": 16})


# ---------------------------------------------------------------- bad input


def test_bad_input_errors(tmp_path, class_folder):
    root, _ = class_folder
    with pytest.raises(ValueError, match="unknown data.name 'imagenet'.*valid"):
        load_source(_cfg(name="imagenet"))
    with pytest.raises(FileNotFoundError, match="does not exist.*nope"):
        load_source(_cfg(name="folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_source(_cfg(name="folder", path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="a.png: image is 32x32 but resolution=128"):
        load_source(_cfg(name="folder", path=str(root), resolution=128))
    with pytest.raises(ValueError, match="resolution must be >= 8"):
        load_source(_cfg(resolution=4))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_source(_cfg(channels=4))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_source(_cfg(name="folder", path=str(root)))


def test_truncated_image_is_named_before_training(tmp_path, monkeypatch):
    """Every image is decoded once when the source is built (issue 13 item 8)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _png(_pattern(16, 16, 3, 0))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.png").write_bytes(data)
    (tmp_path / "d" / "t.png").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    with pytest.raises(ValueError, match="cannot decode image .*t.png"):
        load_source(_cfg(name="folder", path=str(tmp_path / "d"), resolution=16))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("ok.png", data)
        z.writestr("t.png", data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode image .*d.zip:t.png"):
        load_source(_cfg(name="zip", path=str(tmp_path / "d.zip"), resolution=16))


def test_verified_images_are_not_decoded_again(tmp_path, monkeypatch):
    """A restart skips images with the same size and mtime; a rewritten file is decoded."""
    import edm_jax.data.sources as sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.png").write_bytes(_png(_pattern(16, 16, 3, i)))
    decoded = []
    real = sources.verify_image
    monkeypatch.setattr(sources, "verify_image", lambda d, r, n: decoded.append(n) or real(d, r, n))
    cfg = _cfg(name="folder", path=str(tmp_path / "d"), resolution=16)
    assert len(load_source(cfg)) == 3 and len(decoded) == 3
    load_source(cfg)
    assert len(decoded) == 3  # all cached
    (tmp_path / "d" / "1.png").write_bytes(_png(_pattern(16, 16, 3, 0))[:40])
    os.utime(tmp_path / "d" / "1.png", ns=(1, 1))
    with pytest.raises(ValueError, match="1.png"):
        load_source(cfg)
    assert decoded[3:] == [str(tmp_path / "d" / "1.png")]


def test_tfds_errors(tmp_path, monkeypatch):
    cfg = _cfg(name="tfds", tfds_data_dir=str(tmp_path), resolution=8)
    with pytest.raises(ValueError, match="unknown tfds dataset 'cifar_ten'.*cifar10"):
        load_source({**cfg, "tfds_name": "cifar_ten"})
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"edm_jax\[tfds\]"):
        load_source({**cfg, "tfds_name": "cifar10"})


class TinyNeedsTf(tfds.core.GeneratorBasedBuilder):
    """Yields numpy images: encoding them to PNG inside tfds needs TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3))})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"image": np.zeros((8, 8, 3), np.uint8)}


def test_tfds_prepare_without_tensorflow_points_at_extra(tmp_path):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("TensorFlow is installed: preparing works, nothing to report")
    except ImportError:
        pass
    cfg = _cfg(name="tfds", tfds_name="tiny_needs_tf", tfds_data_dir=str(tmp_path), resolution=8)
    with pytest.raises(RuntimeError, match=r"needs tensorflow.*edm_jax\[tfds\]"):
        load_source(cfg)
