"""The train step beside NVlabs/edm's on the CPU: img/s, medians of interleaved rounds, JSON.

Same network (DDPM++ / SongUNet, conditional, float32, dropout 0.13), batch, EDM loss, Adam
(lr 1e-3), nan_to_num of the gradients and the half-life EMA; synthetic data. NVlabs' step is
its training loop's inner body (training/training_loop.py); ours is `make_train_step`. Rounds
alternate between the two so that a busy machine slows both alike. Also times a bare 3x3
conv forward+backward in both, to tell XLA:CPU's kernels from our code.

Needs torch importable and a checkout of NVlabs/edm (read, never vendored):

    PYTHONPATH=$PWD:/path/to/torch/site-packages python benchmarks/bench_train_vs_torch.py \
        --reference /path/to/NVlabs/edm [--batch 32] [--channels 64] [--blocks 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_train_breakdown import study_config, study_setup

from edm_jax.train.step import batch_sharding, make_train_step


def jax_step(batch: int, channels: int, blocks: int):
    """(run one step, seconds of the first) for edm_jax's jitted, donating train step."""
    c = study_config(batch, channels, blocks, power_stds=())  # NVlabs/edm keeps one EMA
    c.optim.lr = 1e-3
    model, mesh, shardings, state = study_setup(c)
    step = make_train_step(model, c, mesh, shardings)
    kx, ky = jax.random.split(jax.random.key(1))
    data = {"image": jax.random.uniform(kx, (batch, 32, 32, 3), minval=-1, maxval=1),
            "label": jax.random.randint(ky, (batch,), 0, 10)}  # fmt: skip
    data = jax.device_put(data, batch_sharding(mesh))
    box = [state]

    def run():
        box[0], m = step(box[0], data)
        jax.block_until_ready(m)

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def torch_step(reference: str, batch: int, channels: int, blocks: int):
    """(run one step, seconds of the first) for NVlabs' loop body with EDMPrecond(SongUNet)."""
    import torch

    sys.path.insert(0, reference)
    from training.loss import EDMLoss  # type: ignore[import-not-found]
    from training.networks import EDMPrecond  # type: ignore[import-not-found]

    torch.manual_seed(0)
    net = EDMPrecond(
        img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet",
        model_channels=channels, channel_mult=[1, 2, 2], num_blocks=blocks, dropout=0.13,
        embedding_type="positional", encoder_type="standard", decoder_type="standard",
        channel_mult_noise=1, resample_filter=[1, 1],
    ).train().requires_grad_(True)  # fmt: skip
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss()
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.randint(0, 10, (batch,)), 10).float()
    nimg = [0]

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images, labels=labels)
        loss.sum().mul(1.0 / batch).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        nimg[0] += batch
        beta = 0.5 ** (batch / max(min(500e3, nimg[0] * 0.05), 1e-8))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
                pe.copy_(pn.detach().lerp(pe, beta))

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def conv_pair(batch: int, channels: int):
    """(jax run, torch run) of a bare 3x3 conv forward+backward at the net's widest shape."""
    import torch

    x = np.random.default_rng(0).standard_normal((batch, 32, 32, channels), np.float32)
    w = np.random.default_rng(1).standard_normal((3, 3, channels, channels), np.float32) * 0.05

    def conv(x, w):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)

    def run_torch():
        xt.grad = wt.grad = None
        torch.nn.functional.conv2d(xt, wt, padding=1).square().sum().backward()

    jax.block_until_ready(grad(xj, wj))
    run_torch()
    return (lambda: jax.block_until_ready(grad(xj, wj))), run_torch


def interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds per call of each run, over rounds that alternate between them."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    """Time both steps (and the bare conv) in interleaved rounds; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--reference", required=True, help="a checkout of NVlabs/edm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    ours, ours_first = jax_step(a.batch, a.channels, a.blocks)
    ref, ref_first = torch_step(a.reference, a.batch, a.channels, a.blocks)
    conv_j, conv_t = conv_pair(a.batch, a.channels)
    s = interleaved({"ours": ours, "nvlabs": ref, "conv_jax": conv_j, "conv_torch": conv_t},
                    a.rounds)  # fmt: skip
    out = {
        "benchmark": "train_vs_torch_cpu", "backend": jax.default_backend(),
        "config": {"batch": a.batch, "channels": a.channels, "channel_mult": [1, 2, 2],
                   "num_blocks": a.blocks, "resolution": 32, "dtype": "float32",
                   "rounds": a.rounds, "torch_threads": a.threads, "torch": torch.__version__,
                   "jax": jax.__version__},
        "img_per_s": {"edm_jax": round(a.batch / s["ours"], 2),
                      "nvlabs": round(a.batch / s["nvlabs"], 2)},
        "ratio_ours_over_nvlabs": round(s["nvlabs"] / s["ours"], 3),
        "first_step_s": {"edm_jax": round(ours_first, 1), "nvlabs": round(ref_first, 1)},
        "conv3x3_fwd_bwd_ms": {"jax": round(1e3 * s["conv_jax"], 2),
                               "torch": round(1e3 * s["conv_torch"], 2)},
    }  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
