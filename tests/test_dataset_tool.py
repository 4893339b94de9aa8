"""The dataset tool: transforms vs the reference formulas, zip and latent outputs, resume."""

import json
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from edm_jax.data.latent_source import LatentSource
from edm_jax.data.sources import ZipSource
from edm_jax.data.tool import ToolArgs, load_encoder, main, run_tool
from edm_jax.data.transforms import center_crop, center_crop_dhariwal, resize
from edm_jax.nets.vae import VAEConfig, build_vae, random_vae_params, to_state_dict

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
SIZES = {"a/0.png": (20, 16), "a/1.jpg": (16, 24), "b/2.png": (33, 17), "b/3.png": (16, 16)}


def _image(rng, w, h, mode="RGB"):
    """A smooth random PIL image of size w x h."""
    base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    img = PIL.Image.fromarray(base).resize((w, h), PIL.Image.Resampling.BILINEAR)
    return img.convert(mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Mixed sizes, formats and modes in two class folders, plus one undecodable file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        (root / name).parent.mkdir(exist_ok=True)
        mode = "RGBA" if name == "b/3.png" else "RGB"
        _image(rng, w, h, mode).save(root / name)
    _image(rng, 18, 18, "L").save(root / "b/4.png")
    (root / "a/broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(config.json, weights.npz) of a tiny random-weight VAE."""
    root = tmp_path_factory.mktemp("vae")
    vae = build_vae(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4))
    params = random_vae_params(1, vae)
    np.savez(root / "w.npz", **to_state_dict(params))
    (root / "config.json").write_text(json.dumps(TINY))
    return str(root / "config.json"), str(root / "w.npz")


def test_transforms_match_reference_formulas():
    """center-crop (NVlabs/edm) and center-crop-dhariwal (ADM/edm2) on worked sizes."""
    rng = np.random.default_rng(1)
    img = _image(rng, 300, 200)
    arr = np.asarray(img)
    # edm: crop = 200, rows 0:200, cols 50:250, Lanczos to 64.
    want = img.crop((50, 0, 250, 200)).resize((64, 64), PIL.Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(center_crop(arr, 64), np.asarray(want))
    # dhariwal at 64: 300x200 -> BOX 150x100 (200 >= 128), bicubic x0.64 -> 96x64, cols 16:80.
    want = img.resize((150, 100), PIL.Image.Resampling.BOX)
    want = want.resize((96, 64), PIL.Image.Resampling.BICUBIC).crop((16, 0, 80, 64))
    np.testing.assert_array_equal(center_crop_dhariwal(arr, 64), np.asarray(want))
    # dhariwal at 50 on 301x203: BOX 150x101, BOX 75x50, scale 1, cols 12:62.
    img = _image(rng, 301, 203)
    want = img.resize((150, 101), PIL.Image.Resampling.BOX).resize(
        (75, 50), PIL.Image.Resampling.BOX
    )
    want = want.resize((75, 50), PIL.Image.Resampling.BICUBIC).crop((12, 0, 62, 50))
    np.testing.assert_array_equal(center_crop_dhariwal(np.asarray(img), 50), np.asarray(want))
    want = img.resize((40, 40), PIL.Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(resize(np.asarray(img), 40), np.asarray(want))


def _args(src, dest, **kw):
    """ToolArgs for the test folder at 16x16."""
    return ToolArgs(str(src), str(dest), transform="center-crop", resolution=16, quiet=True, **kw)


def test_zip_output_and_bad_images(folder, tmp_path):
    """Undecodable images are named (or skipped and listed); zip matches NVlabs' layout."""
    with pytest.raises(ValueError, match=r"broken\.png.*--skip-bad"):
        run_tool(_args(folder, tmp_path / "x.zip"))
    assert not (tmp_path / "x.zip").exists()
    summary = run_tool(_args(folder, tmp_path / "y.zip", skip_bad=True, shard_size=2))
    assert summary["images"] == 5 and summary["skipped"] == ["a/broken.png"]
    with zipfile.ZipFile(tmp_path / "y.zip") as z:
        meta = json.loads(z.read("dataset.json"))
        assert sorted(z.namelist())[0] == "00000/img00000000.png"
    assert [label for _, label in meta["labels"]] == [0, 0, 1, 1, 1]
    src = ZipSource(tmp_path / "y.zip", resolution=16, channels=3, use_labels=True)
    order = ["a/0.png", "a/1.jpg", "b/2.png", "b/3.png", "b/4.png"]
    for i, name in enumerate(order):
        want = center_crop(np.asarray(PIL.Image.open(folder / name).convert("RGB")), 16)
        np.testing.assert_array_equal(src[i]["image"], want)


def _files(root: Path) -> dict:
    """Relative path -> bytes of every file under root (or of root itself)."""
    if root.is_file():
        return {"": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _interrupt_after(k):
    """on_shard callback raising after shard k (a kill half way)."""

    def hook(s):
        if s == k:
            raise KeyboardInterrupt(f"killed after shard {k}")

    return hook


@pytest.mark.parametrize("kind", ["zip", "latents"])
def test_killed_and_rerun_is_identical(folder, encoder, tmp_path, kind):
    """Interrupted half way: nothing looks complete; the rerun equals an uninterrupted run."""
    enc = {"encoder": encoder[0], "encoder_weights": encoder[1]} if kind == "latents" else {}
    ext = ".zip" if kind == "zip" else ""
    kw = dict(skip_bad=True, shard_size=2, batch_per_device=1, **enc)
    run_tool(_args(folder, tmp_path / f"full{ext}", **kw))
    dest = tmp_path / f"resumed{ext}"
    with pytest.raises(KeyboardInterrupt):
        run_tool(_args(folder, dest, **kw), on_shard=_interrupt_after(1))
    assert not dest.exists() and Path(f"{dest}.partial").exists()
    summary = run_tool(_args(folder, dest, **kw))
    assert summary["resumed_shards"] == 2 and summary["images"] == 5
    assert not Path(f"{dest}.partial").exists()
    full, resumed = _files(tmp_path / f"full{ext}"), _files(dest)
    assert sorted(full) == sorted(resumed)
    for name in full:
        assert full[name] == resumed[name], name


def test_latents_match_direct_encoding(folder, encoder, tmp_path):
    """LatentSource holds the VAE mean and std of pixels/255, per image, with labels."""
    dest = tmp_path / "lat"
    a = _args(folder, dest, skip_bad=True, shard_size=3, batch_per_device=1)
    a = ToolArgs(**{**a.__dict__, "encoder": encoder[0], "encoder_weights": encoder[1]})
    run_tool(a)
    src = LatentSource(dest, use_labels=True)
    assert len(src) == 5 and src.resolution == 8 and src.channels == 4 and src.num_classes == 2
    codec = load_encoder(*encoder)
    order = ["a/0.png", "a/1.jpg", "b/2.png", "b/3.png", "b/4.png"]
    pixels = np.stack(
        [center_crop(np.asarray(PIL.Image.open(folder / n).convert("RGB")), 16) for n in order]
    )
    want = np.asarray(codec.encode_pixels(pixels))
    got, labels = src.get_batch(np.arange(5))
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()  # batch layout only
    assert (got[..., 4:] > 0).all()  # the second half is std, not logvar
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        LatentSource(tmp_path)


def test_bad_arguments_fail_before_compute(folder, encoder, tmp_path, capsys):
    """Wrong weights name the first mismatching key; other mistakes get one clear line."""
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**TINY, "block_out_channels": [8, 16, 16]}))
    a = _args(folder, tmp_path / "lat", encoder=str(wrong), encoder_weights=encoder[1])
    with pytest.raises(ValueError, match=r"first mismatching key missing 'decoder\.up_blocks\.1"):
        run_tool(a)
    assert not (tmp_path / "lat.partial").exists()
    with pytest.raises(SystemExit):
        main(["--source", str(folder), "--dest", str(tmp_path / "o.zip"), "--transform", "crop"])
    assert "invalid choice: 'crop'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="latent output is a folder"):
        run_tool(_args(folder, tmp_path / "l.zip", encoder=encoder[0], encoder_weights=encoder[1]))
    with pytest.raises(ValueError, match="needs --resolution"):
        run_tool(ToolArgs(str(folder), str(tmp_path / "o.zip"), transform="center-crop"))
    (tmp_path / "exists.zip").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists"):
        run_tool(_args(folder, tmp_path / "exists.zip"))
