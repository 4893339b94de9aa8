"""EDM2 learning rate, power-function EMA maths and post-hoc EMA vs edm2_schedules.json."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edm_jax
from edm_jax.nets.presets import EDM2_TRAINING, build_model
from edm_jax.train import phema
from edm_jax.train.edm2 import edm2_lr_schedule, learning_rate_schedule


@pytest.fixture(scope="module")
def ref(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "edm2_schedules.json").read_text())


def test_learning_rate_schedule(ref):
    for name, s in ref["learning_rate_schedule"]["settings"].items():
        got = learning_rate_schedule(np.asarray(s["cur_nimg"], np.float64), **s["kwargs"])
        np.testing.assert_allclose(got, s["lr"], rtol=1e-12, atol=0, err_msg=name)


def test_lr_schedule_as_optax_schedule_of_the_step_count(x64):
    k = dict(ref_lr=0.012, ref_batches=35000, rampup_Mimg=10)
    sched = edm2_lr_schedule(2048, **k)
    for step in (0, 1, 4882, 40000):
        want = learning_rate_schedule(step * 2048.0, 2048, **k)
        assert float(sched(jnp.asarray(step))) == pytest.approx(want, rel=1e-12)


def test_std_exp_conversions(ref):
    np.testing.assert_allclose(
        [phema.std_to_exp(s) for s in ref["std_to_exp"]["std"]],
        ref["std_to_exp"]["exp"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        [phema.exp_to_std(e) for e in ref["exp_to_std"]["exp"]],
        ref["exp_to_std"]["std"],
        rtol=1e-12,
    )


def test_power_function_beta(ref):
    for c in ref["power_function_beta"]["cases"]:
        got = phema.power_function_beta(c["std"], c["t_next"], c["t_delta"])
        assert got == pytest.approx(c["beta"], rel=1e-12, abs=1e-300), c


def test_power_function_correlation_and_response(ref):
    for c in ref["power_function_correlation"]["cases"]:
        got = phema.power_function_correlation(c["a_ofs"], c["a_std"], c["b_ofs"], c["b_std"])
        assert float(got) == pytest.approx(c["value"], rel=1e-12), c
    r = ref["power_function_response"]
    got = phema.power_function_response(r["ofs"], r["std"], r["len"], axis=r["axis"])
    np.testing.assert_allclose(got, r["value"], rtol=1e-12, atol=1e-300)


def test_solve_posthoc_coefficients(ref):
    s = ref["solve_posthoc_coefficients"]
    X = phema.solve_posthoc_coefficients(s["in_ofs"], s["in_std"], s["out_ofs"], s["out_std"])
    np.testing.assert_allclose(X, s["X"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(X.sum(axis=0), 1.0, rtol=1e-12)


def _fixture_snapshots(r) -> tuple[list, dict]:
    snaps, data = [], {}
    for s in r["snapshots"]:
        snap = phema.Snapshot(s["file"], s["nimg"], s["std"])
        arrays = {k: np.asarray(v, np.float16) for k, v in s["params_float16"].items()}
        arrays["step"] = np.asarray(s["step_buffer"], np.float32)
        snaps.append(snap)
        data[s["file"]] = arrays
    return snaps, data


def test_posthoc_reconstruction_matches_reference(ref):
    r = ref["posthoc_reconstruction"]
    snaps, data = _fixture_snapshots(r)
    inputs, out_nimg, stds = phema.check_targets(snaps, r["out_std"], None)
    assert [s.nimg for s in inputs] == r["in_nimg"] and [s.std for s in inputs] == r["in_std"]
    assert out_nimg == r["out_nimg"] and stds == r["out_std"]

    def load(s):
        return data[s.path], {"step"}

    coefs, outs = phema.reconstruct_params(inputs, out_nimg, stds, load)
    np.testing.assert_allclose(coefs, r["coefs"], rtol=0, atol=1e-10)
    coefs64, outs64 = phema.reconstruct_params(
        inputs, out_nimg, stds, load, acc_dtype=np.float64, cast_back=False
    )
    for std, out, out64 in zip(stds, outs, outs64, strict=True):
        want = r["reconstructed"][f"{std:.3f}"]
        assert float(out["step"]) == want["step_buffer"]
        for k, v in want["params_float16"].items():
            assert out[k].dtype == np.float16
            np.testing.assert_array_equal(out[k], np.asarray(v, np.float16), err_msg=k)
            w64 = np.asarray(r["reconstructed_float64"][f"{std:.3f}"][k])
            np.testing.assert_allclose(out64[k], w64, rtol=1e-10, atol=1e-12, err_msg=k)


def test_bad_reconstruction_input_is_refused_before_compute(tmp_path):
    snaps = [phema.Snapshot("a", 4096, 0.05), phema.Snapshot("b", 4096, 0.10)]
    with pytest.raises(ValueError, match="no power-EMA snapshots"):
        phema.check_targets([], [0.1], None)
    with pytest.raises(ValueError, match=r"target std \[0\.3\] outside"):
        phema.check_targets(snaps, [0.1, 0.3], None)
    with pytest.raises(ValueError, match="out_nimg 100 is not a snapshot time; valid: \\[4096\\]"):
        phema.check_targets(snaps, [0.1], 100)
    with pytest.raises(ValueError, match="no snapshot with 0 < nimg"):
        phema.check_targets([phema.Snapshot("z", 0, 0.05)], [0.1], None)
    with pytest.raises(FileNotFoundError, match="no snapshot folder"):
        phema.main(["--workdir", str(tmp_path), "--std", "0.1"])


def test_snapshots_to_loadable_reconstructions(tmp_path):
    """Training-style snapshots of a tiny EDM2 net -> two stds -> two different loadable models."""
    model = build_model(
        "edm2", img_resolution=8, img_channels=1, label_dim=3, model_channels=8,
        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
    )  # fmt: skip
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    gen = np.random.default_rng(0)
    p0 = jax.tree.map(lambda s: gen.standard_normal(s.shape).astype(np.float32), shapes)
    for i, nimg in enumerate((1024, 2048, 3072, 4096)):
        params = jax.tree.map(lambda a, i=i: a + np.float32(0.1 * i) * np.sign(a), p0)
        for std in (0.05, 0.10):
            phema.save_snapshot(tmp_path, nimg, std, params, model, dtype="float32")
    paths = phema.main(["--workdir", str(tmp_path), "--std", "0.15", "0.08"])
    assert [p.name for p in paths] == [
        "phema-000000004096-0.080.npz",
        "phema-000000004096-0.150.npz",
    ]
    (m1, a, _), (_, b, _) = (edm_jax.load(str(p)) for p in paths)
    assert m1.net.model_channels == 8 and m1.label_dim == 3
    w = ("unet", "out_conv", "weight")
    wa, wb = a[w[0]][w[1]][w[2]], b[w[0]][w[1]][w[2]]
    assert not np.allclose(wa, wb)
    freqs = p0["unet"]["emb_fourier"]["freqs"]  # a buffer: copied from the last snapshot
    last = freqs + np.float32(0.3) * np.sign(freqs)
    np.testing.assert_array_equal(a["unet"]["emb_fourier"]["freqs"], last)


@pytest.mark.parametrize(
    "path, arg", [("configs/edm2_digits.py", None), ("configs/edm2_img64.py", "size=s"),
                  ("configs/edm2_img64.py", "size=xl"), ("configs/edm2_img512.py", "size=xxl")],
)  # fmt: skip
def test_edm2_configs_validate_and_use_the_edm2_schedule(path, arg):
    import importlib.util

    from edm_jax.train.state import optim_schedule
    from edm_jax.train.validate import validate_config

    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    validate_config(c, num_devices=8)
    assert c.loss.name == "edm2" and c.optim.schedule == "edm2" and c.optim.b2 == 0.99
    sched = optim_schedule(c.optim, c.train.batch_size)
    k = dict(
        ref_lr=c.optim.lr,
        ref_batches=c.optim.ref_batches,
        rampup_Mimg=c.optim.lr_rampup_kimg / 1000,
    )
    for step in (1, 10**5):
        want = learning_rate_schedule(step * c.train.batch_size, c.train.batch_size, **k)
        assert float(sched(jnp.asarray(step))) == pytest.approx(want, rel=1e-6)


def test_edm2_config_rejects_unknown_size():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", "configs/edm2_img64.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ValueError, match=r"config variant size='xxl' is not valid .*'xl'"):
        mod.get_config("size=xxl")
    with pytest.raises(ValueError, match="unknown config variant 'xxl'"):
        mod.get_config("xxl")


def test_released_generate_presets_name_known_architectures():
    from edm_jax.nets.edm2_released import GENERATE_PRESETS, generate_preset

    p = generate_preset("edm2-img64-s-autog-fid")
    assert p["guidance"] == 1.70 and p["net"]["preset"] == "edm2-img64-s"
    assert p["gnet"] == {
        "preset": "edm2-img64-xs", "label_dim": 1000, "kimg": 134217, "std": 0.110,
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-xs-0134217-0.110.pkl",
    }  # fmt: skip
    assert generate_preset("edm2-img512-s-guid-fid")["gnet"]["label_dim"] == 0
    for name in GENERATE_PRESETS:
        p = generate_preset(name)
        assert all(p[k]["preset"] in EDM2_TRAINING for k in ("net", "gnet") if k in p), name
    with pytest.raises(ValueError, match="unknown EDM2 generate preset 'x'"):
        generate_preset("x")
