"""Training from k-diffusion's JSON configs: the config translation (against the shipped configs
in ../shared/fixtures/kdiff_configs.json), the stratified sigma draw, the Trainer's EMA warmup
and lr schedule, and progressive growing of image_v1 runs (train.py --grow-from)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from train_testlib import ROOT, tree_equal, tree_max_diff

from edm_jax import losses, schedules
from edm_jax.nets import kdiff_config, kdiff_files, kdiff_models
from edm_jax.train import config_io, kdiff_recipe, kdiff_run, validate

TINY_HDIT = "kdiff_digits_transformer.json"


@pytest.fixture(scope="module")
def shipped(fixtures_dir):
    return json.loads((fixtures_dir / "kdiff_configs.json").read_text())["configs"]


def _write(tmp_path, values, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values, indent=4))
    return str(path)


def test_k_diffusion_config_file_is_a_training_config(shipped, tmp_path):
    ref = shipped["config_mnist_transformer.json"]
    c = config_io.load_config(_write(tmp_path, json.loads(ref["text"])))
    assert c.model.arch == "kdiffusion"
    assert json.loads(c.model.kdiff_config) == ref["loaded"]  # k-diffusion's filled defaults
    m = ref["loaded"]["model"]
    density, options = kdiff_recipe.sample_density(m)
    assert (c.loss.density, c.loss.weighting) == (density, "soft-min-snr") == (
        "cosine_interpolated", "soft-min-snr")  # fmt: skip
    assert c.loss.kwargs.to_dict() == {**options, "sigma_data": 0.6162, "stratified": True}
    spec = losses.from_config(c.loss.to_dict())
    assert spec.stratified and spec.density_kwargs["noise_d_high"] == 28
    assert (c.optim.schedule, c.optim.lr, c.optim.grad_clip) == ("kdiffusion", 5e-4, 1.0)
    assert (c.train.batch_size, c.train.augment_p) == (64, 0.12)  # train.py's --batch-size
    data = {k: c.data[k] for k in ("name", "tfds_name", "tfds_data_dir", "resolution", "channels",
                                   "use_labels")}  # fmt: skip
    assert data == {"name": "tfds", "tfds_name": "mnist", "tfds_data_dir": "data",
                    "resolution": 28, "channels": 1, "use_labels": True}  # fmt: skip
    validate.validate_config(c, 8)


@pytest.mark.parametrize("name", ["config_cifar10.json", "config_32x32_small.json",
                                  "config_oxford_flowers_shifted_window.json"])  # fmt: skip
def test_shipped_configs_translate(shipped, name):
    values = json.loads(shipped[name]["text"])
    kind = values["dataset"]["type"]
    if kind == "huggingface":
        with pytest.raises(ValueError, match=r"dataset type 'huggingface' \(\{'location': "):
            kdiff_run.to_train_config(values, config_io.default_config())
        return
    c = kdiff_run.to_train_config(values, config_io.default_config())
    validate.validate_config(c, 8)
    want = {"cifar10": ("tfds", "cifar10"), "imagefolder": ("folder", "")}[kind]
    assert (c.data.name, c.data.tfds_name) == want
    assert c.data.path == ("/path/to/dataset" if kind == "imagefolder" else "")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"model": {"sigma_dta": 0.5}}, r"unknown key 'sigma_dta' in k-diffusion config section "
                                         r"'model' \(did you mean 'sigma_data'\?\)"),
        ({"model": {"type": "image_v2"}}, r"k-diffusion model type 'image_v2'.*image_transformer_v2"),
        ({"model": {"loss_scales": 2}}, r"training supports .* loss_scales 1; .*loss_scales=2"),
        ({"dataset": {"type": "imagefolders"}}, r"dataset type 'imagefolders'.*did you mean 'imagefolder'"),
        ({"lr_sched": {"type": "cosine"}}, r"lr_sched type 'cosine'; valid: \['constant', 'exponential', 'inverse'\]"),
        ({"model": {"input_size": [8, 16]}}, r"input_size \[8, 16\] must be square"),
    ],
)  # fmt: skip
def test_bad_k_diffusion_configs_are_one_clear_error(tmp_path, edit, match):
    values = kdiff_config.merge(json.loads((ROOT / "configs" / TINY_HDIT).read_text()), edit)
    path = _write(tmp_path, values)
    with pytest.raises(ValueError, match=match) as e:
        config_io.load_config(path)
    assert "\n" not in str(e.value)


def test_stratified_density_draws_one_sigma_per_stratum():
    """u = (arange(B) + U) / B: the i-th sigma lies between the icdf at i/B and (i+1)/B (the
    cosine-interpolated sigma falls as u grows)."""
    opts = {"image_d": 8, "noise_d_low": 32, "noise_d_high": 8, "sigma_data": 0.5}
    spec = losses.LossSpec("cosine_interpolated", opts, "soft-min-snr", 0.5, stratified=True)
    batch = {"image": jnp.zeros([16, 4, 4, 1])}
    denoise = lambda p, x, s: x * 0  # noqa: E731
    _, aux = losses.diffusion_loss(jax.random.key(3), None, batch, denoise=denoise, spec=spec)
    edges = schedules.cosine_interpolated_icdf(jnp.arange(17) / 16, **opts)
    sigma = np.asarray(aux["sigma"])
    assert np.all(sigma <= np.asarray(edges[:-1])) and np.all(sigma >= np.asarray(edges[1:]))
    unstrat = losses.LossSpec("cosine_interpolated", opts, "soft-min-snr", 0.5)
    _, aux = losses.diffusion_loss(jax.random.key(3), None, batch, denoise=denoise, spec=unstrat)
    assert not np.all(np.diff(np.asarray(aux["sigma"])) < 0)  # iid draws are not sorted


# --------------------------------------------------------------------------- training runs


def _tiny(name: str, **model) -> dict:
    values = json.loads((ROOT / "configs" / name).read_text())
    values["model"].update(model)
    return values


def _train_config(values, **updates):
    c = kdiff_run.to_train_config(values, config_io.default_config())
    c.train.update(batch_size=16, total_kimg=0.032)
    c.log.update(log_every_steps=1, checkpoint_every_steps=1, sample_every_kimg=0.0,
                 tqdm=False, tensorboard=False)  # fmt: skip
    for key, value in updates.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


HDIT_TINY = {"widths": [32], "depths": [1], "d_ffs": [64], "mapping_width": 32,
             "self_attns": [{"type": "global", "d_head": 16}]}  # fmt: skip


def test_trainer_uses_the_ema_warmup_lr_schedule_and_gns(tmp_path):
    from edm_jax.train import train

    values = _tiny(TINY_HDIT, **HDIT_TINY)
    values["lr_sched"] = {"type": "inverse", "inv_gamma": 2.0, "power": 1.0, "warmup": 0.5}
    config = _train_config(values, **{"train.grad_accum": 2, "train.gns": True})
    first = train(config, tmp_path, stop_at_step=1, print_summary=False)["state"]
    p1, ema1 = jax.device_get(first.params), jax.device_get(first.ema)
    assert tree_equal(ema1, p1)  # EMAWarmup's decay is 0 at the first update
    second = train(config, tmp_path, stop_at_step=2, print_summary=False)["state"]
    loaded = kdiff_config.load_config(values)
    d1 = float(kdiff_recipe.ema_decay(1, **kdiff_recipe.ema_options(loaded)))
    assert 0 < d1 < 1
    want = jax.tree.map(lambda e, p: p + d1 * (e - p), ema1, jax.device_get(second.params))
    assert tree_max_diff(second.ema, want) < 1e-6
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]  # step k's lr: 1e-3 (1 - 0.5^(k+1)) (1 + k/2)^-1
    np.testing.assert_allclose(lrs, [1e-3 * 0.5, 1e-3 * 0.75 / 1.5], rtol=1e-6)
    for r in rows:  # --gns: micro-batches of 8 against the batch of 16 (each train() starts afresh)
        gns = kdiff_recipe.GradientNoiseScale()
        small, large = r["gns_sq_norm_small"], r["gns_sq_norm_large"]
        assert small > large > 0 and large == pytest.approx(r["grad_norm"] ** 2, rel=1e-5)
        gns.update(small, large, 8, 16)
        assert r["gradient_noise_scale"] == pytest.approx(gns.gradient_noise_scale, rel=1e-12)


IMAGE_V1_TINY = {"channels": [8, 16, 16], "depths": [1, 1, 1], "mapping_out": 16}


def test_growing_an_image_v1_run(tmp_path):
    from edm_jax.checkpoint_reader import load_checkpoint
    from edm_jax.train import train

    small = _train_config(_tiny("kdiff_digits_8.json", **IMAGE_V1_TINY))
    train(small, tmp_path / "small", stop_at_step=2, print_summary=False)
    _, ema, _ = load_checkpoint(str(tmp_path / "small"))
    out = kdiff_files.export(str(tmp_path / "small"), tmp_path / "small.safetensors", "fp32")
    _, exported, config = kdiff_files.load(out)  # k-diffusion's inference format, read back
    assert tree_equal(exported, ema) and config["model"]["skip_stages"] == 1
    big_values = _tiny("kdiff_digits_16.json", **IMAGE_V1_TINY)
    model = kdiff_models.from_config(kdiff_config.load_config(big_values))
    params = kdiff_run.grown_params(str(tmp_path / "small"), model, jax.random.key(0))
    grown, old = (traverse_util.flatten_dict(jax.device_get(t)) for t in (params, ema))
    shared = [k for k in grown if k[0] not in ("proj_in", "proj_out")]
    assert shared and all(np.array_equal(grown[k], old[k]) for k in shared)
    assert all(not np.any(grown[k]) for k in grown if k[0] == "proj_out")  # D = c_skip x
    big = _train_config(big_values)
    info = train(big, tmp_path / "big", stop_at_step=1, grow_from=str(tmp_path / "small"),
                 print_summary=False)  # fmt: skip
    assert info["step"] == 1 and np.isfinite(info["last"]["loss"])  # the grown run trains
    with pytest.raises(ValueError, match="growing needs two k-diffusion image_v1 networks"):
        hdit = _train_config(_tiny(TINY_HDIT, **HDIT_TINY))
        train(hdit, tmp_path / "x", stop_at_step=0, grow_from=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="no checkpoint found in"):
        train(big, tmp_path / "y", stop_at_step=0, grow_from=str(tmp_path / "nothing"))
