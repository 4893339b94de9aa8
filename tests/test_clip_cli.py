"""CLIP-guided sampling from sample.py on a digits-trained model with a small random CLIP."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from edm_jax.clip import convert
from edm_jax.clip import model as clip_model
from edm_jax.nets.reader import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = clip_model.CLIPConfig.openai(
    embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
)  # fmt: skip


def _run(*argv) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("sample").main([str(a) for a in argv])


def _error(capsys, *argv) -> str:
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A random tiny OpenAI-style CLIP saved as .safetensors in OpenAI's names."""
    net = clip_model.CLIP(TINY)
    params = net.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))[
        "params"
    ]
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    write_safetensors(path, convert.to_state_dict(params))
    return path


@pytest.fixture(scope="module")
def runs(tiny_run, clip_file, fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_runs")
    PIL.Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[:, None] * 16, (1, 16))).save(
        out / "prompt.png"
    )
    vocab = fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"
    common = ["--workdir", tiny_run, "--sampler", "dpmpp_2s_ancestral", "--steps", "4", "--no-progress",
              "--clip-weights", clip_file, "--clip-vocab", vocab]  # fmt: skip
    args = {
        "a4": ["--clip-prompt", "a handwritten zero", "--seeds", "0-3", "--batch", "4"],
        "a1": ["--clip-prompt", "a handwritten zero", "--seeds", "0-3", "--batch", "1"],
        "b4": [
            "--clip-prompt",
            "a photo of a dog:1|text:-0.5",
            "--seeds",
            "0-3",
            "--batch",
            "4",
            "--clip-image-prompt",
            f"{out / 'prompt.png'}:0.5",
        ],
    }
    images = {}
    for name, extra in args.items():
        assert _run(*common, *extra, "--outdir", out / name) == 0
        with np.load(out / name / "samples.npz") as f:
            images[name] = f["images"]
    plain = [
        "--workdir",
        tiny_run,
        "--sampler",
        "dpmpp_2s_ancestral",
        "--steps",
        "4",
        "--no-progress",
    ]
    assert _run(*plain, "--seeds", "0-3", "--outdir", out / "plain") == 0
    with np.load(out / "plain" / "samples.npz") as f:
        images["plain"] = f["images"]
    return images


def test_guided_samples_follow_the_prompt_and_seed(runs):
    a4, a1, b4, plain = runs["a4"], runs["a1"], runs["b4"], runs["plain"]
    assert a4.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(a4, a1)  # batch-invariant per seed
    assert np.abs(a4.astype(int) - b4.astype(int)).max() > 0  # another prompt, other samples
    assert np.abs(a4.astype(int) - plain.astype(int)).max() > 0  # guidance changes them
    assert len({a4[i].tobytes() for i in range(4)}) == 4  # seeds differ


def test_clip_flag_errors(capsys, tiny_run, clip_file, fixtures_dir, tmp_path):
    base = ["--workdir", tiny_run, "--outdir", tmp_path, "--clip-prompt", "a cat"]
    assert "did you mean 'ViT-B/16'" in _error(
        capsys, *base, "--clip-weights", clip_file, "--clip-model", "ViT-B/61"
    )
    assert "--clip-prompt needs --clip-weights" in _error(capsys, *base)
    assert "vocabulary path is empty" in _error(
        capsys, *base, "--clip-weights", clip_file, "--clip-vocab", ""
    )
    wrong = _error(capsys, *base, "--clip-weights", clip_file, "--clip-model", "ViT-B/32",
                   "--clip-vocab", fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")  # fmt: skip
    assert "state_dict does not match the CLIP ViT-B/32: first mismatching key" in wrong
    assert "no image file" in _error(capsys, *base, "--clip-weights", clip_file,
                                     "--clip-image-prompt", tmp_path / "missing.png:1")  # fmt: skip
    assert "--clip-weights needs --clip-prompt" in _error(
        capsys, "--workdir", tiny_run, "--outdir", tmp_path, "--clip-weights", clip_file
    )
