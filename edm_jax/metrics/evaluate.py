"""Score images: a dataset into reference statistics, or generated images on the fly.

``Scorer`` streams uint8 NHWC batches through the detectors (jit, split over the local
devices) into float64 accumulators; ``score_source`` feeds it a dataset and
``generate_and_score`` feeds it ``edm_jax.sample`` output seed block by seed block, so no
image set is ever held whole. Over several hosts each host takes a contiguous block of
seeds and the sums are added across hosts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from edm_jax import api, sharding
from edm_jax.metrics import refs
from edm_jax.metrics.stats import FeatureStats, InceptionScore, frechet_distance, kid

__all__ = [
    "METRICS", "Scorer", "check_images", "check_metrics", "generate_and_score",
    "load_detectors", "nvidia_seed_ranges", "score_arrays", "score_source",
]  # fmt: skip

# metric -> the detector whose output it reads
METRICS = {
    "fid": "inception", "kid": "inception", "is": "inception", "fd_dinov2": "dinov2", "fd_clip": "clip",
}  # fmt: skip


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """The metric names as a tuple; ValueError naming an unknown one and the valid ones."""
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(f"no metrics given; valid: {sorted(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; valid: {sorted(METRICS)}")
    return metrics


def needed_detectors(metrics: Iterable[str]) -> list[str]:
    """The detector names the metrics read, in a fixed order."""
    names = {METRICS[m] for m in check_metrics(metrics)}
    return [d for d in ("inception", "dinov2", "clip") if d in names]


def check_weights(metrics: Iterable[str], weights: Mapping[str, Any]) -> None:
    """FileNotFoundError naming a missing weight file, where to download it and how to convert.

    An empty entry means the detector's default file ($EDM_JAX_WEIGHTS or ~/.cache/edm_jax).
    """
    from edm_jax.metrics import detectors

    for name in needed_detectors(metrics):
        path = weights.get(name) or None
        found = detectors.default_weights(name) if path is None else Path(os.fspath(path))
        if found is None or not found.is_file():
            spec = detectors.DETECTORS[name]
            where = f"{name} weights not found: {path}" if path else f"no {name} weights given"
            how = (
                "(read as data, without torch)"
                if name == "clip"
                else "and convert it with "
                f"`python -m edm_jax.metrics.convert_weights {name} {spec.filename} {spec.npz_name}`"
            )
            raise FileNotFoundError(
                f"{where}; download {spec.filename} from {spec.url} {how} "
                "(or put it in $EDM_JAX_WEIGHTS or ~/.cache/edm_jax)"
            )


def load_detectors(metrics, weights: Mapping[str, Any], dtype: str = "float32") -> dict:
    """{detector name: Detector} for the metrics, from the weight files in ``weights``."""
    check_weights(metrics, weights)
    from edm_jax.metrics import detectors

    return {
        n: detectors.load_detector(n, weights.get(n) or None, dtype=dtype)
        for n in needed_detectors(metrics)
    }


def check_images(images, where: str = "images") -> np.ndarray:
    """uint8 [N, H, W, C] (C 1 or 3; [N, H, W] taken as grayscale), else one-line ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{where} must be uint8 pixels 0..255, got dtype {images.dtype}; "
            "convert [-1, 1] floats with edm_jax.api.to_uint8"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise ValueError(
            f"{where} must be [N, H, W, C] with C in (1, 3) (NHWC), got shape {images.shape}"
        )
    return images


class Scorer:
    """Accumulators of the requested metrics, fed uint8 image batches in seed/index order."""

    def __init__(self, metrics, detectors: Mapping, num_images: int, batch_size: int = 64):
        self.metrics = check_metrics(metrics)
        if num_images < 2:
            raise ValueError(f"need at least 2 images for the statistics, got {num_images}")
        missing = [d for d in needed_detectors(self.metrics) if d not in detectors]
        if missing:
            raise ValueError(f"metrics {self.metrics} need detectors {missing}")
        self.detectors, self.num_images, self.batch_size = detectors, num_images, batch_size
        dim = {n: int(d.feature_dim) for n, d in detectors.items()}
        self.stats = {
            m: FeatureStats(dim[METRICS[m]]) for m in self.metrics if m in refs.FRECHET_METRICS
        }
        self.kid_features: list[np.ndarray] | None = [] if "kid" in self.metrics else None
        self.inception_score = InceptionScore(num_images) if "is" in self.metrics else None
        self._mesh = sharding.batch_mesh(batch_size)
        self._params: dict[str, Any] = {}

    def feature_dim(self, metric: str) -> int:
        """Size of the features the metric reads."""
        return int(self.detectors[METRICS[metric]].feature_dim)

    def _run(self, key: str, fn, params, images: np.ndarray) -> np.ndarray:
        """fn(params, images padded to the batch size) split over the devices; real rows only."""
        if key not in self._params:
            self._params[key] = sharding.place(params, self._mesh, sharding.REPLICATED)
        n, bs = len(images), self.batch_size
        padded = np.concatenate([images, np.repeat(images[-1:], bs - n, axis=0)])
        padded = sharding.place(padded, self._mesh, sharding.BATCH)
        return np.asarray(jax.device_get(fn(self._params[key], padded)))[:n]

    def add(self, images, start: int) -> None:
        """Add images [B <= batch_size, H, W, C] uint8 whose first has global index start."""
        images = check_images(images)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # grayscale -> RGB (as NVIDIA's detectors)
        for i in range(0, len(images), self.batch_size):
            self._add_batch(images[i : i + self.batch_size], start + i)

    def _add_batch(self, images: np.ndarray, start: int) -> None:
        """One padded batch through each detector into the accumulators."""
        feats = {
            n: self._run(n, d.apply_features, d.params, images) for n, d in self.detectors.items()
        }
        for metric, acc in self.stats.items():
            acc.update(feats[METRICS[metric]])
        if self.kid_features is not None:
            self.kid_features.append(feats["inception"].astype(np.float32))
        if self.inception_score is not None:
            det = self.detectors["inception"]
            logits = self._run("inception", det.apply_logits, det.params, images)
            self.inception_score.update(logits, start)

    def gather_hosts(self) -> None:
        """Sum the accumulators over all hosts (no-op on one host)."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils as mh

        def total(x):
            return np.asarray(mh.process_allgather(np.asarray(x))).sum(0)

        for acc in self.stats.values():
            acc.n, acc.sum, acc.sum_xxt = int(total(acc.n)), total(acc.sum), total(acc.sum_xxt)
        if self.inception_score is not None:
            self.inception_score.plogp = total(self.inception_score.plogp)
            self.inception_score.sum_p = total(self.inception_score.sum_p)
        if self.kid_features is not None:
            self.kid_features = [_allgather_rows(np.concatenate(self.kid_features))]

    def reference(self) -> dict:
        """The statistics as a reference dict ({metric: {'mu', 'sigma'}}, KID features)."""
        ref = {}
        for metric, acc in self.stats.items():
            mu, sigma = acc.mu_sigma()
            ref[metric] = {"mu": mu, "sigma": sigma}
        if self.kid_features is not None:
            ref["kid"] = {"features": np.concatenate(self.kid_features)}
        return ref

    def results(self, ref: Mapping) -> dict[str, float]:
        """{metric: value} against the reference (IS needs none; adds 'is_std')."""
        out, mine = {}, self.reference()
        for metric in self.metrics:
            if metric in refs.FRECHET_METRICS:
                r = ref[metric]
                out[metric] = frechet_distance(
                    mine[metric]["mu"], mine[metric]["sigma"], r["mu"], r["sigma"]
                )
            elif metric == "kid":
                out[metric] = kid(mine["kid"]["features"], ref["kid"]["features"])
            elif self.inception_score is not None:
                out["is"], out["is_std"] = self.inception_score.score()
        return out


def _allgather_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x [n_p, D] from every host, concatenated in host order."""
    from jax.experimental import multihost_utils as mh

    sizes = np.asarray(mh.process_allgather(np.asarray(len(x))))
    padded = np.zeros([int(sizes.max()), *x.shape[1:]], x.dtype)
    padded[: len(x)] = x
    rows = np.asarray(mh.process_allgather(padded))
    return np.concatenate([rows[p, : sizes[p]] for p in range(len(sizes))])


def check_reference(ref: dict, scorer_metrics, dims: Mapping[str, int], path) -> None:
    """ValueError unless ref holds every metric's statistics at the detector's size."""
    for metric in scorer_metrics:
        if metric != "is":
            refs.check_ref(ref, metric, dims[METRICS[metric]], path)


def _progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm around iterable when enabled."""
    if not enabled:
        return iterable
    import tqdm

    return tqdm.tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def score_source(source, scorer: Scorer, *, progress: bool = False) -> Scorer:
    """Feed every image of an edm_jax data source (``get_batch``) to the scorer."""
    return _score(
        lambda lo, hi: source.get_batch(np.arange(lo, hi))[0], len(source), scorer, progress
    )


def score_arrays(images, scorer: Scorer, *, progress: bool = False) -> Scorer:
    """Feed uint8 [N, H, W, C] images (anything sliceable: an array, a lazy folder) to the scorer."""
    return _score(lambda lo, hi: images[lo:hi], len(images), scorer, progress)


def _score(get, n: int, scorer: Scorer, progress: bool) -> Scorer:
    """scorer.add(get(lo, hi), lo) over this host's block of the n images, then sum over hosts."""
    lo, hi = _host_block(n)
    starts = range(lo, hi, scorer.batch_size)
    for start in _progress(starts, len(starts), "scoring", progress):
        scorer.add(get(start, min(start + scorer.batch_size, hi)), start)
    scorer.gather_hosts()
    return scorer


def _host_block(n: int) -> tuple[int, int]:
    """[lo, hi) of the seeds this host generates: a contiguous block."""
    p, k = jax.process_index(), jax.process_count()
    return p * n // k, (p + 1) * n // k


def generate_and_score(
    rng,
    params,
    model,
    scorer: Scorer,
    *,
    seeds: Sequence[int],
    labels=None,
    progress: bool = False,
    **sample_kwargs,
) -> Scorer:
    """Sample one image per seed with ``edm_jax.sample`` and feed them to the scorer.

    ``sample_kwargs`` go to ``api.sample`` (sampler, num_steps, sigma_min, sigma_max, rho,
    cfg_scale, sampler options); the images per seed are those of ``sample.py``.
    """
    seed_array = np.asarray(list(seeds), np.int64)
    bs = scorer.batch_size
    api.check_sample_args(
        sample_kwargs.get("sampler", "heun"), sample_kwargs.get("num_steps", 18), bs,
        **{k: v for k, v in sample_kwargs.items() if k not in _SAMPLE_ARGS},
    )  # fmt: skip
    classes = api.class_labels(
        rng, model, seed_array.tolist(), labels
    )  # validates labels before sampling
    lo, hi = _host_block(len(seed_array))
    starts = range(lo, hi, bs)
    for start in _progress(starts, len(starts), "generating", progress):
        end = min(start + bs, hi)
        images = api.sample(
            rng, params, model, seeds=seed_array[start:end].tolist(), batch_size=bs,
            labels=None if classes is None else classes[start:end], **sample_kwargs,
        )  # fmt: skip
        scorer.add(api.to_uint8(images), start)
    scorer.gather_hosts()
    return scorer


_SAMPLE_ARGS = ("sampler", "num_steps", "sigma_min", "sigma_max", "rho", "cfg_scale")


def nvidia_seed_ranges(num: int = 50000, repeats: int = 3) -> list[range]:
    """NVIDIA's protocol: seeds 0..num-1, num..2num-1, ... (the reported FID is the minimum)."""
    return [range(i * num, (i + 1) * num) for i in range(repeats)]


def seeds_text(seeds: Sequence[int]) -> str:
    """Compact seed list: '0-49999' or '0-9,20'."""
    seeds = [int(s) for s in seeds]
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)
