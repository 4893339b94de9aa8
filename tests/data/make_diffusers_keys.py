"""Record diffusers' U-Net key names and shapes of SD 1.5 and SD 2.1 (run with diffusers, never
by the tests).

    python tests/data/make_diffusers_keys.py   # in a venv with torch 2.13.0 CPU + diffusers 0.42.1

Builds ``UNet2DConditionModel`` on the meta device (no weights) from the ``unet/config.json`` of
runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, written out below, and
writes ``diffusers_sd_unets.json``: {"diffusers": version, "configs": {name: config},
"keys": [names, in state_dict order], "shapes": {name: [shape per key]}}.
tests/test_text_to_image.py maps these names to CompVis names and compares them with the
released key sets of ../shared/fixtures/foreign_sd_released.npz.
"""

import json
from pathlib import Path

import diffusers
import torch

OUT = Path(__file__).resolve().parent / "diffusers_sd_unets.json"
_COMMON = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)  # fmt: skip
CONFIGS = {
    "sd15": dict(_COMMON, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(
        _COMMON,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        upcast_attention=True,
    ),  # fmt: skip
}


def main() -> None:
    keys, shapes = None, {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**config)
        sd = unet.state_dict()
        assert keys is None or list(sd) == keys, "SD 1.5 and 2.1 differ in names"
        keys = list(sd)
        shapes[name] = [list(v.shape) for v in sd.values()]
    out = dict(diffusers=diffusers.__version__, configs=CONFIGS, keys=keys, shapes=shapes)
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}: {len(keys)} keys")


if __name__ == "__main__":
    main()
