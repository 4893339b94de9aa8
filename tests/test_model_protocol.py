"""Every model kind ``edm_jax.sample`` takes implements ``types.SampleableModel`` explicitly.

Each kind is built without parameters (Flax modules are lazy), checked with isinstance against
the runtime-checkable Protocol, and its values against what it wraps (precond, config, schedule,
inner model). api.py reads the interface directly: no getattr/hasattr on the model, and the
guided wrappers forward the Protocol only (no ``__getattr__``).
"""

import ast
import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import guidance, pretrained, wrappers
from edm_jax.clip import guidance as clip_guidance
from edm_jax.clip import model as clip_model
from edm_jax.nets import kdiff_config, kdiff_models, ldm_unet, vae, vdiffusion
from edm_jax.nets.model import LatentEncoder
from edm_jax.nets.presets import build_model
from edm_jax.precond import IDDPMPrecond
from edm_jax.sd import pipeline
from edm_jax.types import SampleableModel

ROOT = Path(__file__).resolve().parents[1]
INF = math.inf
TINY = dict(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=())


def _edm(label_dim=10, **kw):
    return build_model(
        "ddpmpp", img_resolution=8, img_channels=3, label_dim=label_dim, **TINY, **kw
    )


def _sd() -> pipeline.TextConditionedModel:
    text = pipeline.TextEncoder(lambda prompts: np.zeros((len(prompts), 77), np.int32),
                                lambda params, ids: ids, context_dim=768)  # fmt: skip
    pipe = pipeline.StableDiffusion(
        ldm_unet.released_unet("sd15"), vae.build_vae("sd-vae-ft-mse"), text, "eps", "sd1"
    )
    return pipeline.TextConditionedModel(pipe, (8, 8, 4))


def _gd() -> wrappers.SamplingModel:
    family = pretrained.FAMILIES["guided-diffusion-64"]
    return pretrained._gd_model(family, pretrained.build_network(family))


def _kdiff(fixtures_dir) -> kdiff_models.KDiffusionModel:
    text = json.loads((fixtures_dir / "kdiff_configs.json").read_text())["configs"]
    config = kdiff_config.load_config(json.loads(text["config_mnist.json"]["text"]))
    return kdiff_models.from_config(config)


def _want(shape, label_dim, lo=0.0, hi=INF, *, clip=True, null="zero", key=False, latent=False):
    """The Protocol's values: (image_shape, label_dim, sigma_min, sigma_max, clip_output,
    null_label, takes_key, encoder is not None)."""
    return shape, label_dim, lo, hi, clip, null, key, latent


@pytest.fixture(scope="module")
def kinds(fixtures_dir) -> dict:
    """name -> (model, its Protocol values as _want gives them)."""
    edm, gd = _edm(), _gd()
    iddpm = build_model("adm", precond="iddpm", img_resolution=8, img_channels=3, **TINY)
    edm2 = build_model("edm2-img512-xs", img_resolution=8, img_channels=4, label_dim=1000)
    latent = dataclasses.replace(edm2, encoder=LatentEncoder("sd-vae-ft-mse", "vae.npz"))
    uncond = build_model("edm2-img512-xs", img_resolution=8, img_channels=4)
    table = wrappers.OpenAIDenoiser(None, wrappers.guided_diffusion_alphas_cumprod("cosine"))
    gd_range = (float(table.sigma_min), float(table.sigma_max))
    vd_family = pretrained.FAMILIES["v-diffusion-wikiart_128"]
    vd = pretrained._vd_model(vd_family, pretrained.build_network(vd_family), None)
    vd_range = tuple(math.tan(t * math.pi / 2) for t in vdiffusion.vd_preset("wikiart_128").t_range)
    u = IDDPMPrecond().u
    cls = guidance.ClassifierGuidedModel(gd, lambda x, t, p: x, 1000, 1.0,
                                         sigma_to_t=gd.denoiser.sigma_to_t)  # fmt: skip
    clip = clip_guidance.CLIPGuidedModel(
        edm, clip_model.preset("ViT-B/32"), np.zeros((1, 512)), (1.0,)
    )
    sd, gd_want = _sd(), _want((64, 64, 3), 1000, *gd_range)
    latent_want = _want((8, 8, 4), 1000, clip=False, latent=True)
    return {
        "edm": (edm, _want((8, 8, 3), 10)),
        "edm-learned-null": (_edm(null_label="learned"), _want((8, 8, 3), 10, null="learned")),
        "iddpm": (iddpm, _want((8, 8, 3), 0, float(np.float32(u[999])), float(np.float32(u[0])))),
        "edm2-latent": (latent, latent_want),
        "kdiffusion": (_kdiff(fixtures_dir), _want((28, 28, 1), 0, 0.01, 80.0)),
        "guided-diffusion": (gd, gd_want),
        "v-diffusion": (vd, _want((128, 128, 3), 0, *vd_range)),
        "sd": (sd, _want((8, 8, 4), 0, sd.pipe.sigma_min, sd.pipe.sigma_max, clip=False)),
        "autoguidance": (guidance.GuidedModel(edm, _edm(), 2.0), _want((8, 8, 3), 10)),
        "edm2-cfg-guide": (guidance.GuidedModel(latent, uncond, 1.5), latent_want),
        "classifier": (cls, gd_want),
        "clip": (clip, _want((8, 8, 3), 10, key=True)),
    }


KINDS = ["edm", "edm-learned-null", "iddpm", "edm2-latent", "kdiffusion", "guided-diffusion",
         "v-diffusion", "sd", "autoguidance", "edm2-cfg-guide", "classifier", "clip"]  # fmt: skip


@pytest.mark.parametrize("name", KINDS)
def test_every_model_kind_implements_the_protocol(kinds, name):
    model, want = kinds[name]
    assert isinstance(model, SampleableModel)
    got = (
        tuple(model.image_shape), model.label_dim, pytest.approx(model.sigma_min, rel=1e-6),
        pytest.approx(model.sigma_max, rel=1e-6), model.clip_output, model.null_label,
        model.takes_key, model.encoder is not None,
    )  # fmt: skip
    assert got == want
    sigmas = jnp.asarray([0.5, 1.0, 7.0], jnp.float32)
    if name != "iddpm":  # continuous sigma: sampled at the schedule's values as they are
        np.testing.assert_array_equal(model.round_sigma(sigmas), sigmas)


def test_round_sigma_of_a_discrete_model_is_its_nearest_level(kinds):
    model, _ = kinds["iddpm"]
    u = np.float32(IDDPMPrecond().u)
    sigmas = np.asarray([0.5, 1.0, 7.0], np.float32)
    want = u[np.abs(sigmas[:, None] - u).argmin(-1)]
    np.testing.assert_array_equal(model.round_sigma(jnp.asarray(sigmas)), want)
    assert not np.array_equal(want, sigmas)  # the rounding does something here


def test_a_partial_model_is_not_sampleable():
    """The Protocol check has teeth: a model without round_sigma / sigma range fails it."""

    @dataclasses.dataclass(frozen=True)
    class Partial:
        label_dim: int = 0
        image_shape: tuple = (2, 2, 1)

        def denoise(self, params, x, sigma, labels=None):
            return x

    assert not isinstance(Partial(), SampleableModel)


def test_guided_wrappers_forward_the_protocol_only(kinds):
    model, _ = kinds["autoguidance"]
    assert model.main.precond is not None
    with pytest.raises(AttributeError):
        model.precond  # noqa: B018 - no arbitrary forwarding any more
    for cls in (guidance.GuidedModel, guidance.ClassifierGuidedModel,
                clip_guidance.CLIPGuidedModel):  # fmt: skip
        assert "__getattr__" not in vars(cls) and "__getattr__" not in vars(guidance.WrappedModel)


def _getattr_calls(path: Path) -> list[str]:
    """'line: source' of every getattr/hasattr call in a module."""
    source = path.read_text()
    return [
        f"{node.lineno}: {ast.get_source_segment(source, node)}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
    ]


def test_api_reads_the_model_interface_directly():
    """api.py takes no attribute of the model through getattr with a silent default."""
    assert _getattr_calls(ROOT / "edm_jax" / "api.py") == []
    assert _getattr_calls(ROOT / "edm_jax" / "guidance.py") == []


def test_a_checkpoint_spec_gives_the_latent_encoder_object():
    """The spec's [VAE, weights] becomes one LatentEncoder (equal to the pair, hashable)."""
    from edm_jax.nets.spec import model_from_spec

    spec = {"arch": "ddpmpp", "precond": "edm", "img_resolution": 8, "img_channels": 4,
            "net": dict(TINY), "encoder": ["sd-vae-ft-mse", "vae.npz"]}  # fmt: skip
    model = model_from_spec(spec)
    assert isinstance(model.encoder, LatentEncoder) and model.clip_output is False
    assert model.encoder == ("sd-vae-ft-mse", "vae.npz") and model.encoder.weights == "vae.npz"
    assert hash(model) == hash(dataclasses.replace(model))  # still a jit cache key
