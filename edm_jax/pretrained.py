"""Released models from elsewhere (guided-diffusion, v-diffusion) as ``(model, params, config)``.

``load_pretrained(path, family=None, classifier=..., classifier_scale=...)`` returns the same
triple as ``edm_jax.load``, so ``edm_jax.sample(rng, params, model, ...)`` samples it with
every sampler:

- guided-diffusion ``UNetModel`` checkpoints (``64x64_diffusion.pt`` ... ``512x512_diffusion.pt``)
  become k-diffusion's ``OpenAIDenoiser`` over the model's noise schedule (learned-sigma half
  dropped), pixel outputs clipped to [-1, 1]; a guided-diffusion classifier checkpoint
  (``256x256_classifier.pt``) wraps it in ``ClassifierGuidedModel`` (params become
  ``(params, classifier_params)``, as ``scripts/classifier_sample.py`` with
  ``classifier_scale``).
- v-diffusion-pytorch zoo checkpoints (``cc12m_1.pth``, ``wikiart_256.pth``, ...) become
  k-diffusion's ``VDenoiser`` (cc12m_1 needs ``clip_embed``).

Files are ``.pt``/``.pth``/``.ckpt`` (torch pickles) or ``.safetensors`` read as data by the
restricted reader (nothing in them is executed), or the ``.npz`` that ``python -m
edm_jax.convert SRC --family F --out DST.npz`` writes (converted Flax params, the fast path).
The family comes from the released file name where it is recognisable (``RELEASED_FILES``),
else from ``family`` (a name of ``FAMILIES`` or a ``Family`` describing another size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax import wrappers
from edm_jax.checks import did_you_mean
from edm_jax.fileio import atomic_open
from edm_jax.guidance import ClassifierGuidedModel
from edm_jax.nets import convert_openai as co
from edm_jax.nets import openai_unet as ou
from edm_jax.nets import vdiffusion as vd
from edm_jax.nets.reader import read_state_dict

__all__ = [
    "FAMILIES", "KINDS", "RELEASED_FILES", "Family", "add_arguments", "build_network",
    "convert_main", "is_pretrained_file", "load_for_cli", "load_pretrained", "read_weights",
    "resolve_family", "save_converted",
]  # fmt: skip

KINDS = ("guided-diffusion", "classifier", "v-diffusion")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_NPZ_KEY = "edm_jax_pretrained"  # json header of a converted .npz
_PARAM = "params/"  # converted .npz: one array per Flax params path, '/'-joined


@dataclasses.dataclass(frozen=True)
class Family:
    """A network family: a released configuration by name, or a custom one by ``arch``.

    ``released``: an ``openai_unet.released_model`` / ``vdiffusion.VD_PRESETS`` name. Without
    it ``arch`` holds the constructor fields: ``openai_unet.openai_unet`` (guided-diffusion),
    ``EncoderUNet`` (classifier) or ``VDiffusionUNet`` (v-diffusion, with ``image_size`` and
    ``t_range``). ``schedule`` is a guided-diffusion model's noise schedule.
    """

    name: str
    kind: str
    released: str = ""
    arch: dict = dataclasses.field(default_factory=dict)
    schedule: str = "linear"
    image_size: int = 0
    t_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown family kind {self.kind!r}; valid: {list(KINDS)}")
        if bool(self.released) == bool(self.arch):
            raise ValueError(f"family {self.name!r}: give exactly one of released and arch")
        if self.schedule not in wrappers.GUIDED_DIFFUSION_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; "
                             f"valid: {list(wrappers.GUIDED_DIFFUSION_SCHEDULES)}")  # fmt: skip


GD, CLS, VD = KINDS
FAMILIES: dict[str, Family] = {
    "guided-diffusion-64": Family("guided-diffusion-64", GD, "64x64_diffusion", schedule="cosine"),
    "guided-diffusion-128": Family("guided-diffusion-128", GD, "128x128_diffusion"),
    "guided-diffusion-256": Family("guided-diffusion-256", GD, "256x256_diffusion"),
    "guided-diffusion-256-uncond": Family(
        "guided-diffusion-256-uncond", GD, "256x256_diffusion_uncond"
    ),
    "guided-diffusion-512": Family("guided-diffusion-512", GD, "512x512_diffusion"),
    "guided-diffusion-classifier-64": Family("guided-diffusion-classifier-64", CLS, "64x64_classifier"),
    "guided-diffusion-classifier-128": Family(
        "guided-diffusion-classifier-128", CLS, "128x128_classifier"
    ),
    "guided-diffusion-classifier-256": Family(
        "guided-diffusion-classifier-256", CLS, "256x256_classifier"
    ),
    "guided-diffusion-classifier-512": Family(
        "guided-diffusion-classifier-512", CLS, "512x512_classifier"
    ),
    "v-diffusion-cc12m_1": Family("v-diffusion-cc12m_1", VD, "cc12m_1"),
    "v-diffusion-cc12m_1_cfg": Family("v-diffusion-cc12m_1_cfg", VD, "cc12m_1_cfg"),
    "v-diffusion-yfcc_1": Family("v-diffusion-yfcc_1", VD, "yfcc_1"),
    "v-diffusion-yfcc_2": Family("v-diffusion-yfcc_2", VD, "yfcc_2"),
    "v-diffusion-wikiart_256": Family("v-diffusion-wikiart_256", VD, "wikiart_256"),
    "v-diffusion-wikiart_128": Family("v-diffusion-wikiart_128", VD, "wikiart_128"),
    "v-diffusion-danbooru_128": Family("v-diffusion-danbooru_128", VD, "danbooru_128"),
    "v-diffusion-imagenet_128": Family("v-diffusion-imagenet_128", VD, "imagenet_128"),
}  # fmt: skip
# Released file stems (guided-diffusion's and v-diffusion-pytorch's download names) -> family.
RELEASED_FILES: dict[str, str] = {f.released: name for name, f in FAMILIES.items()}


# --------------------------------------------------------------------------- families


def _family_by_name(name: str) -> Family:
    """FAMILIES[name], or the family of a released file stem; one line listing them otherwise."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in RELEASED_FILES:
        return FAMILIES[RELEASED_FILES[name]]
    hint = did_you_mean(name, [*FAMILIES, *RELEASED_FILES])
    raise ValueError(f"unknown family {name!r}{hint}; valid: {sorted(FAMILIES)}")


def infer_family(path: str | os.PathLike) -> Family | None:
    """The family whose released file name the file's name contains (the longest), or None."""
    name = Path(os.fspath(path)).name.lower()
    found = [stem for stem in RELEASED_FILES if stem in name]
    return FAMILIES[RELEASED_FILES[max(found, key=len)]] if found else None


def resolve_family(path: str | os.PathLike, family: str | Family | None) -> Family:
    """The family of a checkpoint: given (name or Family), or inferred from the file name."""
    if isinstance(family, Family):
        return family
    if family is not None:
        return _family_by_name(str(family))
    found = infer_family(path)
    if found is None:
        raise ValueError(
            f"cannot tell the model family of {os.fspath(path)} from its name: pass --family "
            f"(family=); valid: {sorted(FAMILIES)}"
        )
    return found


def build_network(family: Family, dtype: Any = jnp.float32) -> Any:
    """The Flax network of a family (compute in dtype; parameters are float32)."""
    if family.kind == VD:
        if family.released:
            return vd.build_vd_net(family.released, dtype)
        return vd.VDiffusionUNet(**family.arch, dtype=dtype)
    if family.released:
        return ou.released_model(family.released, dtype)
    if family.kind == CLS:
        return ou.EncoderUNet(**family.arch, dtype=dtype)
    return ou.openai_unet(**family.arch, dtype=dtype)


def _schedule(family: Family) -> str:
    """A guided-diffusion model's noise schedule (released ones: the README's)."""
    return ou.NOISE_SCHEDULES[family.released] if family.released else family.schedule


# --------------------------------------------------------------------------- weights


def _convert(state_dict: dict[str, np.ndarray], family: Family, net: Any) -> dict:
    """Flax params from a reference state_dict; one line naming the first mismatching key."""
    if family.kind == VD:
        shapes = vd.torch_shapes(net)
        co.check_state_dict(state_dict, net, family.name, expected=shapes)
        return vd.from_vd_state_dict(state_dict, net)
    return co.from_openai_state_dict(state_dict, net, family=family.name)


def _tuples(x: Any) -> Any:
    """json lists back to tuples (network fields are tuples), recursively."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def _converted_family(path: str) -> Family | None:
    """The family recorded in a converted .npz (None for any other .npz); reads the header only."""
    with np.load(path, allow_pickle=False) as z:
        if _NPZ_KEY not in z.files:
            return None
        head = json.loads(str(z[_NPZ_KEY]))
    return Family(**_tuples(head["family"]))


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")


def _family_of(path: str, family: str | Family | None) -> Family:
    """The family of a checkpoint or converted .npz (before reading any weights)."""
    _check_file(path)
    if not path.endswith(".npz"):
        return resolve_family(path, family)
    stored = _converted_family(path)
    if stored is None:
        raise ValueError(f"{path} is not a converted checkpoint (python -m edm_jax.convert "
                         "writes them); give the .pt/.pth/.safetensors file")  # fmt: skip
    if family is not None and resolve_family(path, family) != stored:
        raise ValueError(
            f"{path} holds {stored.name!r} weights, not {resolve_family(path, family).name!r}"
        )
    return stored


def read_weights(
    path: str | os.PathLike, family: str | Family | None = None
) -> tuple[Family, dict]:
    """(family, float32 Flax params) of a checkpoint file or a converted .npz."""
    path = os.fspath(path)
    fam = _family_of(path, family)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            flat = {
                tuple(k[len(_PARAM) :].split("/")): z[k] for k in z.files if k.startswith(_PARAM)
            }
        return fam, traverse_util.unflatten_dict(flat)
    return fam, _convert(read_state_dict(path), fam, build_network(fam))


def save_converted(path: str | os.PathLike, family: Family, params: dict) -> None:
    """Write params and family as a .npz atomically (temp file beside it, then os.replace)."""
    head = json.dumps({"format": 1, "family": dataclasses.asdict(family)})
    flat = traverse_util.flatten_dict(params)
    arrays: dict[str, Any] = {
        _PARAM + "/".join(k): np.asarray(v, np.float32) for k, v in flat.items()
    }
    arrays[_NPZ_KEY] = np.asarray(head)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def is_pretrained_file(path: str | os.PathLike) -> bool:
    """True for a torch / safetensors checkpoint file or a converted .npz (not our runs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.endswith(".npz"):
        return _converted_family(path) is not None
    return path.lower().endswith(CHECKPOINT_SUFFIXES)


# --------------------------------------------------------------------------- models


def _gd_model(family: Family, net: Any) -> wrappers.SamplingModel:
    """A guided-diffusion U-Net as k-diffusion's OpenAIDenoiser, samplable by edm_jax.sample."""
    ac = wrappers.guided_diffusion_alphas_cumprod(_schedule(family))

    def model(x_in, t, params=None, labels=None):  # labels: one-hot [B, 1000] or None
        return net.apply({"params": params}, x_in, t, labels)

    learned = net.out_channels == 2 * net.in_channels  # learn_sigma: eps, then the variance
    den = wrappers.OpenAIDenoiser(model, ac, has_learned_sigmas=learned)
    shape = (net.img_resolution, net.img_resolution, net.in_channels)
    return wrappers.SamplingModel(den, shape, label_dim=net.label_dim, clip_output=True)


def _vd_model(family: Family, net: Any, clip_embed) -> wrappers.SamplingModel:
    """A v-diffusion network as k-diffusion's VDenoiser (pixel outputs clipped to [-1, 1])."""
    if family.released:
        preset = vd.vd_preset(family.released)
        size, t_range = preset.size, preset.t_range
    else:
        size, t_range = family.image_size, (family.t_range[0], family.t_range[1])
    model = vd.vd_sampling_model(net, size, t_range=t_range, clip_embed=clip_embed)
    return dataclasses.replace(model, clip_output=True)


def _guided(model, family: Family, cfam: Family, cnet: Any, scale: float) -> ClassifierGuidedModel:
    """model guided by a guided-diffusion classifier at the model's own t(sigma)."""
    if family.kind != GD:
        raise ValueError(
            f"a classifier guides guided-diffusion models; {family.name!r} is {family.kind}"
        )
    if cfam.kind != CLS:
        raise ValueError(f"the classifier checkpoint holds a {cfam.kind} model ({cfam.name!r}), "
                         "not a guided-diffusion classifier")  # fmt: skip
    res = model.image_shape[0]
    if cnet.img_resolution != res:
        raise ValueError(f"classifier {cfam.name!r} is for {cnet.img_resolution}x"
                         f"{cnet.img_resolution} images; the model makes {res}x{res}")  # fmt: skip

    def classifier(x_in, t, params):
        return cnet.apply({"params": params}, x_in, t)

    sigma_to_t = model.denoiser.sigma_to_t
    return ClassifierGuidedModel(model, classifier, cnet.out_channels, scale, sigma_to_t=sigma_to_t)


def load_pretrained(
    path: str | os.PathLike,
    family: str | Family | None = None,
    *,
    classifier: str | os.PathLike | None = None,
    classifier_family: str | Family | None = None,
    classifier_scale: float = 1.0,
    clip_embed=None,
    dtype: Any = jnp.float32,
) -> tuple[Any, Any, dict]:
    """(model, params, config) of a released guided-diffusion / v-diffusion checkpoint.

    The same triple as ``edm_jax.load``. ``family``: a ``FAMILIES`` name, a released file
    stem or a ``Family``; None infers it from the file name. ``classifier``: a guided-diffusion
    classifier checkpoint; the model is then a ``ClassifierGuidedModel`` and params are
    ``(params, classifier_params)``. Every check (families, sizes) runs before any weights
    are read; weights of another family raise one line naming the first mismatching key.
    """
    path = os.fspath(path)
    fam = _family_of(path, family)
    if fam.kind == CLS:
        raise ValueError(
            f"{path} is a classifier ({fam.name!r}): pass it as classifier= "
            "(--classifier) beside a guided-diffusion model"
        )
    net = build_network(fam, dtype)
    model: Any = _gd_model(fam, net) if fam.kind == GD else _vd_model(fam, net, clip_embed)
    config = {"family": fam.name, "kind": fam.kind, "source": path,
              "image_shape": list(model.image_shape), "label_dim": model.label_dim}  # fmt: skip
    if classifier is not None:
        cpath = os.fspath(classifier)
        cfam = _family_of(cpath, classifier_family)
        cnet = build_network(cfam, dtype)
        model = _guided(model, fam, cfam, cnet, classifier_scale)
        config.update(
            classifier=cpath, classifier_family=cfam.name, classifier_scale=classifier_scale
        )
    params: Any = read_weights(path, fam)[1]
    if classifier is not None:
        params = (params, read_weights(cpath, cfam)[1])
    return model, params, config


# --------------------------------------------------------------------------- command lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """sample.py's flags for checkpoints from elsewhere (--family, --classifier, ...)."""
    parser.add_argument("--family", default=None,
                        help="model family of a foreign --checkpoint file (.pt/.pth/"
                        f".safetensors/converted .npz); inferred from released file names; "
                        f"one of {sorted(FAMILIES)}")  # fmt: skip
    parser.add_argument(
        "--classifier",
        default=None,
        help="guided-diffusion classifier checkpoint: classifier guidance",
    )
    parser.add_argument(
        "--classifier-scale",
        type=float,
        default=1.0,
        help="classifier guidance scale (classifier_sample.py's)",
    )


def load_for_cli(args: argparse.Namespace, load: Any) -> tuple[Any, Any, dict]:
    """sample.py's model: a foreign checkpoint through load_pretrained, else load(path)."""
    path = args.workdir or args.checkpoint or args.reference_npz
    foreign = args.checkpoint is not None and (
        args.family is not None or is_pretrained_file(args.checkpoint)
    )
    if foreign and args.family is None and args.classifier is None:
        if infer_family(args.checkpoint) is None:  # k-diffusion's .pth / .safetensors: by content
            return load(args.checkpoint)
    if not foreign:
        if args.family or args.classifier:
            raise ValueError("--family and --classifier apply to a foreign --checkpoint file "
                             f"(.pt/.pth/.safetensors/converted .npz), not {path}")  # fmt: skip
        return load(path)
    if args.cfg_scale != 1.0:
        raise ValueError(f"--cfg-scale {args.cfg_scale}: {args.checkpoint} has no trained "
                         "unconditional branch; use --classifier with --classifier-scale")  # fmt: skip
    return load_pretrained(args.checkpoint, args.family, classifier=args.classifier,
                           classifier_scale=args.classifier_scale)  # fmt: skip


def convert_main(argv: list[str] | None = None) -> int:
    """python -m edm_jax.convert SRC [--family F] --out DST.npz: convert once, load fast after."""
    p = argparse.ArgumentParser(prog="python -m edm_jax.convert", description=convert_main.__doc__)
    p.add_argument("src", help="guided-diffusion / v-diffusion checkpoint (.pt/.pth/.safetensors)")
    p.add_argument(
        "--family", default=None, help=f"one of {sorted(FAMILIES)} (default: from the name)"
    )
    p.add_argument("--out", required=True, help="the .npz to write (atomically)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    args = p.parse_args(argv)
    try:
        if not args.out.endswith(".npz"):
            raise ValueError(f"--out {args.out!r} must end in .npz")
        if args.src.endswith(".npz"):
            raise ValueError(f"{args.src} is already a .npz; convert the original checkpoint")
        fam, params = read_weights(args.src, args.family)
        save_converted(args.out, fam, params)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        if args.debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {fam.name} params to {args.out}")
    return 0
