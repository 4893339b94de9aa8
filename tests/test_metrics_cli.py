"""python -m edm_jax.metrics (ref, gen, calc), the Scorer over devices, and eval during training.

The detectors here are tiny random pixel projections in the real ``Detector`` class, so the
tests exercise the statistics, sharding and file handling, not the networks (those are
tests/test_metrics_nets.py's).
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testlib import SampleableStandIn

from edm_jax import analytic, api
from edm_jax.metrics import __main__ as cli
from edm_jax.metrics import detectors, evaluate, refs
from edm_jax.train import evaluate as train_evaluate
from edm_jax.train.config_io import default_config

DIM = 16


def _pixels(images):
    """uint8 [B,H,W,3] -> [B, 8*8*3] floats in [-1, 1] (nearest resize to 8x8)."""
    x = images.astype(jnp.float32) / 127.5 - 1
    h, w = x.shape[1:3]
    x = x[:, (jnp.arange(8) * h) // 8][:, :, (jnp.arange(8) * w) // 8]
    return x.reshape(x.shape[0], -1)


def _fake_detector(name: str) -> detectors.Detector:
    """A random projection of the pixels: DIM features and 10 logits."""
    w = jax.random.normal(jax.random.key(len(name)), (2, 192, DIM)) / 8
    w_logits = jax.random.normal(jax.random.key(7), (192, 10))
    feats = jax.jit(lambda p, x: jnp.tanh(_pixels(x) @ p[0][0]) + _pixels(x) @ p[0][1])
    logits = jax.jit(lambda p, x: _pixels(x) @ p[1])
    return detectors.Detector(name, DIM, (w, w_logits), feats, logits)


FAKES = {n: _fake_detector(n) for n in ("inception", "dinov2")}


@pytest.fixture
def fake_weights(tmp_path, monkeypatch):
    """Weight files that exist; load_detector returns the fake detectors."""
    monkeypatch.setattr(detectors, "load_detector", lambda name, path, dtype=None: FAKES[name])
    paths = {}
    for name in FAKES:
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], x=np.zeros(1))
    return [
        "--inception-weights",
        str(paths["inception"]),
        "--dinov2-weights",
        str(paths["dinov2"]),
    ]


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureModel(SampleableStandIn):
    """An exact denoiser of a 2-component Gaussian mixture of 8x8 RGB images (unconditional)."""

    label_dim: int = 0
    image_shape: tuple = (8, 8, 3)

    def denoise(self, params, x, sigma, labels=None):
        return analytic.mixture_denoiser(params.reshape(2, -1), jnp.array([0.5, 0.5]), 0.3)(
            x, sigma
        )


MODEL = MixtureModel()
PARAMS = jnp.stack([jnp.full([8, 8, 3], 0.4), jnp.linspace(-0.8, 0.8, 192).reshape(8, 8, 3)])
SAMPLE = dict(sampler="euler_ancestral", num_steps=4)


def _gen(batch: int, metrics=("fid", "kid")) -> evaluate.Scorer:
    scorer = evaluate.Scorer(metrics, FAKES, 24, batch)
    return evaluate.generate_and_score(
        jax.random.key(0), PARAMS, MODEL, scorer, seeds=range(24), **SAMPLE
    )


@pytest.fixture(scope="module")
def gen_scorers():
    """The same 24 seeds scored with batch 8 (split over 8 devices) and 4 (one device)."""
    return _gen(8), _gen(4)


def test_metrics_batches_after_the_first_compile_nothing(compile_counter):
    """Generate-and-score again, with a partial last batch (20 = 8 + 8 + 4): no compilation."""
    fresh = {n: _fake_detector(n) for n in FAKES}  # new jitted functions: the first run compiles
    metrics = ("fid", "kid", "is")
    first = evaluate.Scorer(metrics, fresh, 24, 8)
    evaluate.generate_and_score(jax.random.key(0), PARAMS, MODEL, first, seeds=range(24), **SAMPLE)
    before = compile_counter()
    assert before > 0  # the counter sees the first run's compilations
    scorer = evaluate.Scorer(metrics, fresh, 23, 8)
    evaluate.generate_and_score(jax.random.key(1), PARAMS, MODEL, scorer, seeds=range(20), **SAMPLE)
    scorer.add(np.zeros((3, 8, 8, 3), np.uint8), 20)  # images straight in, another partial batch
    assert compile_counter() - before == 0


def test_gen_over_8_devices_equals_1_device(gen_scorers):
    assert jax.local_device_count() == 8
    eight, one = gen_scorers
    assert eight._mesh is not None and eight._mesh.size == 8 and one._mesh is None
    r8, r1 = eight.reference(), one.reference()
    for key in ("mu", "sigma"):
        np.testing.assert_allclose(r8["fid"][key], r1["fid"][key], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r8["kid"]["features"], r1["kid"]["features"], atol=1e-6)
    ref = {**r1, "kid": {"features": r1["kid"]["features"][::-1].copy()}}
    res8, res1 = eight.results(ref), one.results(ref)
    assert res8.keys() == {"fid", "kid"}
    np.testing.assert_allclose([res8[k] for k in res1], list(res1.values()), rtol=1e-5, atol=1e-9)


def test_gen_scores_the_images_of_sample(gen_scorers):
    """The statistics are those of api.sample's images for the same seeds (NumPy, one shot)."""
    ref = gen_scorers[0].reference()
    images = api.sample(jax.random.key(0), PARAMS, MODEL, seeds=range(24), batch_size=8, **SAMPLE)
    feats = np.asarray(FAKES["inception"].features(api.to_uint8(images)), np.float64)
    np.testing.assert_allclose(ref["kid"]["features"], feats, rtol=0, atol=1e-6)  # float32
    np.testing.assert_allclose(ref["fid"]["mu"], feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(ref["fid"]["sigma"], np.cov(feats, rowvar=False), atol=1e-6)


@pytest.fixture
def image_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, [21, 12, 12, 3], dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    return tmp_path / "images.npz", images


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_ref_writes_statistics_that_read_back_bit_for_bit(
    tmp_path, fake_weights, image_npz, suffix
):
    path, images = image_npz
    dest = tmp_path / f"ref{suffix}"
    metrics = "fid,kid" if suffix == ".npz" else "fid,fd_dinov2"
    ref = cli.main(["ref", "--data", "npz", "--path", str(path), "--resolution", "12",
                    "--dest", str(dest), "--metrics", metrics, "--batch", "8", "--no-progress",
                    *fake_weights])  # fmt: skip
    back = refs.load_ref(dest)
    assert sorted(back) == sorted(ref) == sorted(metrics.split(","))
    for metric in ref:
        for key in ref[metric]:
            np.testing.assert_array_equal(back[metric][key], ref[metric][key])
    feats = np.asarray(FAKES["inception"].features(images), np.float64)
    np.testing.assert_allclose(back["fid"]["sigma"], np.cov(feats, rowvar=False), atol=1e-6)


def test_calc_against_own_reference_and_json_line(tmp_path, fake_weights, image_npz):
    path, _ = image_npz
    ref = tmp_path / "ref.npz"
    common = ["--no-progress", "--batch", "8", *fake_weights]
    cli.main(["ref", "--data", "npz", "--path", str(path), "--resolution", "12", "--dest", str(ref),
              "--metrics", "fid,kid", *common])  # fmt: skip
    out = tmp_path / "res.jsonl"
    rows = cli.main(["calc", "--images", str(path), "--ref", str(ref), "--metrics", "fid,kid",
                     "--results", str(out), *common])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == rows and [r["metric"] for r in rows] == ["fid", "kid"]
    assert abs(rows[0]["value"]) < 1e-6 and rows[0]["num_images"] == 21
    assert rows[1]["value"] < 0.05  # unbiased MMD^2 of a set with itself: ~0 up to noise
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(np.load(path)["images"]):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    again = cli.main(["calc", "--images", str(folder), "--ref", str(ref), "--metrics", "fid,kid",
                      "--results", str(out), *common])  # fmt: skip
    assert [r["value"] for r in again] == [r["value"] for r in rows]  # the same pixels


def test_gen_cli_reference_npz(tmp_path, fake_weights, fixtures_dir, monkeypatch):
    """gen on a converted NVlabs/edm DDPM++ net: the JSON line, no PNGs written."""
    ref = tmp_path / "ref.npz"
    refs.save_ref(ref, {"fid": {"mu": np.zeros(DIM), "sigma": np.eye(DIM)}})
    monkeypatch.chdir(tmp_path)
    rows = cli.main(["gen", "--reference-npz", str(fixtures_dir / "net_ddpmpp_vp.npz"),
                     "--ref", str(ref), "--seeds", "0-7", "--sampler", "euler", "--steps", "2",
                     "--class", "3", "--batch", "8", "--no-progress", *fake_weights])  # fmt: skip
    (row,) = rows
    assert row["metric"] == "fid" and row["num_images"] == 8 and row["seeds"] == "0-7"
    assert row["sampler"] == "euler" and row["steps"] == 2 and row["wall_time_s"] > 0
    assert np.isfinite(row["value"]) and row["value"] > 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dinov2.npz", "inception.npz", "metrics.jsonl", "ref.npz"
    ]  # fmt: skip


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_input_fails_before_generation(
    tmp_path, fake_weights, image_npz, fixtures_dir, monkeypatch
):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the input")

    monkeypatch.setattr(api, "sample", no_sampling)
    npz = str(fixtures_dir / "net_ddpmpp_vp.npz")
    good_ref = tmp_path / "ref.npz"
    refs.save_ref(good_ref, {"fid": {"mu": np.zeros(DIM), "sigma": np.eye(DIM)}})
    gen = ["gen", "--reference-npz", npz, "--no-progress", "--seeds", "0-3"]
    with pytest.raises(
        FileNotFoundError, match="inception weights not found: .*nowhere.npz; download pt_inception"
    ) as e:
        cli.main(
            [*gen, "--ref", str(good_ref), "--inception-weights", str(tmp_path / "nowhere.npz")]
        )
    _one_line(e)
    small = tmp_path / "small.npz"
    refs.save_ref(small, {"fid": {"mu": np.zeros(5), "sigma": np.eye(5)}})
    with pytest.raises(
        ValueError, match=r"size mu \(5,\), sigma \(5, 5\), but the detector gives 16"
    ) as e:
        cli.main([*gen, "--ref", str(small), *fake_weights])
    _one_line(e)
    with pytest.raises(ValueError, match="need at least 2 images, got 1") as e:
        cli.main(
            ["gen", "--reference-npz", npz, "--seeds", "3", "--ref", str(good_ref), *fake_weights]
        )
    _one_line(e)
    with pytest.raises(ValueError, match="no 'fd_dinov2' statistics; it has \\['fid'\\]"):
        cli.main([*gen, "--ref", str(good_ref), "--metrics", "fid,fd_dinov2", *fake_weights])
    with pytest.raises(ValueError, match="no 'kid'|no Inception features for KID"):
        cli.main([*gen, "--ref", str(good_ref), "--metrics", "kid", *fake_weights])


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros([4, 8, 8, 3], np.float32), "must be uint8 pixels 0..255, got dtype float32"),
        (
            np.zeros([4, 8, 8, 4], np.uint8),
            r"\[N, H, W, C\] with C in \(1, 3\).*got shape \(4, 8, 8, 4\)",
        ),
        (np.zeros([1, 8, 8, 3], np.uint8), "need at least 2 images, got 1"),
    ],
    ids=["float", "4_channels", "one_image"],
)
def test_calc_bad_images(tmp_path, fake_weights, images, match):
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(ValueError, match=match) as e:
        cli.main(["calc", "--images", str(tmp_path / "bad.npz"), "--metrics", "is", *fake_weights])
    _one_line(e)


def test_wrong_weights_name_the_first_bad_key(tmp_path):
    """Real loader (no fakes): a weights file of other keys is one clear line."""
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="does not match the network: missing key") as e:
        evaluate.load_detectors(["fid"], {"inception": tmp_path / "junk.npz"})
    _one_line(e)


# ---- during training ----


def _eval_config(tmp_path, **kw):
    config = default_config()
    config.train.batch_size = 4
    config.eval.update(
        {
            "every_kimg": 0.008,
            "num": 16,
            "batch_size": 8,
            "sampler": "euler_ancestral",
            "steps": 4,
            **kw,
        }
    )
    return config


def test_eval_config_errors_before_any_compile(tmp_path, fake_weights):
    train_evaluate.check_eval_config(default_config())  # off by default: nothing checked
    with pytest.raises(
        FileNotFoundError, match="no inception weights given; download pt_inception"
    ):
        train_evaluate.check_eval_config(_eval_config(tmp_path))
    weights = {"inception": fake_weights[1], "dinov2": fake_weights[3]}
    with pytest.raises(ValueError, match="config.eval.ref must name"):
        train_evaluate.check_eval_config(_eval_config(tmp_path, weights=weights))
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        train_evaluate.check_eval_config(
            _eval_config(tmp_path, weights=weights, ref=str(tmp_path / "r.npz"))
        )
    with pytest.raises(
        ValueError,
        match=r"unknown metric 'fdd'; valid: \['fd_clip', 'fd_dinov2', 'fid', 'is', 'kid'\]",
    ):
        train_evaluate.check_eval_config(_eval_config(tmp_path, metrics=("fdd",)))
    with pytest.raises(ValueError, match="config.eval.num must be an int >= 2"):
        train_evaluate.check_eval_config(_eval_config(tmp_path, num=1))


def test_training_evaluator_writes_stats_jsonl(tmp_path, fake_weights):
    ref = tmp_path / "ref.npz"
    refs.save_ref(ref, {"fid": {"mu": np.zeros(DIM), "sigma": np.eye(DIM)}})
    weights = {"inception": fake_weights[1], "dinov2": fake_weights[3]}
    config = _eval_config(tmp_path, weights=weights, ref=str(ref), metrics=("fid", "is"))
    train_evaluate.check_eval_config(config)
    # MODEL and SAMPLE's sampler: no new compile
    evaluator = train_evaluate.make_evaluator(config, MODEL, tmp_path, lambda: PARAMS)
    reporter = types.SimpleNamespace(tb=None)
    assert evaluator(reporter, 1, 0) is None  # 4 images: before the 8-image boundary
    row = evaluator(reporter, 2, 1)
    assert row["step"] == 2 and row["kimg"] == 0.008 and row["eval/fid"] > 0 and row["eval/is"] >= 1
    assert json.loads((tmp_path / "stats.jsonl").read_text()) == row
