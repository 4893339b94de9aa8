"""edm_jax.sample on an exact class-conditional mixture model: seeds, batches, labels, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testlib import SampleableStandIn

from edm_jax import analytic, api

MEANS = np.array([[0.5] * 4, [-0.5] * 4])  # two classes of 2x2x1 images
STD = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureModel(SampleableStandIn):
    """Stands in for a DiffusionModel: denoise(params, x, sigma, labels=one_hot)."""

    label_dim: int = 2
    image_shape: tuple = (2, 2, 1)

    def denoise(self, params, x, sigma, labels=None):
        uncond = analytic.mixture_denoiser(params, jnp.array([0.5, 0.5]), STD)(x, sigma)
        if labels is None or self.label_dim == 0:
            return uncond
        per_class = [analytic.gaussian_denoiser(m.reshape(2, 2, 1), STD)(x, sigma) for m in params]
        cond = sum(labels[:, k, None, None, None] * per_class[k] for k in range(2))
        return jnp.where(labels.sum(-1)[:, None, None, None] == 0, uncond, cond)


MODEL, PARAMS, RNG = MixtureModel(), jnp.asarray(MEANS, jnp.float32), jax.random.key(0)
OPTS = dict(sampler="euler_ancestral", num_steps=8)


def test_seed_image_independent_of_batch():
    """A stochastic sampler: each seed's noise is its own, whatever the batch and its sharding."""
    full = api.sample(RNG, PARAMS, MODEL, seeds=range(16), batch_size=16, **OPTS)  # 8 devices
    assert full.shape == (16, 2, 2, 1) and full.dtype == np.float32
    for bs in (1, 5):
        np.testing.assert_allclose(
            api.sample(RNG, PARAMS, MODEL, seeds=range(16), batch_size=bs, **OPTS), full, atol=1e-5
        )
    some = api.sample(RNG, PARAMS, MODEL, seeds=[11, 3], **OPTS)
    np.testing.assert_allclose(some, full[[11, 3]], atol=1e-5)
    other = api.sample(jax.random.key(1), PARAMS, MODEL, seeds=[11, 3], **OPTS)
    assert np.abs(other - some).max() > 1e-3


def test_labels_reach_the_model_and_random_labels_are_per_seed():
    given = [0, 1, 1, 0, 1, 0, 0, 1]
    x = api.sample(RNG, PARAMS, MODEL, num_samples=8, labels=given, sampler="heun", num_steps=6)
    np.testing.assert_allclose(x.reshape(8, 4).mean(1), 0.5 - np.array(given), atol=0.1)
    drawn = api.class_labels(RNG, MODEL, range(8))
    assert set(drawn) == {0, 1}
    np.testing.assert_array_equal(api.class_labels(RNG, MODEL, [5, 2]), drawn[[5, 2]])
    rand = api.sample(RNG, PARAMS, MODEL, seeds=range(8), sampler="heun", num_steps=6)
    np.testing.assert_allclose(
        rand.reshape(8, 4).mean(1), np.where(drawn == 0, 0.5, -0.5), atol=0.1
    )


def test_cfg_scale_zero_samples_the_unconditional_model():
    """Same seeds, same initial noise: cfg_scale 0 == the label-free model; 2 differs from 1."""
    kw = dict(seeds=range(4), sampler="heun", num_steps=6)
    x0 = api.sample(RNG, PARAMS, MODEL, labels=0, cfg_scale=0.0, **kw)
    uncond = api.sample(RNG, PARAMS, MixtureModel(label_dim=0), **kw)
    np.testing.assert_allclose(x0, uncond, atol=1e-5)
    x1 = api.sample(RNG, PARAMS, MODEL, labels=0, **kw)
    x2 = api.sample(RNG, PARAMS, MODEL, labels=0, cfg_scale=2.0, **kw)
    assert np.abs(x2 - x1).max() > 1e-3 and np.abs(x1 - x0).max() > 1e-2


@pytest.mark.parametrize(
    "sampler,options",
    [("dpm_fast", {}), ("dpm_adaptive", dict(rtol=1e-3, atol=1e-3)), ("dpmpp_2m", {})],
)
def test_other_sampler_signatures(sampler, options):
    x = api.sample(
        RNG, PARAMS, MODEL, num_samples=2, labels=1, sampler=sampler, num_steps=10, **options
    )
    np.testing.assert_allclose(x, -0.5, atol=0.2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="nope"), "unknown sampler 'nope'; valid: .*heun"),
        (dict(labels=2), "class 2 out of range; valid: 0..1"),
        (dict(labels=[0, -1]), "class -1 out of range"),
        (dict(labels=[0, 1, 1]), "3 labels for 2 seeds"),
        (dict(sampler="heun", bogus=1.0), r"sampler 'heun' has no options \['bogus'\]"),
        (dict(num_steps=0), "number of steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(seeds=[1, 2]), "exactly one of num_samples or seeds"),
        (dict(num_samples=None, seeds=[-1]), "seeds must be"),
        (dict(return_trajectory=True), "sets \\['return_trajectory'\\] itself"),
        (dict(sigma_max=float("inf")), "sigma_max must be a finite number"),
        (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min=1.0 must be below sigma_max=0.5"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
        (dict(rho=0.0), "rho must be > 0"),
        (dict(num_samples=None, seeds=[2**32]), "seed 4294967296 is out of range"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        api.sample(RNG, PARAMS, MODEL, **({"num_samples": 2} | kwargs))


def test_unconditional_model_rejects_labels():
    uncond = MixtureModel(label_dim=0)
    with pytest.raises(ValueError, match="unconditional"):
        api.sample(RNG, PARAMS, uncond, num_samples=2, labels=0)
    assert api.class_labels(RNG, uncond, [0, 1]) is None


def test_uint8_and_grid():
    px = api.to_uint8(np.array([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(5, 1, 1, 1))
    np.testing.assert_array_equal(px.ravel(), [0, 64, 128, 255, 255])
    grid = api.image_grid(np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1))
    assert grid.shape == (4, 9, 1)
    np.testing.assert_array_equal(grid[2:4, 3:6, 0], np.arange(24, 30).reshape(2, 3))
    assert np.all(grid[2:4, 6:9] == 0)


# --------------------------------------------------------------------------- sample.py


def _run_cli(*argv):
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("sample").main([str(a) for a in argv])


def _outputs(outdir):
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir())}


def test_load_training_run(tiny_run):
    model, params, config = api.load(tiny_run)
    assert model.label_dim == 10 and model.img_resolution == 8 and config.data.name == "digits"
    same = api.load(tiny_run / "checkpoints" / "2")[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_relative_workdir_path(tiny_run, monkeypatch):
    """A workdir given relative to the working directory (as the README's commands do)."""
    want = jax.tree.leaves(api.load(tiny_run)[1])
    monkeypatch.chdir(tiny_run.parent)
    for rel in (tiny_run.name, f"{tiny_run.name}/checkpoints/2"):
        got = jax.tree.leaves(api.load(rel)[1])
        assert len(got) == len(want), rel
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=rel)


def test_cli_training_run_same_png_bytes_in_batch_1_and_16(tmp_path, tiny_run):
    """sample.py on the run's checkpoint: the promised files, identical whatever --batch."""
    common = ["--workdir", tiny_run, "--seeds", "0-15", "--steps", "3", "--sampler", "euler"]
    _run_cli(*common, "--batch", "16", "--outdir", tmp_path / "b16", "--no-progress")
    _run_cli(*common, "--batch", "1", "--outdir", tmp_path / "b1", "--no-progress")
    b16, b1 = _outputs(tmp_path / "b16"), _outputs(tmp_path / "b1")
    assert sorted(b16) == [f"{s:06d}.png" for s in range(16)] + ["grid.png", "samples.npz"]
    assert b16 == b1  # byte for byte
    with np.load(tmp_path / "b16" / "samples.npz") as f:
        assert f["images"].shape == (16, 8, 8, 1) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["seeds"], np.arange(16))
        assert f["labels"].shape == (16,) and f["labels"].max() < 10
    from PIL import Image

    # 4x4 tiles of 8x8, each upscaled to 32x32 as the training grids (issue 23)
    assert Image.open(tmp_path / "b16" / "grid.png").size == (128, 128)
    assert not list((tmp_path / "b16").glob(".*tmp"))  # no temp files left behind


def test_cli_reference_npz(tmp_path, fixtures_dir):
    """Convert-and-sample an NVlabs/edm state_dict (.npz) with a class and guidance."""
    npz = fixtures_dir / "net_ddpmpp_vp.npz"  # 16x16x1, 10 classes, VP preconditioning
    _run_cli("--reference-npz", npz, "--seeds", "3,5", "--steps", "2", "--sampler", "euler",
             "--class", "7", "--cfg-scale", "2", "--outdir", tmp_path, "--no-progress")  # fmt: skip
    assert sorted(_outputs(tmp_path)) == ["000003.png", "000005.png", "grid.png", "samples.npz"]
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape == (2, 16, 16, 1)
        np.testing.assert_array_equal(f["labels"], [7, 7])


def test_cli_list_samplers(capsys):
    assert _run_cli("--list-samplers") == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line[:1].isalpha() and "," not in line.split()[0]]
    assert "heun" in names and "dpmpp_2m" in names and names == sorted(names)


def _cli_error(capsys, *argv) -> str:
    """sample.py's one-line error for argv (exit status 2)."""
    assert _run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_bad_input(tmp_path, fixtures_dir, capsys):
    npz = fixtures_dir / "net_ddpmpp_vp.npz"
    assert "unknown sampler 'bogus'" in _cli_error(
        capsys, "--reference-npz", npz, "--sampler", "bogus", "--outdir", tmp_path
    )
    assert "class 10 out of range; valid: 0..9" in _cli_error(
        capsys, "--reference-npz", npz, "--class", "10", "--outdir", tmp_path
    )
    assert "nowhere" in _cli_error(capsys, "--checkpoint", tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a checkpoint")
    assert "no checkpoint" in _cli_error(capsys, "--workdir", tmp_path / "junk")
    for flag, value, match in [
        ("--sigma-max", "inf", "sigma_max must be a finite number"),
        ("--sigma-min", "90", "sigma_min=90.0 must be below sigma_max=80.0"),
        ("--cfg-scale", "nan", "--cfg-scale must be a finite number"),
    ]:
        assert match in _cli_error(capsys, "--reference-npz", npz, flag, value)
    with pytest.raises(ValueError, match="unknown sampler"):  # --debug: the traceback
        _run_cli("--reference-npz", npz, "--sampler", "bogus", "--debug")
    for seeds in ("5-2", str(2**32)):
        with pytest.raises(SystemExit):
            _run_cli("--reference-npz", npz, "--seeds", seeds)
    assert not list(tmp_path.glob("*.png"))
