"""NVlabs/edm2 generate_images.py presets: released post-hoc EMA checkpoints and guidance.

``GENERATE_PRESETS[name] = (net, guide or None, guidance)``: each network is named as its
released pickle, ``<training preset>-<kimg>-<ema std>``, so ``parse_checkpoint_name`` gives
the architecture (``build_model`` preset; ``-uncond`` = label_dim 0), the training time and
the post-hoc EMA std to reconstruct (``python -m edm_jax.train.phema --std ...``). Guidance
follows EDM2's D = D_guide + g (D_main - D_guide): an unconditional guide is classifier-free
guidance, a smaller / earlier conditional one autoguidance. Export a pickle's ``ema``
state_dict to .npz (config_json + param/*) to load it with ``edm_jax.load``.
"""

from __future__ import annotations

import re

MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"

_U = "edm2-img512-xs-uncond-2147483"  # the unconditional guide of every img512 -guid- preset
GENERATE_PRESETS: dict[str, tuple[str, str | None, float]] = {
    "edm2-img512-xs-fid": ("edm2-img512-xs-2147483-0.135", None, 1.0),
    "edm2-img512-xs-dino": ("edm2-img512-xs-2147483-0.200", None, 1.0),
    "edm2-img512-s-fid": ("edm2-img512-s-2147483-0.130", None, 1.0),
    "edm2-img512-s-dino": ("edm2-img512-s-2147483-0.190", None, 1.0),
    "edm2-img512-m-fid": ("edm2-img512-m-2147483-0.100", None, 1.0),
    "edm2-img512-m-dino": ("edm2-img512-m-2147483-0.155", None, 1.0),
    "edm2-img512-l-fid": ("edm2-img512-l-1879048-0.085", None, 1.0),
    "edm2-img512-l-dino": ("edm2-img512-l-1879048-0.155", None, 1.0),
    "edm2-img512-xl-fid": ("edm2-img512-xl-1342177-0.085", None, 1.0),
    "edm2-img512-xl-dino": ("edm2-img512-xl-1342177-0.155", None, 1.0),
    "edm2-img512-xxl-fid": ("edm2-img512-xxl-0939524-0.070", None, 1.0),
    "edm2-img512-xxl-dino": ("edm2-img512-xxl-0939524-0.150", None, 1.0),
    "edm2-img64-s-fid": ("edm2-img64-s-1073741-0.075", None, 1.0),
    "edm2-img64-m-fid": ("edm2-img64-m-2147483-0.060", None, 1.0),
    "edm2-img64-l-fid": ("edm2-img64-l-1073741-0.040", None, 1.0),
    "edm2-img64-xl-fid": ("edm2-img64-xl-0671088-0.040", None, 1.0),
    "edm2-img512-xs-guid-fid": ("edm2-img512-xs-2147483-0.045", f"{_U}-0.045", 1.40),
    "edm2-img512-xs-guid-dino": ("edm2-img512-xs-2147483-0.150", f"{_U}-0.150", 1.70),
    "edm2-img512-s-guid-fid": ("edm2-img512-s-2147483-0.025", f"{_U}-0.025", 1.40),
    "edm2-img512-s-guid-dino": ("edm2-img512-s-2147483-0.085", f"{_U}-0.085", 1.90),
    "edm2-img512-m-guid-fid": ("edm2-img512-m-2147483-0.030", f"{_U}-0.030", 1.20),
    "edm2-img512-m-guid-dino": ("edm2-img512-m-2147483-0.015", f"{_U}-0.015", 2.00),
    "edm2-img512-l-guid-fid": ("edm2-img512-l-1879048-0.015", f"{_U}-0.015", 1.20),
    "edm2-img512-l-guid-dino": ("edm2-img512-l-1879048-0.035", f"{_U}-0.035", 1.70),
    "edm2-img512-xl-guid-fid": ("edm2-img512-xl-1342177-0.020", f"{_U}-0.020", 1.20),
    "edm2-img512-xl-guid-dino": ("edm2-img512-xl-1342177-0.030", f"{_U}-0.030", 1.70),
    "edm2-img512-xxl-guid-fid": ("edm2-img512-xxl-0939524-0.015", f"{_U}-0.015", 1.20),
    "edm2-img512-xxl-guid-dino": ("edm2-img512-xxl-0939524-0.015", f"{_U}-0.015", 1.70),
    "edm2-img512-s-autog-fid": ("edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", 2.10),
    "edm2-img512-s-autog-dino": ("edm2-img512-s-2147483-0.120", "edm2-img512-xs-0134217-0.165", 2.45),
    "edm2-img512-xxl-autog-fid": ("edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", 2.05),
    "edm2-img512-xxl-autog-dino": ("edm2-img512-xxl-0939524-0.130", "edm2-img512-m-0268435-0.205", 2.30),
    "edm2-img512-s-uncond-autog-fid": (
        "edm2-img512-s-uncond-2147483-0.070", "edm2-img512-xs-uncond-0134217-0.110", 2.85),
    "edm2-img512-s-uncond-autog-dino": (
        "edm2-img512-s-uncond-2147483-0.090", "edm2-img512-xs-uncond-0134217-0.125", 2.90),
    "edm2-img64-s-autog-fid": ("edm2-img64-s-1073741-0.045", "edm2-img64-xs-0134217-0.110", 1.70),
    "edm2-img64-s-autog-dino": ("edm2-img64-s-1073741-0.105", "edm2-img64-xs-0134217-0.175", 2.20),
}  # fmt: skip

_NAME = re.compile(r"(edm2-img(?:512|64)-[a-z]+)(-uncond)?-(\d{7})-(\d\.\d{3})")


def parse_checkpoint_name(name: str) -> dict:
    """'edm2-img512-xs-uncond-0134217-0.110' -> preset, label_dim, kimg, std."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"not an EDM2 checkpoint name <preset>[-uncond]-<kimg>-<std>: {name!r}")
    return {
        "preset": m.group(1),
        "label_dim": 0 if m.group(2) else 1000,
        "kimg": int(m.group(3)),
        "std": float(m.group(4)),
    }


def generate_preset(name: str) -> dict:
    """The networks (parsed names, URLs) and guidance scale of a generate_images.py preset."""
    if name not in GENERATE_PRESETS:
        raise ValueError(
            f"unknown EDM2 generate preset {name!r}; valid: {sorted(GENERATE_PRESETS)}"
        )
    net, gnet, guidance = GENERATE_PRESETS[name]
    out = {
        "net": parse_checkpoint_name(net) | {"url": f"{MODEL_ROOT}/{net}.pkl"},
        "guidance": guidance,
    }
    if gnet is not None:
        out["gnet"] = parse_checkpoint_name(gnet) | {"url": f"{MODEL_ROOT}/{gnet}.pkl"}
    return out
