"""The SD VAE (diffusers AutoencoderKL) and EDM2's latent conventions vs vae_kl.npz."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.data.latents import LatentCodec, final_latents, latent_scale_bias
from edm_jax.nets import vae as vae_lib
from edm_jax.nets.reader import write_safetensors
from edm_jax.nets.vae import DiagonalGaussian, build_vae, from_state_dict, vae_param_count

TOL = 1e-4  # max|diff| / max|ref| per key (fixtures README)


def rel(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def nhwc(a):
    """NCHW -> NHWC."""
    return jnp.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    """NHWC -> NCHW."""
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    """The fixture file as a dict of arrays."""
    with np.load(fixtures_dir / "vae_kl.npz") as f:
        return {k: f[k] for k in f.files}


def _encode_both(m, x):
    """(encoder output, moments) in one pass."""
    h = m.encoder(x)
    return h, m.quant_conv(h)


@pytest.fixture(scope="module")
def model(ref):
    """(vae, params, encode, decode) of the fixture's small config and weights."""
    vae = build_vae(json.loads(str(ref["config_json"])))
    sd = {k[len("param/") :]: v for k, v in ref.items() if k.startswith("param/")}
    params = from_state_dict(vae, sd)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=_encode_both))
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    return vae, params, functools.partial(enc, params), functools.partial(dec, params)


def test_param_counts(ref, model):
    """Small config equals num_params; the sd-vae-ft-mse preset has 83,653,863."""
    assert vae_param_count(model[0]) == int(ref["num_params"]) == 1_288_263
    full = build_vae("sd-vae-ft-mse")
    assert vae_param_count(full) == int(ref["real_num_params"]) == 83_653_863
    assert vae_param_count(build_vae(json.loads(str(ref["real_config_json"])))) == 83_653_863


def test_encoder_and_distribution(ref, model):
    """encoder_out, moments, mean/logvar (clamped)/std match diffusers."""
    out, moments = model[2](nhwc(ref["x"]))
    assert rel(nchw(out), ref["encoder_out"]) < TOL
    assert rel(nchw(moments), ref["moments"]) < TOL
    d = DiagonalGaussian.from_moments(moments)
    assert (np.asarray(d.logvar) == -30).mean() > 0.05  # the fixture puts the clamp to work
    for key, ours in (("mean", d.mean), ("logvar", d.logvar), ("std", d.std)):
        assert rel(nchw(ours), ref[key]) < TOL, key


def test_decoder(ref, model):
    """decode(mean) and decode(z) match diffusers (no scaling_factor)."""
    _, _, _, dec = model
    assert rel(nchw(dec(nhwc(ref["mean"]))), ref["dec_mean"]) < TOL
    assert rel(nchw(dec(nhwc(ref["z"]))), ref["dec_z"]) < TOL


def test_odd_sizes(ref, model):
    """33x31 inputs: bottom/right padding gives 8x7 latents and diffusers' values."""
    _, _, enc, dec = model
    moments = enc(nhwc(ref["x_odd"]))[1]
    assert nchw(moments).shape == ref["moments_odd"].shape == (2, 8, 8, 7)
    assert rel(nchw(moments), ref["moments_odd"]) < TOL
    d = DiagonalGaussian.from_moments(moments)
    assert rel(nchw(d.mean), ref["mean_odd"]) < TOL
    assert rel(nchw(d.logvar), ref["logvar_odd"]) < TOL
    out = dec(d.mean)
    assert nchw(out).shape == ref["dec_mean_odd"].shape
    assert rel(nchw(out), ref["dec_mean_odd"]) < TOL


def test_diagonal_gaussian_clamp(ref):
    """Both ends of the [-30, 20] logvar clamp, alone."""
    d = DiagonalGaussian.from_moments(nhwc(ref["dgd_params"]))
    for key, ours in (("mean", d.mean), ("logvar", d.logvar), ("std", d.std), ("var", d.var)):
        assert rel(nchw(ours), ref[f"dgd_{key}"]) < TOL, key
    np.testing.assert_array_equal(nchw(d.logvar)[0, :, 0, :], [[-30, -30, -29.5, 19.5, 20]] * 4)


def test_old_attention_names_and_roundtrip(ref, model):
    """query/key/value/proj_attn load the same; to_state_dict inverts from_state_dict."""
    vae, params, _, _ = model
    sd = vae_lib.to_state_dict(params)
    for k, v in sd.items():
        np.testing.assert_array_equal(v, ref["param/" + k])
    old = {
        k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in sd.items()
    }  # fmt: skip
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    again = from_state_dict(vae, old)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_wrong_config_names_first_mismatch(ref, model):
    """Weights of another configuration: the first mismatching key is named, before compute."""
    sd = vae_lib.to_state_dict(model[1])
    with pytest.raises(ValueError, match=r"missing 'decoder\.conv_in\.bias'"):
        from_state_dict(build_vae("sd-vae-ft-mse"), {})
    first = r"missing 'decoder\.up_blocks\.2\.upsamplers\.0\.conv\.bias' \(48 missing"
    with pytest.raises(ValueError, match=first):
        from_state_dict(build_vae("sd-vae-ft-mse"), sd)
    small = vae_lib.VAEConfig(block_out_channels=(16, 32, 32), norm_num_groups=8)
    with pytest.raises(
        ValueError, match=r"key 'decoder\.conv_in\.bias' has shape \(64,\).*needs \(32,\)"
    ):
        from_state_dict(build_vae(small), sd)
    with pytest.raises(ValueError, match="unknown VAE preset 'sd-xl'"):
        build_vae("sd-xl")


def test_converter_formats(tmp_path, ref, model, capsys):
    """The converter: .npz out; .safetensors and .bin read without torch (nets/reader)."""
    sd = vae_lib.to_state_dict(model[1])
    write_safetensors(tmp_path / "w.safetensors", {k: v.astype(np.float16) for k, v in sd.items()})
    back = vae_lib.read_torch_weights(str(tmp_path / "w.safetensors"))
    assert sorted(back) == sorted(sd) and all(back[k].dtype == np.float32 for k in back)
    np.testing.assert_array_equal(
        back["decoder.conv_in.bias"], sd["decoder.conv_in.bias"].astype(np.float16)
    )
    with pytest.raises(ValueError, match="unknown weights format 'w.h5'"):
        vae_lib.read_torch_weights("w.h5")
    with pytest.raises(SystemExit):
        vae_lib.convert_main(["convert", str(tmp_path / "none.bin"), str(tmp_path / "o.npz")])
    assert "no such weights file" in capsys.readouterr().err
    write_safetensors(tmp_path / "w.safetensors", sd)
    (tmp_path / "config.json").write_text(str(ref["config_json"]))
    cmd = ["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "w.npz")]
    vae_lib.convert_main([*cmd, "--config", str(tmp_path / "config.json")])
    loaded = vae_lib.load_vae_npz(model[0], tmp_path / "w.npz")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, model[1])


def test_edm2_constants(ref):
    """scale and bias in float32 exactly as encoders.py computes them."""
    scale, bias = latent_scale_bias()
    np.testing.assert_array_equal(scale, ref["edm2_scale"])
    np.testing.assert_array_equal(bias, ref["edm2_bias"])


def test_edm2_encode_decode(ref, model):
    """encode_pixels (pixels/255), final latents, decode (divide, clamp, x255, truncate)."""
    vae, params, _, _ = model
    codec = LatentCodec.edm2(vae, params)
    raw = codec.encode_pixels(nhwc(ref["edm2_pixels"]))
    assert rel(nchw(raw), ref["edm2_raw_latents"]) < TOL
    final = final_latents(raw, nhwc(ref["edm2_noise"]), codec.scale, codec.bias)
    assert rel(nchw(final), ref["edm2_final_latents"]) < TOL
    for src, key in (("edm2_final_latents", "edm2_decoded"), ("edm2_final_z", "edm2_decoded_z")):
        x = nhwc(ref[src])
        assert rel(nchw(codec.decode_float(x)), ref[key + "_float"]) < TOL, key
        out = nchw(codec.decode(x))
        assert out.dtype == np.uint8
        diff = np.abs(out.astype(int) - ref[key].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, key
    draws = codec.encode_latents(jax.random.key(0), raw)
    assert draws.shape == (4, 8, 8, 4)
