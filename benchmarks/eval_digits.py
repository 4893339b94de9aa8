"""Check the digits main job: do class-conditional samples look like their class?

Optionally trains first (``--train``: runs ``python train.py --config configs/digits.py
--workdir DIR`` and times it), then draws ``--per_class`` samples of each digit with the
EMA parameters (EDM Heun sampler), and labels them with a scikit-learn SVM fitted on the
real digits. Prints JSON: accuracy, per-class accuracy, the classifier's own held-out
accuracy on real digits, and the training wall time.

    python benchmarks/eval_digits.py --workdir runs/digits --train
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train_run(config: str, workdir: str, extra: list[str]) -> float:
    """Run train.py to completion in a subprocess; returns its wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={config}", f"--workdir={workdir}"]
    t0 = time.time()
    subprocess.run(cmd + extra, check=True, cwd=ROOT)
    return time.time() - t0


def fit_classifier(seed: int = 0):
    """SVM on 8x8 digits (values 0..16); returns (classifier, held-out accuracy)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    held_out = SVC(gamma=0.001, C=10.0).fit(Xtr, ytr).score(Xte, yte)
    return SVC(gamma=0.001, C=10.0).fit(X, y), float(held_out)


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """Samples [n,R,R,C] in [-1,1] -> sklearn digit features [n,64] in 0..16 (undo upscaling)."""
    n, R = images.shape[0], images.shape[1]
    k, pad = R // 8, (R - 8 * (R // 8)) // 2
    x = images[:, pad : pad + 8 * k, pad : pad + 8 * k].mean(axis=-1)
    x = x.reshape(n, 8, k, 8, k).mean(axis=(2, 4))
    return np.clip((x + 1) / 2 * 16, 0, 16).reshape(n, 64)


def sample_digits(workdir: str, per_class: int, steps: int, seed: int) -> np.ndarray:
    """per_class samples of each class (seed i has class i % 10), EMA params, Heun, through
    edm_jax.sample (the one sampling path: per-seed noise, batches over the devices)."""
    from edm_jax import api

    model, ema, _ = api.load(workdir)
    if model.label_dim != 10:
        raise ValueError(f"{workdir} holds a model with label_dim={model.label_dim}, expected 10")
    n = 10 * per_class
    return api.sample(
        jax.random.key(seed), ema, model, seeds=np.arange(n), labels=np.arange(n) % 10,
        sampler="heun", num_steps=steps,
    )  # fmt: skip


def main(argv=None) -> dict:
    """Parse arguments, optionally train, evaluate, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--train", action="store_true", help="run train.py first and time it")
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--seed", type=int, default=123)
    args, extra = p.parse_known_args(argv)
    wall = train_run(args.config, args.workdir, extra) if args.train else None
    t0 = time.time()
    images = sample_digits(args.workdir, args.per_class, args.steps, args.seed)
    clf, held_out = fit_classifier()
    labels = np.arange(len(images)) % 10
    pred = clf.predict(to_digit_features(images))
    per_class = [float(np.mean(pred[labels == c] == c)) for c in range(10)]
    out = {
        "accuracy": float(np.mean(pred == labels)),
        "per_class": per_class,
        "n_samples": len(images),
        "classifier_held_out_accuracy": held_out,
        "train_wall_s": wall,
        "sample_wall_s": time.time() - t0,
        "workdir": args.workdir,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
