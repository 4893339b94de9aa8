"""Flax CLIP against OpenAI's clip and open_clip (../shared/fixtures clip_*.npz): tokenizer ids,
embeddings, hidden states by layer, parameter counts and key sets, conversion and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.clip import convert
from edm_jax.clip import model as clip_model
from edm_jax.clip import tokenizer as tok
from edm_jax.nets.reader import write_safetensors

ARCH = {
    "openai_ViT-B-32": "ViT-B/32",
    "openai_ViT-B-16": "ViT-B/16",
    "openai_ViT-L-14": "ViT-L/14",
    "openai_ViT-L-14-336px": "ViT-L/14@336px",
    "openclip_ViT-H-14": "ViT-H-14",
}


def maxrel(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def vocab(fixtures_dir):
    return fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def tokenizer(vocab):
    return tok.Tokenizer(vocab)


def _load(fixtures_dir, name: str):
    z = np.load(fixtures_dir / name)
    kwargs = json.loads(str(z["config_json"]))["kwargs"]
    make = clip_model.CLIPConfig.openai if "openai" in name else clip_model.CLIPConfig.open_clip
    config = make(**kwargs)
    sd = {k.removeprefix("param/"): z[k] for k in z if k.startswith("param/")}
    return z, config, sd


@pytest.fixture(scope="module", params=["clip_openai.npz", "clip_openclip.npz"])
def case(request, fixtures_dir):
    z, config, sd = _load(fixtures_dir, request.param)
    params = convert.from_state_dict(sd, config)
    return request.param, z, config, sd, params


def test_tokenizer_ids_exact(fixtures_dir, tokenizer):
    z = np.load(fixtures_dir / "clip_tokenizer.npz")
    prompts = json.loads(str(z["prompts_json"]))
    assert [tok.clean(p) for p in prompts] == json.loads(str(z["cleaned_json"]))
    assert [tokenizer.pieces(p) for p in prompts] == json.loads(str(z["bpe_pieces_json"]))
    np.testing.assert_array_equal(tokenizer(prompts), z["ids"])
    np.testing.assert_array_equal(tokenizer(prompts), z["open_clip_ids"])
    counts = [tok.token_count(tokenizer, p) for p in prompts]
    np.testing.assert_array_equal(counts, z["n_tokens_untruncated"])


def test_tokenizer_truncation_and_refusal(tokenizer):
    long = "a photo of a cat " * 30
    ids = tokenizer([long])
    assert ids.shape == (1, 77) and ids[0, 0] == tok.SOT and ids[0, 76] == tok.EOT
    with pytest.raises(tok.TokenizerError, match="over the context of 77"):
        tokenizer([long], truncate=False)
    with pytest.warns(UserWarning, match="truncated to 77"):
        tok.tokenize_warn(tokenizer, [long])
    np.testing.assert_array_equal(tokenizer("")[0, :3], [tok.SOT, tok.EOT, 0])


def test_vocab_bad_paths(tmp_path):
    with pytest.raises(tok.TokenizerError, match="vocabulary path is empty"):
        tok.Tokenizer("")
    with pytest.raises(tok.TokenizerError, match="does not exist"):
        tok.Tokenizer(tmp_path / "nope.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(tok.TokenizerError, match="is not a gzip BPE merges file"):
        tok.Tokenizer(bad)


def test_clip_forward_matches_reference(case):
    name, z, config, _, params = case
    net = clip_model.CLIP(config)
    v = {"params": params}
    tokens = jnp.asarray(z["text_tokens"])
    images = jnp.asarray(np.transpose(z["pixel_values"], (0, 2, 3, 1)))
    text_layers = net.apply(v, tokens, method=lambda m, t: m.text.layers_out(t))
    vision_layers = net.apply(v, images, method=lambda m, x: m.visual.layers_out(x))
    got = {
        "encode_text": net.apply(v, tokens, method="encode_text"),
        "text_hidden": net.apply(v, tokens, method="text_hidden"),
        "text_layers": jnp.stack(text_layers),
        "encode_image": net.apply(v, images, method="encode_image"),
        "vision_layers": jnp.stack(vision_layers),
        "vision_pooled": net.apply(v, images, method=lambda m, x: m.visual.pooled(x)),
        "logits_per_image": net.apply(v, images, tokens)[0],
    }
    if "sd2_penultimate_ln" in z:
        got["sd2_penultimate_ln"] = net.apply(v, tokens, -2, method="text_hidden")
    for key, value in got.items():
        assert maxrel(value, z[key]) <= 2e-5, (name, key, maxrel(value, z[key]))
    pixels = clip_model.normalize_images(jnp.asarray(np.transpose(z["images"], (0, 2, 3, 1))))
    np.testing.assert_allclose(pixels, images, atol=1e-6)


def test_clip_float64_matches_reference64(case, x64):
    name, z, config, _, params = case
    net = clip_model.CLIP(config, dtype=jnp.float64)
    v = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)}
    text = net.apply(v, jnp.asarray(z["text_tokens"]), method="encode_text")
    image = net.apply(
        v,
        jnp.asarray(np.transpose(z["pixel_values"], (0, 2, 3, 1)), jnp.float64),
        method="encode_image",
    )
    # the float32 references are within 5.6e-7 of float64; a LayerNorm eps of 1e-6 costs 1.6e-5
    assert maxrel(text, z["encode_text64"]) < 2e-6, name
    assert maxrel(image, z["encode_image64"]) < 2e-6, name


def test_state_dict_round_trip_and_text_only(case, tmp_path):
    _, z, config, sd, params = case
    back = convert.to_state_dict(params)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.astype(np.float32), err_msg=key)
    # a file with OpenAI's non-parameter entries loads through the torch-free reader
    path = tmp_path / "clip.safetensors"
    write_safetensors(
        path, {**sd, "input_resolution": np.array(32), "context_length": np.array(77)}
    )
    loaded = convert.load(path, config)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    text = convert.from_state_dict(sd, config, text_only=True)
    assert set(text) == {"text"}
    tower = clip_model.text_tower(config)
    tokens = jnp.asarray(z["text_tokens"][:3])
    assert maxrel(tower.apply({"params": text["text"]}, tokens), z["encode_text"][:3]) <= 2e-5


def test_hugging_face_text_layout(case):
    """SD 1's text encoder layout (CLIPTextModel: q/k/v split, renamed) maps onto the same tower."""
    _, z, config, sd, params = case
    hf = {"text_model.embeddings.position_ids": np.arange(77)[None]}
    renames = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key, value in sd.items():
        if key.startswith("visual.") or key in ("logit_scale", "text_projection"):
            continue
        if key == "token_embedding.weight":
            hf["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            hf["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            hf["text_model.final_layer_norm." + key.split(".")[-1]] = value
        else:
            _, _, layer, rest = key.split(".", 3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[-1]
                for name, part in zip("qkv", np.split(value, 3), strict=True):
                    hf[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
                continue
            rest = rest.replace("attn.out_proj", "self_attn.out_proj")
            for a, b in renames.items():
                rest = rest.replace(a, b)
            hf[f"text_model.encoder.layers.{layer}.{rest}"] = value
    text = convert.from_state_dict(
        convert.hf_text_to_openai(hf), config, text_only=True, projection=False
    )
    tower = clip_model.text_tower(config, projection=False)
    hidden = tower.apply({"params": text["text"]}, jnp.asarray(z["text_tokens"]), method="hidden")
    assert maxrel(hidden, z["text_hidden"]) <= 2e-5


@pytest.mark.parametrize("key", list(ARCH))
def test_preset_counts_and_keys(fixtures_dir, key):
    z = np.load(fixtures_dir / "clip_arch.npz")
    config = clip_model.preset(ARCH[key])
    shapes = clip_model.param_shapes(config)
    assert clip_model.num_params(config) == int(z[f"{key}/num_params"])
    ref = {k: tuple(s) for k, s in json.loads(str(z[f"{key}/state_dict_json"]))}
    got = {k: v[2] for k, v in convert.name_map(shapes).items()}
    assert got == ref
    text = sum(int(np.prod(s)) for k, s in ref.items() if not k.startswith("visual."))
    assert text == int(z[f"{key}/num_params_text"])


def test_bad_input_is_one_line(case):
    _, _, config, sd, _ = case
    with pytest.raises(
        ValueError, match=r"unknown CLIP model 'ViT-B/61' \(did you mean 'ViT-B/16'\?\)"
    ):
        clip_model.preset("ViT-B/61")
    wrong = dict(sd)
    wrong["visual.proj"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"first mismatching key 'visual.proj' has shape \(3, 3\)"):
        convert.from_state_dict(wrong, config)
    with pytest.raises(
        ValueError, match=r"CLIP ViT-B/16: first mismatching key '[a-z_.]+' has shape"
    ):
        convert.from_state_dict(sd, clip_model.preset("ViT-B/16"), what="CLIP ViT-B/16")
