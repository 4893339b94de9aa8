"""Dataset tool: images of any source -> an NVlabs-format image zip, or VAE latents in shards.

    python -m edm_jax.data.tool --source photos/ --dest data.zip \\
        --transform center-crop-dhariwal --resolution 256
    python -m edm_jax.data.tool --source data.zip --dest latents/ --resolution 256 \\
        --encoder sd-vae-ft-mse --encoder-weights sd-vae-ft-mse.npz

Zip output: PNGs ``00000/img00000000.png`` ... and ``dataset.json`` (labels or null), as
NVlabs/edm(2) ``dataset_tool.py convert``. Latent output (EDM2 ``dataset_tool.py encode``):
a folder with ``manifest.json``, ``labels.npy`` and shards ``latents-NNNNN.npy`` holding
float32 [n,h,w,2L], the VAE's mean and std of pixels/255 concatenated on channels (NHWC);
training draws ``mean + std * noise`` each step (``edm_jax.data.latents``).

Work happens in ``DEST.partial/``, one shard at a time (each written to a temporary name,
then a ``.done`` marker); a rerun after a kill skips finished shards, and DEST appears
(by rename) only when complete. Encoding is sharded over the local devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from edm_jax.data.raw_images import RawImages, open_raw
from edm_jax.data.transforms import TRANSFORMS, get_transform

__all__ = ["ToolArgs", "main", "run_tool"]

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: identical runs give identical bytes


@dataclasses.dataclass(frozen=True)
class ToolArgs:
    """Everything that determines the output (and the resume check), plus run options."""

    source: str
    dest: str
    transform: str | None = None
    resolution: int | None = None
    channels: int = 3
    encoder: str | None = None  # VAE preset name or a diffusers config.json path
    encoder_weights: str | None = None  # .npz state_dict (from `edm_jax.nets.vae convert`)
    max_images: int | None = None
    shard_size: int = 256
    batch_per_device: int = 4
    skip_bad: bool = False
    quiet: bool = False

    def job(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        keep = ("source", "transform", "resolution", "channels", "encoder", "encoder_weights",
                "max_images", "shard_size")  # fmt: skip
        return {k: getattr(self, k) for k in keep}


def _check_args(a: ToolArgs) -> None:
    """Clear errors for bad arguments, before anything is read or computed."""
    if a.transform is not None and a.transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {a.transform!r}; valid: {sorted(TRANSFORMS)}")
    get_transform(a.transform, a.resolution)
    if a.shard_size < 1 or a.batch_per_device < 1:
        raise ValueError("--shard-size and --batch-per-device must be positive")
    if a.encoder is None:
        if a.encoder_weights is not None:
            raise ValueError("--encoder-weights given without --encoder (e.g. sd-vae-ft-mse)")
        if not a.dest.endswith(".zip"):
            raise ValueError(f"--dest {a.dest!r}: image output must be a .zip (or add --encoder)")
    else:
        if a.encoder_weights is None:
            raise ValueError(f"--encoder {a.encoder!r} needs --encoder-weights W.npz")
        if a.dest.endswith(".zip"):
            raise ValueError(f"--dest {a.dest!r}: latent output is a folder, not a .zip")
        if a.channels != 3:
            raise ValueError(f"the VAE encodes RGB images: --channels must be 3, got {a.channels}")
    if os.path.exists(a.dest):
        raise FileExistsError(f"--dest {a.dest} already exists; remove it or choose another")


def load_encoder(name: str, weights: str):
    """A LatentCodec (EDM2 normalisation) from a preset or config.json and .npz weights."""
    from edm_jax.data.latents import load_codec

    return load_codec(name, weights)


def _sharded_encoder(codec, batch_per_device: int):
    """(global batch, fn(uint8 [B,R,R,3]) -> raw latents), jit-sharded over local devices."""
    import jax
    from jax.sharding import NamedSharding

    from edm_jax.sharding import BATCH, REPLICATED, make_mesh

    devices = jax.local_devices()
    mesh = make_mesh(devices)  # a mesh on one device too: jit's shardings are built on it
    batch, rep = NamedSharding(mesh, BATCH), NamedSharding(mesh, REPLICATED)
    params = jax.device_put(codec.params, rep)
    fn = jax.jit(codec._encode, in_shardings=(rep, batch), out_shardings=batch)
    global_batch = batch_per_device * len(devices)

    def encode(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), global_batch):
            chunk = images[i : i + global_batch]
            pad = np.zeros((global_batch - len(chunk), *chunk.shape[1:]), np.uint8)
            out.append(np.asarray(fn(params, np.concatenate([chunk, pad])))[: len(chunk)])
        return np.concatenate(out)

    return encode


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `path`.tmp then rename: a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    """Write a text file."""
    path.write_text(text)


def _write_json(path: Path, obj: dict) -> None:
    """Write a JSON file."""
    path.write_text(json.dumps(obj))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly `path` (np.save(str) would append .npy to a .tmp name)."""
    with open(path, "wb") as f:
        np.save(f, array)


def _png(img: np.ndarray) -> bytes:
    """Uncompressed PNG bytes (as NVlabs' tool: compress_level 0)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(
        buf, format="png", compress_level=0, optimize=False
    )
    return buf.getvalue()


def _zip_entry(z: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored entry with a fixed timestamp."""
    z.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), data, zipfile.ZIP_STORED)


def _read_shard(raw: RawImages, indices, transform, a: ToolArgs, shape):
    """(kept indices, uint8 images, skipped names, shape) of one shard's records."""
    kept, images, skipped = [], [], []
    for i in indices:
        try:
            img = transform(raw.read(i))
        except ValueError as e:
            if not a.skip_bad:
                raise ValueError(f"{e} (pass --skip-bad to skip undecodable images)") from e
            skipped.append(raw.names[i])
            continue
        shape = shape or img.shape
        if img.shape != shape or shape[0] != shape[1]:
            raise ValueError(
                f"{raw.names[i]}: image is {img.shape[1]}x{img.shape[0]} after the transform, "
                f"others are {shape[1]}x{shape[0]} (square, equal sizes needed): set "
                f"--resolution and --transform (valid: {sorted(TRANSFORMS)})"
            )
        kept.append(i)
        images.append(img)
    return kept, images, skipped, shape


def _do_shard(work: Path, s: int, kept, images, encode) -> None:
    """Write shard s's data (PNGs in a zip, or raw latents .npy) atomically."""
    idx = np.asarray(kept, np.int64)
    _write_atomic(work / f"index-{s:05d}.npy", lambda p: _save_npy(p, idx))
    if encode is None:

        def write(p: Path) -> None:
            with zipfile.ZipFile(p, "w") as z:
                for i, img in zip(kept, images, strict=True):
                    _zip_entry(z, f"{i:08d}.png", _png(img))

        _write_atomic(work / f"shard-{s:05d}.zip", write)
    else:
        lat = encode(np.stack(images)) if images else np.zeros((0, 1, 1, 1), np.float32)
        _write_atomic(work / f"latents-{s:05d}.npy", lambda p: _save_npy(p, lat))


def _open_work(a: ToolArgs) -> Path:
    """DEST.partial/ with job.json; a rerun must have the same job (else a clear error)."""
    work = Path(a.dest + ".partial")
    job = json.dumps(a.job(), sort_keys=True)
    if work.exists():
        old = (work / "job.json").read_text() if (work / "job.json").exists() else "{}"
        if old != job:
            diff = {k: v for k, v in json.loads(old).items() if a.job().get(k) != v}
            raise ValueError(
                f"{work} holds an interrupted run with other arguments {diff}; rerun with "
                "those or remove the folder"
            )
    else:
        work.mkdir(parents=True)
        _write_atomic(work / "job.json", lambda p: _write_text(p, job))
    return work


def _finish_zip(a: ToolArgs, work: Path, raw: RawImages, done: list[dict]) -> int:
    """Assemble the shards into DEST (NVlabs names, dataset.json), via a temporary name."""
    labels: list = []
    j = 0
    tmp = work / "output.zip"
    with zipfile.ZipFile(tmp, "w") as out:
        for s in range(len(done)):
            with zipfile.ZipFile(work / f"shard-{s:05d}.zip") as z:
                for name in sorted(z.namelist()):
                    i, fname = int(name[:8]), f"{j:08d}"[:5] + f"/img{j:08d}.png"
                    _zip_entry(out, fname, z.read(name))
                    label = None if raw.labels is None else raw.labels[i]
                    labels.append([fname, label] if label is not None and label >= 0 else None)
                    j += 1
        meta = {"labels": labels if labels and all(x is not None for x in labels) else None}
        _zip_entry(out, "dataset.json", json.dumps(meta).encode())
    os.replace(tmp, a.dest)
    shutil.rmtree(work)
    return j


def _finish_latents(a: ToolArgs, work: Path, raw: RawImages, done: list[dict], codec) -> int:
    """Write labels.npy and manifest.json, then rename DEST.partial to DEST."""
    shards = [{"file": f"latents-{s:05d}.npy", "count": d["count"]} for s, d in enumerate(done)]
    index = np.concatenate([np.load(work / f"index-{s:05d}.npy") for s in range(len(done))])
    labels = np.full(len(index), -1, np.int64)
    if raw.labels is not None:
        labels = np.asarray([raw.labels[i] for i in index], np.int64)
    _write_atomic(work / "labels.npy", lambda p: _save_npy(p, labels))
    shape = next((d["shape"] for d in done if d["shape"]), None)
    lat = np.load(work / shards[0]["file"], mmap_mode="r").shape[1:] if shards else None
    manifest = {
        "format": "edm_jax-latents", "version": 1, "count": int(len(index)),
        "latent_shape": list(lat) if lat else None, "pixel_shape": shape,
        "has_labels": bool(raw.labels is not None and (labels >= 0).all()),
        "num_classes": int(labels.max()) + 1 if (labels >= 0).all() and len(labels) else 0,
        "encoder": {"name": a.encoder, "weights": a.encoder_weights,
                    "scale": codec.scale.tolist(), "bias": codec.bias.tolist()},
        "source": a.source, "transform": a.transform, "shards": shards,
    }  # fmt: skip
    _write_atomic(work / "manifest.json", lambda p: _write_text(p, json.dumps(manifest, indent=1)))
    os.replace(work, a.dest)
    for p in Path(a.dest).glob("*.done"):
        p.unlink()
    return int(len(index))


def run_tool(a: ToolArgs, on_shard: Callable[[int], None] | None = None) -> dict:
    """Convert or encode a dataset (resumable); returns the summary. on_shard(s) after each."""
    _check_args(a)
    codec = load_encoder(a.encoder, a.encoder_weights or "") if a.encoder else None
    raw = open_raw(a.source, a.channels)
    n = len(raw) if a.max_images is None else min(len(raw), a.max_images)
    work = _open_work(a)
    transform = get_transform(a.transform, a.resolution)
    encode = _sharded_encoder(codec, a.batch_per_device) if codec else None
    num_shards = -(-n // a.shard_size)
    done: list[dict] = []
    resumed, start = 0, time.time()
    from tqdm import tqdm

    bar = tqdm(total=n, unit="img", disable=a.quiet, file=sys.stderr)
    for s in range(num_shards):
        marker = work / f"shard-{s:05d}.done"
        lo, hi = s * a.shard_size, min(n, (s + 1) * a.shard_size)
        if marker.exists():
            done.append(json.loads(marker.read_text()))
            resumed += 1
        else:
            shape = next((tuple(d["shape"]) for d in done if d["shape"]), None)
            kept, images, skipped, shape = _read_shard(raw, range(lo, hi), transform, a, shape)
            _do_shard(work, s, kept, images, encode)
            rec = {"count": len(kept), "skipped": skipped, "shape": list(shape) if shape else None}
            _write_atomic(marker, functools.partial(_write_json, obj=rec))
            done.append(rec)
        bar.update(hi - lo)
        if on_shard is not None:
            on_shard(s)
    bar.close()
    if codec is None:
        count = _finish_zip(a, work, raw, done)
    else:
        count = _finish_latents(a, work, raw, done, codec)
    seconds = time.time() - start
    return {
        "dest": a.dest, "images": count, "skipped": [x for d in done for x in d["skipped"]],
        "shards": num_shards, "resumed_shards": resumed, "seconds": round(seconds, 3),
        "images_per_s": round(count / max(seconds, 1e-9), 2),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: parse flags, run the tool, print the summary as JSON."""
    p = argparse.ArgumentParser(
        prog="python -m edm_jax.data.tool", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--source", required=True, help="folder, .zip, .npz, digits or tfds:NAME[/SPLIT]"
    )
    p.add_argument("--dest", required=True, help="out.zip (images) or a folder (with --encoder)")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--encoder", help="VAE preset (sd-vae-ft-mse) or a diffusers config.json")
    p.add_argument("--encoder-weights", help=".npz from `python -m edm_jax.nets.vae convert`")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) undecodable images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ToolArgs(**{k: v for k, v in vars(p.parse_args(argv)).items()})
    try:
        summary = run_tool(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        p.exit(2, f"error: {e}\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
