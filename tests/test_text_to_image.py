"""Stable Diffusion text-to-image: single-file loader, guided denoiser, text_to_image, sample.py.

Tiny checkpoints are written by the tests in the released layout (.safetensors with the
'model.diffusion_model.' / 'first_stage_model.' / 'cond_stage_model.' prefixes), from the
fixture-sized U-Nets of foreign_sd1/sd2.npz and the small VAE of vae_kl.npz.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import api
from edm_jax.nets import convert_openai as co
from edm_jax.nets import ldm_unet as lu
from edm_jax.nets import reader
from edm_jax.nets import vae as vae_lib
from edm_jax.sd import checkpoint as ck
from edm_jax.sd import generate, load, pipeline

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SIZE = (16, 24)  # pixels; latents 8 x 12 with the x2 tiny VAE


def fast_jit(fn, *args):
    """fn(*args) through a jit compiled without LLVM's expensive passes (same values)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def maxrel(a, ref) -> float:
    """max|a - ref| / max|ref| (the fixtures README's measure)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def unet_fixture(fixtures_dir, case: str) -> tuple[dict, dict, dict]:
    """(arrays, unet kwargs, state_dict) of foreign_<case>.npz."""
    with np.load(fixtures_dir / f"foreign_{case}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    kw = dict(json.loads(str(arrays.pop("config_json")))["unet_kwargs"])
    for key in ("attention_resolutions", "channel_mult"):
        kw[key] = tuple(kw[key])
    sd = {k[len("param/") :]: arrays.pop(k) for k in list(arrays) if k.startswith("param/")}
    return arrays, kw, sd


# diffusers VAE names -> CompVis names, written out independently of edm_jax.sd.checkpoint.
_TO_COMPVIS = [
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"mid_block\.resnets\.0\.", "mid.block_1."),
    (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1."),
    (r"conv_norm_out\.", "norm_out."),
    (r"conv_shortcut\.", "nin_shortcut."),
]


def compvis_vae(diffusers_sd: dict, levels: int) -> dict:
    """A diffusers VAE state_dict in CompVis names (decoder levels reversed, attention as 1x1 convs)."""
    out = {}
    for name, v in diffusers_sd.items():
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", name)
        if m:
            i, kind, j, rest = levels - 1 - int(m[1]), m[2], m[3], m[4]
            name = (
                f"decoder.up.{i}.block.{j}.{rest}"
                if kind == "resnets"
                else f"decoder.up.{i}.upsample.{rest}"
            )
        for pattern, repl in _TO_COMPVIS:
            name = re.sub(pattern, repl, name)
        if ".attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[name] = v
    return out


@pytest.fixture(scope="module")
def vae_ref(fixtures_dir):
    """vae_kl.npz as a dict."""
    with np.load(fixtures_dir / "vae_kl.npz") as f:
        return {k: f[k] for k in f.files}


def vae_part(vae_ref) -> dict:
    """The fixture VAE in CompVis names (first_stage_model. stripped)."""
    sd = {k[len("param/") :]: v for k, v in vae_ref.items() if k.startswith("param/")}
    return compvis_vae(sd, levels=3)


def fake_text_part(variant: str, width: int) -> dict:
    """A few cond_stage_model tensors in the variant's layout (names only matter here)."""
    prefix = "transformer.text_model.embeddings." if variant == "sd1" else "model."
    return {prefix + "token_embedding.weight": np.zeros((10, width), np.float32)}


def write_sd_file(path, unet_sd, vae_sd, text_sd, ema_scale=None, alphas_cumprod=None):
    """A released-layout single file (+ model_ema. copy of the U-Net times ema_scale, and the
    LatentDiffusion alphas_cumprod buffer)."""
    tensors = {co.SD_UNET_PREFIX + k: v for k, v in unet_sd.items()}
    if alphas_cumprod is not None:
        tensors["alphas_cumprod"] = alphas_cumprod
    tensors |= {ck.VAE_PREFIX + k: v for k, v in vae_sd.items()}
    tensors |= {ck.TEXT_PREFIX + k: v for k, v in text_sd.items()}
    if ema_scale is not None:
        for k, v in unet_sd.items():
            tensors["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v * ema_scale
    reader.write_safetensors(path, tensors)
    return path


# ---- loader pieces (no text encoder needed)


def test_compvis_vae_names_decode_parity(vae_ref):
    """CompVis VAE names -> diffusers names -> our VAE: decode(z) equals the fixture."""
    part = vae_part(vae_ref)
    assert (
        "encoder.down.0.block.0.conv1.weight" in part
        and "decoder.up.2.upsample.conv.weight" in part
    )
    parts = ck.SDParts({}, part, {}, {}, "sd1")
    cfg, params = load.convert_vae(parts, norm_num_groups=8)  # CompVis files use 32; fixture 8
    assert cfg.block_out_channels == (32, 64, 64) and cfg.layers_per_block == 2
    assert cfg.latent_channels == 4 and cfg.scaling_factor == 0.18215
    z = jnp.asarray(vae_ref["z"].transpose(0, 2, 3, 1))
    vae = vae_lib.build_vae(cfg)
    out = fast_jit(lambda p, z: vae.apply({"params": p}, z, method="decode"), params, z)
    assert maxrel(np.asarray(out).transpose(0, 3, 1, 2), vae_ref["dec_z"]) <= 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_file(request, fixtures_dir, vae_ref, tmp_path_factory):
    """(case, arrays, unet kwargs, state_dict, path) of a tiny single file per SD version."""
    case = request.param
    arrays, kw, sd = unet_fixture(fixtures_dir, case)
    path = tmp_path_factory.mktemp(case) / f"tiny-{case}.safetensors"
    text = fake_text_part(case, kw["context_dim"])
    write_sd_file(path, sd, vae_part(vae_ref), text, 0.5, arrays["alphas_cumprod_f32"])
    return case, arrays, kw, sd, path


def test_split_infer_and_unet_parity(sd_file):
    """Split by prefix, version and shapes inferred; the loaded U-Net reproduces the fixture."""
    case, arrays, kw, sd, path = sd_file
    parts = ck.split_checkpoint(reader.read_state_dict(path), str(path))
    assert parts.variant == case and set(parts.unet) == set(sd)
    np.testing.assert_array_equal(parts.alphas_cumprod, arrays["alphas_cumprod_f32"])
    np.testing.assert_array_equal(  # the LDM schedule used when a file has no buffer
        stand_in_pipe(lu.ldm_unet(**kw)).alphas_cumprod,
        arrays["alphas_cumprod_f32"],
    )
    inferred = ck.infer_unet_config(parts.unet, case)
    heads = ("num_heads", "num_head_channels")
    for key in set(kw) - {
        "use_checkpoint",
        "use_fp16",
        "legacy",
        "use_spatial_transformer",
        *heads,
    }:
        want = kw.get(key, False)
        assert inferred[key] == (
            tuple(sorted(want, reverse=True)) if key == "attention_resolutions" else want
        ), key
    fixture_cfg = {k: v for k, v in kw.items() if k != "use_spatial_transformer"}
    cfg, params = load.convert_unet(parts, fixture_cfg)  # the fixture's head count
    net = lu.ldm_unet(**cfg)
    pipe = stand_in_pipe(net, "eps" if case == "sd1" else "v", case)

    def both(p, x, t, c, dx, ds, dc):  # unet(x, t, c) and the wrapped denoiser, one compile
        return net.apply({"params": p}, x, t, c), pipe.denoiser(p)(dx, ds, labels=dc)

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    out, d = fast_jit(both, params, nhwc(arrays["x"]), jnp.asarray(arrays["t"]),
                      jnp.asarray(arrays["context"]), nhwc(arrays["den_x"]),
                      jnp.asarray(arrays["den_sigma"]), jnp.asarray(arrays["den_context"]))  # fmt: skip
    assert maxrel(np.asarray(out).transpose(0, 3, 1, 2), arrays["out"]) <= 3e-5
    # the wrapped denoiser (CompVisDenoiser / CompVisVDenoiser) at several sigmas
    assert maxrel(np.asarray(d).transpose(0, 3, 1, 2), arrays["den_out"]) <= 3e-5
    np.testing.assert_allclose(pipe.sigma_min, arrays["kd_sigmas"][0], rtol=1e-6)
    np.testing.assert_allclose(pipe.sigma_max, arrays["kd_sigmas"][-1], rtol=1e-6)
    _, ema = load.convert_unet(parts, fixture_cfg, ema=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-6), ema, params)


def test_released_unets_inferred_from_their_shapes(fixtures_dir):
    """The SD 1.5 and SD 2.1 key/shape lists give back the released configs (no weights)."""
    with np.load(fixtures_dir / "foreign_sd_released.npz") as d:
        unets = json.loads(str(d["unets_json"]))
    for name, variant in (("sd15", "sd1"), ("sd21_v", "sd2"), ("sd2_base", "sd2")):
        sd = {k: np.broadcast_to(np.float32(0), shape) for k, shape in unets[name]["keys"]}
        unet = {co.SD_UNET_PREFIX + k: v for k, v in sd.items()}
        parts = ck.split_checkpoint(unet | {"first_stage_model.x": 0, "cond_stage_model.x": 0})
        assert parts.variant == variant
        inferred = ck.infer_unet_config(parts.unet, variant)
        assert inferred == dict(lu.SD_UNETS[name], use_linear_in_transformer=variant == "sd2"), name
        assert len(sd) == unets[name]["num_tensors"]


def test_other_version_config_and_non_sd_file(sd_file, tmp_path):
    """An SD 2 file with the SD 1 config (and back), a file without a U-Net: one line each."""
    case, _, _, _, path = sd_file
    parts = ck.split_checkpoint(reader.read_state_dict(path), str(path))
    wrong = "sd15" if case == "sd2" else "sd21_v"
    with pytest.raises(ValueError, match=f"the checkpoint is {case.upper()} .* use config"):
        load.load_pipeline(path, config=wrong, cache=False)
    with pytest.raises(
        ValueError, match=r"unknown Stable Diffusion config 'sd16' \(did you mean 'sd15'\?\)"
    ):
        load.convert_unet(parts, "sd16")
    other = reader.write_safetensors(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": np.zeros((2, 3, 3, 3), np.float32)})  # fmt: skip
    with pytest.raises(
        ValueError, match="is not a Stable Diffusion checkpoint: no 'model.diffusion_model.' keys"
    ):
        load.load_pipeline(other)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.pt: an SD checkpoint is a .ckpt or .safetensors"):
        load.load_pipeline(tmp_path / "model.pt")


# ---- the pipeline maths, with a stand-in text encoder (an embedding table)


def _stand_in_tokenize(prompts):
    """Bytes of each prompt mod 64 as ids [N, 7] (0-padded); a stand-in for CLIP's BPE."""
    out = np.zeros((len(prompts), 7), np.int32)
    for i, p in enumerate(prompts):
        ids = [b % 63 + 1 for b in p.encode()][:7]
        out[i, : len(ids)] = ids
    return out


def stand_in_pipe(net, prediction="eps", variant="sd1", vae=None) -> pipeline.StableDiffusion:
    """A pipeline whose text encoder is a lookup table (params['text'] [64, context_dim])."""
    te = pipeline.TextEncoder(_stand_in_tokenize, lambda p, ids: p[ids], net.context_dim, 7)
    vae = vae or vae_lib.build_vae(
        vae_lib.VAEConfig(block_out_channels=(32, 64, 64), norm_num_groups=8)
    )
    return pipeline.StableDiffusion(net, vae, te, prediction, variant)


def random_params(shapes, seed: int):
    """Kernels N(0, 1/fan_in), norm scales 1, biases 0.1 N: every layer matters."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))
        if path[-1].key == "scale":
            return jnp.ones(s.shape)
        return jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32))

    return jax.tree_util.tree_map_with_path(draw, shapes)


TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32,
                 attention_resolutions=(1,), num_res_blocks=1, channel_mult=(1,), num_heads=2)  # fmt: skip
TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny():
    """(pipe, params): a one-level random U-Net, a x2 VAE and a random embedding table."""
    net = lu.ldm_unet(**TINY_UNET, context_dim=16)
    vae = vae_lib.build_vae(TINY_VAE)
    pipe = stand_in_pipe(net, vae=vae)
    unet_params = random_params(jax.eval_shape(lambda: lu.init_ldm_unet(net, jax.random.key(0))), 0)
    table = jax.random.normal(jax.random.key(1), (64, net.context_dim))
    return pipe, {"unet": unet_params, "vae": vae_lib.random_vae_params(0, vae), "text": table}


def t2i(tiny, prompts="a red cube", negative="", **kw):
    """text_to_image on the tiny pipeline at SIZE, 3 steps by default."""
    pipe, params = tiny
    kw = dict(dict(steps=3, seeds=[0, 1], height=SIZE[0], width=SIZE[1], batch_size=8), **kw)
    return generate.text_to_image(jax.random.key(0), pipe, params, prompts, negative, **kw)


def test_cfg_is_one_batched_call_of_the_two_call_maths(tiny):
    """guided D = D_u + s (D_c - D_u), the U-Net traced once (on the doubled batch)."""
    pipe, params = tiny
    ctx = jnp.asarray(pipe.encode_prompts(params["text"], ["a cat", "blurry"]))
    x = jax.random.normal(jax.random.key(2), (2, 8, 12, 4)) * 3.0
    sigma = jnp.array([3.0, 0.5])
    cond, uncond = jnp.broadcast_to(ctx[:1], (2, 7, 16)), jnp.broadcast_to(ctx[1:], (2, 7, 16))
    guided = pipe.guided(params["unet"], cond, uncond, 7.5)
    den = pipe.denoiser(params["unet"])

    def both(x, sigma):
        return guided(x, sigma), den(x, sigma, labels=cond), den(x, sigma, labels=uncond)

    out, d_c, d_u = fast_jit(both, x, sigma)
    ref = d_u + 7.5 * (d_c - d_u)  # 7.5x amplifies float32 noise of the two batch shapes
    assert float(jnp.abs(out - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())

    def n_convs(f):
        return str(jax.make_jaxpr(f)(x, sigma)).count("conv_general_dilated")

    assert n_convs(guided) == n_convs(lambda x, s: den(x, s, labels=cond)) > 0


def test_schedules_deterministic_one_program(tiny):
    """karras / leading / exponential with dpmpp_2m: uint8 images, the same again; schedules,
    prompts, seeds and scale all reuse one compiled program."""
    seen = [t2i(tiny, schedule=name) for name in ("karras", "leading", "exponential")]
    for img in seen:
        assert img.shape == (2, *SIZE, 3) and img.dtype == np.uint8 and img.std() > 1
    np.testing.assert_array_equal(t2i(tiny, schedule="leading"), seen[1])
    for i in range(3):
        for j in range(i):
            assert np.abs(seen[i].astype(int) - seen[j]).max() > 0
    t2i(tiny, "another prompt", "and a negative one", cfg_scale=3.0, seeds=[9])
    spec = generate._Spec("dpmpp_2m", (8, 12, 4), 3, True, ())
    programs = [v[1] for k, v in generate._PROGRAMS.items() if k == (id(tiny[0]), spec)]
    assert len(programs) == 1 and programs[0]._cache_size() == 1  # one trace, one compile


def test_batch_invariant_prompts_and_negative_prompt_matter(tiny):
    """A seed's image is the same in any batch (split over the devices); prompts matter."""
    both = t2i(tiny, seeds=[0, 5, 7])
    alone = t2i(tiny, seeds=[7])
    assert np.abs(both[2].astype(int) - alone[0]).max() <= 1
    other = t2i(tiny, "a blue sphere", seeds=[0, 5, 7])
    neg = t2i(tiny, negative="low quality", seeds=[0, 5, 7])
    for changed in (other, neg):
        assert np.abs(changed.astype(int) - both).mean() > 1
    per_seed = t2i(tiny, ["a red cube", "a blue sphere", "a red cube"], seeds=[0, 5, 7])
    assert np.abs(per_seed[[0, 2]].astype(int) - both[[0, 2]]).max() <= 1
    assert np.abs(per_seed[1].astype(int) - other[1]).max() <= 1


def test_img2img_starts_from_the_init_image(tiny):
    """strength 1/3 of 3 steps (sigma 0.03 left): each seed's result is near the VAE round trip of
    the init image with that seed's encoding draw; bad input: one line each."""
    pipe, params = tiny
    base = t2i(tiny, seeds=[0, 1])
    init = base[:1]  # seed 0's image as the init image (broadcast to every seed)
    out = t2i(tiny, seeds=[0, 1], init_images=init, strength=0.34)
    keys = jnp.stack(
        [jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s), 1) for s in (0, 1)]
    )
    pixels = jnp.asarray(np.repeat(init, 2, 0), jnp.float32) / 127.5 - 1
    recon = api.to_uint8(
        pipe.decode(params["vae"], pipe.encode_images(params["vae"], pixels, keys))
    )
    for s in (0, 1):
        near, far = (np.abs(a.astype(int) - recon[s]).mean() for a in (out[s], base[1]))
        assert near < 0.5 * far, (s, near, far)  # measured: 25 vs 80
    assert np.abs(out[0].astype(int) - out[1]).max() > 0  # each seed's own encoding/noise
    for kw, pattern in ((dict(strength=0.2), "strength must be in"),
                        (dict(init_images=init[:, :8]), "init_images must be uint8"),
                        (dict(sampler="dpm_adaptive"), "img2img needs a sampler on a sigma grid")):  # fmt: skip
        with pytest.raises(ValueError, match=pattern):
            t2i(tiny, **dict(dict(init_images=init, strength=0.34), **kw))


def test_same_as_edm_jax_sample(tiny):
    """as_sampling_model + edm_jax.sample (karras, the LDM range) gives text_to_image's latents."""
    pipe, params = tiny
    model, mparams = pipeline.as_sampling_model(pipe, params, "a red cube", "", cfg_scale=7.5,
                                                height=SIZE[0], width=SIZE[1])  # fmt: skip
    latents = api.sample(jax.random.key(0), mparams, model, seeds=[0, 1], sampler="dpmpp_2m",
                         num_steps=3, sigma_min=1e-3, sigma_max=1e3, batch_size=8)  # fmt: skip
    ours = api.to_uint8(pipe.decode(params["vae"], jnp.asarray(latents)))
    assert np.abs(ours.astype(int) - t2i(tiny)).max() <= 1


def test_bf16_unet_close_to_float32(tiny):
    """The guided denoiser with the U-Net in bfloat16 stays close to float32's."""
    pipe, params = tiny
    bf = pipeline.StableDiffusion(
        pipe.unet.clone(dtype=jnp.bfloat16), pipe.vae, pipe.text, "eps", "sd1"
    )
    ctx = jnp.asarray(pipe.encode_prompts(params["text"], ["a cat", ""]))
    x = jax.random.normal(jax.random.key(3), (2, 8, 12, 4)) * 2.0

    def both(p, x, s):
        cond, uncond = (jnp.broadcast_to(c, (2, *c.shape)) for c in ctx)
        return [q.guided(p, cond, uncond, 7.5)(x, s) for q in (pipe, bf)]

    f32, b16 = fast_jit(both, params["unet"], x, jnp.array([2.0, 0.3]))
    assert f32.dtype == b16.dtype == jnp.float32
    assert 0 < maxrel(b16, np.asarray(f32)) < 0.05


def test_bad_inputs_one_line(tiny):
    """Unknown sampler / schedule, a size not a multiple of the VAE factor: one line, no compute."""
    cases = [
        (dict(sampler="dpmpp_2n"), r"unknown sampler 'dpmpp_2n' \(did you mean 'dpmpp_2m'\?\)"),
        (dict(schedule="karas"), r"unknown schedule 'karas' \(did you mean 'karras'\?\)"),
        (dict(height=17), r"height 17 is not a multiple of 2"),
        (dict(width=25), r"width 25 is not a multiple of 2"),
        (
            dict(seeds=[0, 1, 2], prompts=["a", "b"]),
            r"prompts must be a string or a list of 1 or 3",
        ),
        (dict(cfg_scale=float("nan")), r"cfg_scale"),
    ]
    for kw, pattern in cases:
        prompts = kw.pop("prompts", "x")
        with pytest.raises(ValueError, match=pattern) as e:
            t2i(tiny, prompts, **kw)
        assert "\n" not in str(e.value)


# ---- sample.py


@pytest.fixture(scope="module")
def sample_py():
    """The sample.py module (the repository root is not a package)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        import sample
    finally:
        sys.path.remove(root)
    return sample


def test_sample_py_defaults_and_flag_errors(sample_py, sd_file, tmp_path, capsys):
    """Trained-model defaults unchanged, SD defaults for SD files; misplaced flags: one line."""
    a = sample_py.parse_args(["--workdir", "w"])
    assert (a.sampler, a.steps, a.cfg_scale, a.batch, a.seeds) == (
        "heun",
        18,
        1.0,
        64,
        list(range(64)),
    )
    path = str(sd_file[-1])
    other = reader.write_safetensors(
        tmp_path / "vae.safetensors", {"decoder.conv_in.weight": np.zeros((2,), np.float32)}
    )
    a = sample_py.parse_args(["--checkpoint", path, "--prompt", "x"])
    assert (a.sampler, a.steps, a.cfg_scale, a.batch, a.seeds) == ("dpmpp_2m", 25, 7.5, 8, [0])
    for argv, msg in (
        (["--checkpoint", path], "error: --prompt is required with a Stable Diffusion checkpoint"),
        (["--workdir", str(tmp_path), "--prompt", "x"], "error: --prompt needs --checkpoint FILE"),
        (["--checkpoint", path, "--prompt", "x", "--sampler", "eulr"], "error: unknown sampler 'eulr'"),
        (["--checkpoint", path, "--prompt", "x", "--schedule", "karas"],
         "error: unknown --schedule 'karas' (did you mean 'karras'?)"),
        (["--checkpoint", path, "--prompt", "x", "--height", "500"], "error: --height 500 is not a multiple of 8"),
        (["--checkpoint", str(other), "--prompt", "x"], f"error: {other} is not a Stable Diffusion checkpoint"),
        (["--checkpoint", path, "--prompt", "x", "--class", "3"], "error: --class does not apply to Stable"),
    ):  # fmt: skip
        assert sample_py.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(msg) and "\n" not in err, err


# ---- the text encoders (edm_jax.clip) and the whole file through sample.py


def clip_fixture(fixtures_dir, name: str) -> tuple[dict, dict]:
    """(arrays, OpenAI/open_clip-named float32 state_dict) of clip_<name>.npz."""
    with np.load(fixtures_dir / f"clip_{name}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    sd = {k[6:]: arrays.pop(k).astype(np.float32) for k in list(arrays) if k.startswith("param/")}
    return arrays, sd


def openai_to_hf_text(sd: dict) -> dict:
    """OpenAI CLIP text names -> HF CLIPTextModel names (no projection), written out here."""
    top = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}  # fmt: skip
    sub = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
           "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}  # fmt: skip
    out = {"text_model.embeddings.position_ids": np.arange(77)[None]}
    for k, v in sd.items():
        if k in top:
            out["text_model." + top[k]] = v
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)[._](weight|bias)$", k)
        if m is None:
            continue
        layer = f"text_model.encoder.layers.{m[1]}."
        if m[2] == "attn.in_proj":
            for name, part in zip("qkv", np.split(v, 3), strict=True):
                out[f"{layer}self_attn.{name}_proj.{m[3]}"] = part
        else:
            out[f"{layer}{sub[m[2]]}.{m[3]}"] = v
    return out


@pytest.fixture(scope="module")
def vocab(fixtures_dir) -> str:
    """The CLIP BPE vocabulary of the fixtures."""
    return str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")


def test_text_encoders_match_the_clip_fixtures(fixtures_dir, vocab):
    """SD 1 (HF names, last layer) and SD 2 (open_clip names, penultimate + ln_final) hidden states."""
    from edm_jax.sd import text

    for variant, name, key in (
        ("sd1", "openai", "text_hidden"),
        ("sd2", "openclip", "sd2_penultimate_ln"),
    ):
        arrays, sd = clip_fixture(fixtures_dir, name)
        part = {"transformer." + k: v for k, v in openai_to_hf_text(sd).items()} if variant == "sd1" else {"model." + k: v for k, v in sd.items()}  # fmt: skip
        cfg, params = text.convert_text_encoder(variant, part, heads=2)  # the fixtures' 2 heads
        enc = text.text_encoder(variant, cfg, vocab)
        out = fast_jit(enc.apply, params, jnp.asarray(arrays["text_tokens"], jnp.int32))
        assert maxrel(out, arrays[key]) <= 2e-5, variant
        ids = enc.tokenize(["a red cube"])[0]
        assert ids[0] == 49406 and list(ids).index(49407) == 4
        assert (
            ids[5:] == (49407 if variant == "sd1" else 0)
        ).all()  # HF pads with EOT, open_clip 0
        with pytest.warns(UserWarning, match="tokens; truncated to 77"):
            long = enc.tokenize(["word " * 100])[0]
        assert long[-1] == 49407 and long.shape == (77,)


E2E_UNET = dict(TINY_UNET, num_heads=8)  # SD 1's rule: 8 heads (the loader infers the rest)
E2E_VAE = vae_lib.VAEConfig(block_out_channels=(32, 32), layers_per_block=1)  # 32 groups as CompVis


@pytest.fixture(scope="module")
def e2e_file(fixtures_dir, tmp_path_factory):
    """A tiny SD 1 single file: random U-Net, random CompVis VAE, the fixture CLIP text tower."""
    _, clip_sd = clip_fixture(fixtures_dir, "openai")
    net = lu.ldm_unet(**E2E_UNET, context_dim=64)
    unet = random_params(jax.eval_shape(lambda: lu.init_ldm_unet(net, jax.random.key(0))), 3)
    vae = vae_lib.build_vae(E2E_VAE)
    vae_sd = compvis_vae(vae_lib.to_state_dict(vae_lib.random_vae_params(4, vae)), levels=2)
    text_sd = {"transformer." + k: v for k, v in openai_to_hf_text(clip_sd).items()}
    path = tmp_path_factory.mktemp("e2e") / "tiny-v1.safetensors"
    return write_sd_file(path, co.to_openai_state_dict(unet, net), vae_sd, text_sd)


def test_sample_py_prompt_end_to_end(sample_py, e2e_file, vocab, tmp_path):
    """sample.py --prompt on a released-layout file: PNGs; the cached load reproduces a seed alone."""
    out = tmp_path / "out"
    argv = ["--checkpoint", str(e2e_file), "--prompt", "a red cube", "--negative-prompt", "blurry",
            "--sampler", "euler_ancestral", "--schedule", "exponential", "--steps", "3",
            "--seeds", "0-2", "--batch", "3", "--height", "16", "--width", "24", "--vocab", vocab,
            "--outdir", str(out), "--no-progress"]  # fmt: skip
    assert sample_py.main(argv) == 0
    with np.load(out / "samples.npz") as f:
        images, seeds = f["images"], f["seeds"]
    assert images.shape == (3, 16, 24, 3) and list(seeds) == [0, 1, 2] and images.std() > 1
    assert (out / "000002.png").is_file() and (out / "grid.png").is_file()
    cache = e2e_file.parent / (e2e_file.name + ".edm_jax.npz")
    written = cache.stat().st_mtime_ns
    pipe, params = load.load_pipeline(e2e_file, vocab=vocab)  # from the cache, not rewritten
    assert cache.stat().st_mtime_ns == written
    assert (pipe.variant, pipe.prediction, pipe.unet.context_dim) == ("sd1", "eps", 64)
    kw = dict(
        sampler="euler_ancestral",
        schedule="exponential",
        steps=3,
        height=16,
        width=24,
        batch_size=3,
    )
    key = jax.random.key(0)
    alone = generate.text_to_image(key, pipe, params, "a red cube", "blurry", seeds=[2], **kw)
    assert np.abs(alone[0].astype(int) - images[2]).max() <= 1
    other = generate.text_to_image(key, pipe, params, "a red cube", "sharp", seeds=[2], **kw)
    assert np.abs(other[0].astype(int) - images[2]).mean() > 1


def test_sample_py_img2img(sample_py, e2e_file, vocab, tmp_path, capsys):
    """--init-image/--strength: the file is Lanczos-resized to --height x --width (diffusers'
    default preprocessing) and gives text_to_image(init_images=..., strength=...)'s images."""
    from PIL import Image

    from edm_jax.sd import cli

    rng = np.random.default_rng(0)
    big = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "init.png")
    resized = cli.read_init_image(str(tmp_path / "init.png"), 16, 24)
    want = np.asarray(Image.fromarray(big).resize((24, 16), Image.Resampling.LANCZOS))
    assert resized.shape == (1, 16, 24, 3) and (resized[0] == want).all()
    out = tmp_path / "out"
    base = ["--checkpoint", str(e2e_file), "--prompt", "a red cube", "--sampler", "euler",
            "--steps", "3", "--seeds", "0-1", "--height", "16", "--width", "24",
            "--vocab", vocab, "--no-progress", "--init-image", str(tmp_path / "init.png")]  # fmt: skip
    assert sample_py.main([*base, "--strength", "0.67", "--outdir", str(out)]) == 0
    with np.load(out / "samples.npz") as f:
        images = f["images"]
    pipe, params = load.load_pipeline(e2e_file, vocab=vocab)
    kw = dict(sampler="euler", steps=3, height=16, width=24, seeds=[0, 1])
    ref = generate.text_to_image(jax.random.key(0), pipe, params, "a red cube",
                                 init_images=resized, strength=0.67, **kw)  # fmt: skip
    assert np.abs(ref.astype(int) - images).max() <= 1
    t2i_only = generate.text_to_image(jax.random.key(0), pipe, params, "a red cube", **kw)
    assert np.abs(t2i_only.astype(int) - images).mean() > 1  # the init image was used
    for extra, msg in ((["--strength", "0.1"], "error: strength must be in (0, 1]"),
                       (["--init-image", str(tmp_path / "nope.png")], "error: --init-image")):  # fmt: skip
        assert sample_py.main([*base, *extra, "--outdir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(msg), err
