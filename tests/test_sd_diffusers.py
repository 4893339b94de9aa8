"""Stable Diffusion from a diffusers-layout folder (``StableDiffusionPipeline.save_pretrained``).

The folders are written here from the fixtures: the fixture-sized U-Nets of foreign_sd1/sd2.npz
renamed to diffusers' names by this file's own rules, the diffusers VAE of vae_kl.npz (with its
recorded config.json), and the CLIP text towers of clip_openai/openclip.npz in HF names (SD 2's
with its last layer dropped, as diffusers' SD 2 folders hold 23 of OpenCLIP's 24 layers). The
real diffusers names come from tests/data/diffusers_sd_unets.json (made by diffusers 0.42.1).
"""

import dataclasses
import gzip
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_text_to_image import (
    E2E_UNET,
    E2E_VAE,
    clip_fixture,
    fast_jit,
    maxrel,
    openai_to_hf_text,
    random_params,
    unet_fixture,
)
from train_testlib import ROOT

from edm_jax.nets import convert_openai as co
from edm_jax.nets import ldm_unet as lu
from edm_jax.nets import reader
from edm_jax.nets import vae as vae_lib
from edm_jax.sd import diffusers_folder as df
from edm_jax.sd import load
from edm_jax.sd import text as sd_text

FIXTURES = ROOT.parent / "shared" / "fixtures"  # as conftest; fixtures ask for fixtures_dir

# ---- CompVis -> diffusers U-Net names, written out here (index arithmetic, not a table)

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
        "middle_block.1": "mid_block.attentions.0"}  # fmt: skip


def _resnet(rest: str) -> str:
    for a, b in _RESNET.items():
        if rest.startswith(a + "."):
            return b + rest[len(a) :]
    return rest


def diffusers_name(name: str, nrb: int) -> str:
    """One CompVis U-Net name in diffusers' names (nrb: res blocks per level)."""
    for a, b in _TOP.items():
        if name.startswith(a + "."):
            return b + name[len(a) :]
    if m := re.match(r"middle_block\.([02])\.(.*)", name):
        return f"mid_block.resnets.{int(m[1]) // 2}.{_resnet(m[2])}"
    m = re.match(r"(input|output)_blocks\.(\d+)\.(\d)\.(.*)", name)
    assert m, name
    n, sub, rest = int(m[2]), int(m[3]), m[4]
    if m[1] == "input":
        level, j = divmod(n - 1, nrb + 1)
        if j == nrb:  # the level's downsampler: input_blocks.k.0.op
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        kind = "resnets" if sub == 0 else "attentions"
        return f"down_blocks.{level}.{kind}.{j}.{_resnet(rest) if sub == 0 else rest}"
    level, j = divmod(n, nrb + 1)
    if sub == 0:
        return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
    if rest.startswith("conv."):  # the upsampler: after the attention (sub 2) or alone (sub 1)
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{j}.{rest}"


def diffusers_unet_config(kw: dict) -> dict:
    """The UNet2DConditionModel config.json of ldm_unet kwargs."""
    mult, mc = kw["channel_mult"], kw["model_channels"]
    attn = [2**i in kw["attention_resolutions"] for i in range(len(mult))]
    if "num_heads" in kw:
        heads = kw["num_heads"]
    else:
        heads = [mc * m // kw["num_head_channels"] for m in mult]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": kw["image_size"],
        "in_channels": kw["in_channels"], "out_channels": kw["out_channels"],
        "block_out_channels": [mc * m for m in mult], "layers_per_block": kw["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "attention_head_dim": heads, "cross_attention_dim": kw["context_dim"],
        "use_linear_projection": kw.get("use_linear_in_transformer", False),
        "act_fn": "silu", "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
    }  # fmt: skip


def test_diffusers_unet_names_map_onto_the_released_unets(fixtures_dir):
    """diffusers' own SD 1.5 / 2.1 key names and shapes -> exactly the released CompVis sets."""
    recorded = json.loads((ROOT / "tests/data/diffusers_sd_unets.json").read_text())
    with np.load(fixtures_dir / "foreign_sd_released.npz") as d:
        released = json.loads(str(d["unets_json"]))
    for ours, theirs in (("sd15", "sd15"), ("sd21", "sd21_v")):
        cfg = recorded["configs"][ours]
        shapes = zip(recorded["keys"], recorded["shapes"][ours], strict=True)
        sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes}
        mapped = df.compvis_unet_state_dict(sd, cfg)
        want = {k: tuple(s) for k, s in released[theirs]["keys"]}
        assert {k: v.shape for k, v in mapped.items()} == want, ours
        kwargs, variant = df.unet_config(cfg)
        assert variant == ("sd1" if ours == "sd15" else "sd2")
        from edm_jax.nets.ldm_unet import SD_UNETS

        expected = dict(SD_UNETS[theirs], use_linear_in_transformer=variant == "sd2")
        assert {k: v for k, v in kwargs.items() if k != "image_size"} == {
            k: v for k, v in expected.items() if k != "image_size"
        }


# ---- folders written from the fixtures


def _write_tensors(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    reader.write_safetensors(path, tensors)


def _text_part(fixtures_dir, case):
    """(HF-named state_dict, config.json, pad token, (tokens, expected hidden states))."""
    name, key = ("openai", "text_hidden") if case == "sd1" else ("openclip", "sd2_penultimate_ln")
    arrays, sd = clip_fixture(fixtures_dir, name)
    sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)", k)))
    if case == "sd2":  # diffusers' SD 2 text encoder: the penultimate layer is the last
        layers -= 1
        sd = {k: v for k, v in sd.items() if not k.startswith(f"transformer.resblocks.{layers}.")}
    config = {"hidden_act": "quick_gelu" if case == "sd1" else "gelu", "num_attention_heads": 2,
              "num_hidden_layers": layers}  # fmt: skip
    pad = "<|endoftext|>" if case == "sd1" else "!"
    return openai_to_hf_text(sd), config, pad, (arrays["text_tokens"], arrays[key])


def write_folder(
    root, unet_sd, unet_kw, vae_sd, vae_config, text, prediction="epsilon", tokenizer_json=False
):
    """A diffusers SD folder: CompVis-named U-Net weights + their ldm_unet kwargs, a diffusers
    VAE state_dict + config.json text, text = (HF-named state_dict, config.json, pad token)."""
    _write_tensors(root / "unet/diffusion_pytorch_model.safetensors",
                   {diffusers_name(k, unet_kw["num_res_blocks"]): v for k, v in unet_sd.items()})  # fmt: skip
    (root / "unet/config.json").write_text(json.dumps(diffusers_unet_config(unet_kw)))
    _write_tensors(root / "vae/diffusion_pytorch_model.safetensors", vae_sd)
    (root / "vae/config.json").write_text(vae_config)
    text_sd, tcfg, pad = text
    _write_tensors(root / "text_encoder/model.safetensors", text_sd)
    (root / "text_encoder/config.json").write_text(json.dumps(tcfg))
    tok = root / "tokenizer"
    tok.mkdir()
    with gzip.open(FIXTURES / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    from edm_jax.clip.tokenizer import byte_unicode

    base = list(byte_unicode().values())
    words = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    if tokenizer_json:  # transformers 5 writes only tokenizer.json (+ tokenizer_config.json)
        model = {"type": "BPE", "vocab": vocab, "merges": [m.split() for m in merges]}
        (tok / "tokenizer.json").write_text(json.dumps({"model": model}))
        (tok / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
    else:  # the released folders: vocab.json + merges.txt + special_tokens_map.json
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        (tok / "vocab.json").write_text(json.dumps(vocab))
        (tok / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    sched = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": prediction}  # fmt: skip
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps(sched))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def fixture_folder(root, case, vae_ref):
    """The fixture networks as a folder: (folder, U-Net arrays, (tokens, hidden states))."""
    arrays, kw, unet_sd = unet_fixture(FIXTURES, case)
    vae_sd = {k[6:]: v for k, v in vae_ref.items() if k.startswith("param/")}
    text_sd, tcfg, pad, text_ref = _text_part(FIXTURES, case)
    prediction = "epsilon" if case == "sd1" else "v_prediction"
    write_folder(
        root, unet_sd, kw, vae_sd, str(vae_ref["config_json"]), (text_sd, tcfg, pad), prediction
    )
    return root, arrays, text_ref


@pytest.fixture(scope="module")
def vae_ref(fixtures_dir):
    with np.load(fixtures_dir / "vae_kl.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def folders(fixtures_dir, vae_ref, tmp_path_factory):
    """case -> (folder, U-Net fixture arrays, (tokens, hidden states)), written once each."""
    made = {}

    def get(case):
        if case not in made:
            root = tmp_path_factory.mktemp(case) / f"tiny-{case}"
            made[case] = fixture_folder(root, case, vae_ref)
        return made[case]

    return get


@pytest.mark.parametrize("case", ["sd1", "sd2"])
def test_folder_parts_match_the_fixtures(case, folders, vae_ref):
    """A folder's U-Net tensors go back to their CompVis names (the single-file path, whose
    outputs test_text_to_image checks against the references) with the fixture's heads; SD 2's
    23-layer text encoder gives OpenCLIP's penultimate layer + ln_final; the tokenizer pads as
    HF's; the scheduler gives the schedule and the prediction."""
    root, arrays, (tokens, hidden) = folders(case)
    configs, params, prediction = df.read_folder(root)
    assert (configs["variant"], prediction) == (case, "eps" if case == "sd1" else "v")
    # scaled_linear in float32 (diffusers) against the LDM schedule in float64 (CompVis)
    np.testing.assert_allclose(configs["alphas_cumprod"], arrays["alphas_cumprod"], rtol=2e-6)
    _, kw, unet_sd = unet_fixture(FIXTURES, case)
    heads = {k: kw[k] for k in ("num_heads", "num_head_channels") if k in kw}
    assert {k: configs["unet"][k] for k in heads} == heads
    written = reader.read_state_dict(str(root / "unet/diffusion_pytorch_model.safetensors"))
    renamed = df.compvis_unet_state_dict(
        written, json.loads((root / "unet/config.json").read_text())
    )
    assert renamed.keys() == unet_sd.keys()  # each tensor back under its CompVis name
    assert all(np.array_equal(renamed[k], v) for k, v in unet_sd.items())
    assert configs["vae"]["block_out_channels"] == (32, 64, 64) and "decoder" in params["vae"]
    enc = sd_text.text_encoder(case, configs["text"], df.check_tokenizer(root))
    ids = enc.tokenize(["a red cube"])[0]  # HF SD 1 pads with EOT, SD 2 with '!' (id 0)
    assert ids[0] == 49406 and list(ids).index(49407) == 4
    assert (ids[5:] == (49407 if case == "sd1" else 0)).all()
    if case == "sd2":  # the last of 23 layers + final LayerNorm = penultimate of 24 + ln_final
        text = fast_jit(enc.apply, params["text"], jnp.asarray(tokens, jnp.int32))
        assert maxrel(text, hidden) <= 2e-5


@pytest.fixture(scope="module")
def tiny_folder(fixtures_dir, tmp_path_factory):
    """test_text_to_image's tiny SD 1 networks (random U-Net and VAE, the fixture CLIP text
    tower) as a folder, its tokenizer as transformers 5 saves it (tokenizer.json)."""
    net = lu.ldm_unet(**E2E_UNET, context_dim=64)
    unet = random_params(jax.eval_shape(lambda: lu.init_ldm_unet(net, jax.random.key(0))), 3)
    vae = vae_lib.build_vae(E2E_VAE)
    vae_sd = vae_lib.to_state_dict(vae_lib.random_vae_params(4, vae))
    text_sd, tcfg, pad, _ = _text_part(FIXTURES, "sd1")
    root = tmp_path_factory.mktemp("tiny") / "tiny-sd1"
    vae_config = json.dumps(dataclasses.asdict(E2E_VAE))
    return write_folder(root, co.to_openai_state_dict(unet, net), E2E_UNET | {"context_dim": 64},
                        vae_sd, vae_config, (text_sd, tcfg, pad), tokenizer_json=True)  # fmt: skip


def test_sample_py_on_a_folder(tiny_folder, tmp_path):
    """sample.py --checkpoint FOLDER --prompt writes images; load_pipeline then reads the
    cache it left, equal to a fresh conversion."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    sample_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_py)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tiny_folder), "--prompt", "a red cube", "--steps", "2",
            "--seeds", "3", "--height", "16", "--width", "16", "--outdir", str(out),
            "--no-progress"]  # fmt: skip
    assert sample_py.main(argv) == 0
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (1, 16, 16, 3) and f["images"].std() > 1
    cache = tiny_folder.parent / (tiny_folder.name + ".edm_jax.npz")
    written = cache.stat().st_mtime_ns
    pipe, params = load.load_pipeline(tiny_folder)
    assert cache.stat().st_mtime_ns == written and (pipe.variant, pipe.prediction) == ("sd1", "eps")
    _, fresh, _ = df.read_folder(tiny_folder)
    jax.tree.map(np.testing.assert_array_equal, params, fresh)


def _edited(root, tmp_path, part, **changes):
    """A copy of the folder with one config.json changed."""
    copy = tmp_path / root.name
    shutil.copytree(root, copy)
    path = copy / part
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return copy


def test_bad_folders_one_line(tiny_folder, tmp_path):
    root = tiny_folder
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "empty", {}, "is a folder without model_index.json"),
        (root, dict(ema=True), "ema and config apply to single-file checkpoints"),
        (_edited(root, tmp_path / "a", "unet/config.json", class_embed_type="timestep"), {},
         "unet config class_embed_type='timestep' is not a Stable Diffusion 1/2 U-Net"),
        (_edited(root, tmp_path / "b", "unet/config.json", down_block_types=["SimpleDown"] * 3),
         {}, "unet config down_block_types has 'SimpleDown'; supported"),
        (_edited(root, tmp_path / "c", "scheduler/scheduler_config.json",
                 prediction_type="sample"), {}, "scheduler prediction_type 'sample'; supported"),
    ]  # fmt: skip
    for path, kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)) as info:
            load.load_pipeline(path, cache=False, **kw)
        assert "\n" not in str(info.value)
