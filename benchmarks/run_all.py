"""Every benchmark in one call, with one table beside the PyTorch reference figures.

For one 10-minute device call: installs the Python packages the machine lacks from carried
wheels (``--wheels``, default ``.whl``; see the device README), runs each benchmark script as
a subprocess inside a total time budget, skips scripts that are not there, and prints the
JSON of every run plus a markdown table beside ANCHORS.md's PyTorch H100 figures.

    python benchmarks/run_all.py               # full sizes (a GPU)
    python benchmarks/run_all.py --smoke       # tiny sizes, CPU, a few minutes
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDED = ["ml_collections", "grain", "array_record", "tensorflow_datasets", "tensorboardX"]
SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]

# (script, full-size args, smoke args, time cap in s); optional scripts are skipped if absent.
RUNS = [
    ("bench_samplers.py", ["--repeats", "5"],
     ["--steps", "5", "--repeats", "1", "--conv-batch", "2", "--only", "euler_ancestral",
      "dpmpp_2m_sde"], 120),
    ("bench_sde_noise.py", ["--rounds", "7"], ["--rounds", "2", "--steps", "10"], 60),
    ("bench_nets.py", ["--dtypes", "bfloat16", "--iters", "10"],
     ["--small", "--dtypes", "float32", "--models", "ddpmpp_cifar10"], 150),
    ("bench_train.py", ["--dtype", "bfloat16"],
     ["--small", "--dtype", "float32", "--steps", "2", "--cases", "ddpmpp_cifar10"], 180),
    ("bench_data.py", ["--resolutions", "32", "64", "--batch", "512", "--steps", "20"],
     ["--resolutions", "32", "--source", "arrays", "--num_images", "64", "--batch", "16",
      "--steps", "3", "--workers", "2"], 60),
    ("bench_metrics.py", [], ["--tiny", "--num", "8", "--repeats", "1"], 60),
    ("bench_edm2.py", ["--batch", "64", "--sample-batch", "64", "--dtype", "bfloat16"],
     ["--channels", "32", "--steps", "4", "--iters", "1"], 90),
    ("bench_vae.py", ["--resolutions", "256", "512", "--batch", "8"],
     ["--resolutions", "64", "--reps", "1", "--tool-images", "8", "--tool-resolution", "64"], 90),
    ("bench_hdit.py", ["--batch", "128", "--sample-batch", "256"],
     ["--batch", "8", "--sample-batch", "8", "--steps", "4", "--iters", "1"], 180),
    ("bench_neighborhood.py", ["--grids", "64", "128", "256", "--grad"],
     ["--grids", "32", "--tiles", "8", "--steps", "1"], 60),
    # needs torch + diffusers + transformers on the machine (carried wheels)
    ("bench_t2i_vs_diffusers.py", ["--full", "--size", "512", "--half"],
     ["--steps", "3", "--batches", "1", "--repeats", "1"], 240),
]  # fmt: skip

# ../shared/ANCHORS.md: official NVlabs/edm + k-diffusion on one H100 (bf16 + torch.compile
# where that was fastest), and the issue-15 goals for edm_jax on the same card.
ANCHORS = {
    "ddpmpp_sampling_img_s": ("DDPM++ sampling img/s (35 NFE, bf16)", 208.8, ">= 320"),
    "ddpmpp_train_img_s": ("DDPM++ training img/s (batch 512)", 2180.0, ">= 3000"),
    "adm_eval_s": ("ADM-64 denoiser evals/s (bf16)", 1245.0, ">= 1800"),
    "adm_train_img_s": ("ADM-64 training img/s (batch 64)", 345.0, ">= 550"),
    "first_compile_s": ("DDPM++ first call incl. compile, s", 61.0, "< 60"),
    "sde_ms_per_step": ("SDE samplers, worst ms/step (trivial denoiser)", 12.0, "< 0.05"),
    "worst_ms_per_step": ("every sampler, worst ms/step (trivial denoiser)", 12.0, "< 0.05"),
}


def install_wheels(folder: str, target: str = "/tmp/site") -> str | None:
    """pip-install the wheels in `folder` into `target` if a needed package is missing."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not missing or not wheels:
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels]  # fmt: skip
    subprocess.run(cmd, check=True)
    return target


def first_json(text: str) -> dict | None:
    """The first JSON object printed in `text` (scripts may print logs around it)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                return decoder.raw_decode(text[i:])[0]
            except json.JSONDecodeError:
                continue
    return None


def run_one(script: str, args: list[str], limit: float, env: dict) -> dict:
    """Run one benchmark script; its JSON, or a status saying why there is none."""
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        return {"status": "absent"}
    if limit < 5:
        return {"status": "skipped: time budget spent"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                           timeout=limit, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {limit:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    out = first_json(p.stdout)
    if p.returncode != 0 or out is None:
        return {"status": f"failed rc={p.returncode}", "wall_s": wall, "stderr": p.stderr[-800:]}
    return {"status": "ok", "wall_s": wall, "json": out}


def _get(report: dict, name: str) -> dict | None:
    run = report.get(name, {})
    return run.get("json") if run.get("status") == "ok" else None


def ours(report: dict) -> dict:
    """Our figure for each ANCHORS row (None where its benchmark did not run)."""
    got: dict = {}
    nets, train, samp = (_get(report, f"bench_{k}.py") for k in ("nets", "train", "samplers"))
    for r in (nets or {}).get("results", []):
        if r.get("model") == "ddpmpp_cifar10":
            got["ddpmpp_sampling_img_s"] = r["forward_img_per_s"] / 35
            got["first_compile_s"] = r["first_call_s"]["forward"]
        if r.get("model") == "adm_imagenet64":
            got["adm_eval_s"] = r["forward_img_per_s"]
    for r in (train or {}).get("results", []):
        key = {"ddpmpp_cifar10": "ddpmpp_train_img_s", "adm_imagenet64": "adm_train_img_s"}
        if r.get("case") in key:
            got[key[r["case"]]] = r["images_per_s"]
    rows = (samp or {}).get("results", {})
    if rows:
        got["worst_ms_per_step"] = max(v["ms_per_step_trivial"] for v in rows.values())
        sde = [rows[n]["ms_per_step_trivial"] for n in SDE if n in rows]
        got["sde_ms_per_step"] = max(sde) if sde else None
    return got


def table(report: dict, smoke: bool) -> str:
    """Markdown table: our figure, the PyTorch H100 figure, the goal."""
    got = ours(report)
    note = " (smoke sizes: not comparable)" if smoke else ""
    lines = [f"| measure{note} | edm_jax | PyTorch H100 | goal |", "|---|---|---|---|"]
    for key, (label, ref, goal) in ANCHORS.items():
        v = got.get(key)
        lines.append(f"| {label} | {'-' if v is None else f'{v:.4g}'} | {ref:g} | {goal} |")
    status = ", ".join(f"{k}: {v['status']}" for k, v in report.items())
    return "\n".join(lines) + f"\n\nruns: {status}"


def main() -> None:
    """Install missing wheels, run every benchmark in the budget, print JSON and the table."""
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--budget-s", type=float, default=None, help="total s (540; smoke 1500)")
    p.add_argument("--wheels", default=".whl", help="folder of carried wheels")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site = install_wheels(args.wheels)
    repo = os.path.dirname(HERE)
    paths = [x for x in (site, repo, env.get("PYTHONPATH")) if x]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    budget = args.budget_s or (1500.0 if args.smoke else 540.0)
    deadline = time.perf_counter() + budget
    report = {}
    for script, full, smoke, cap in RUNS:  # a shared 2-core CPU compiles slowly: 3x the caps
        limit = min(3 * cap if args.smoke else cap, deadline - time.perf_counter())
        report[script] = run_one(script, smoke if args.smoke else full, limit, env)
    text = json.dumps({"smoke": args.smoke, "runs": report}, indent=1)
    print(text)
    print(table(report, args.smoke))
    if args.out:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
