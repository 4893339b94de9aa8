"""Training loop: exact resume, SIGTERM, checkpoint retention and fallback, 1 vs 8 devices."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from train_testlib import compile_cache, tiny_config, tree_equal, tree_max_diff

from edm_jax.train import Checkpointer, NonFiniteLossError, loop
from edm_jax.train.checkpoint import abstract_state


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _config(**updates):
    """The tiny config with two EDM2 power EMAs, keeping 2 checkpoints plus every 4th step."""
    c = tiny_config(**{"log.keep_checkpoints": 2, "log.keep_period_steps": 4, **updates})
    c.ema.power_stds = (0.05, 0.1)
    return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """8 steps in one go on all 8 devices, with sample grids every 4 steps and TensorBoard."""
    workdir = tmp_path_factory.mktemp("straight")
    config = _config(**{"log.sample_every_kimg": 0.064, "log.tensorboard": True})
    out = loop.train(config, workdir, print_summary=False)
    return workdir, out


def _sigterm_after(monkeypatch, calls: int):
    """Make the loop receive SIGTERM while it fetches batch number `calls`."""
    real, seen = loop.to_global, []

    def to_global(batch, sharding):
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, sharding)

    monkeypatch.setattr(loop, "to_global", to_global)


def test_resume_after_sigterm_is_exact(straight, tmp_path, monkeypatch):
    workdir_a, a = straight
    _sigterm_after(monkeypatch, calls=3)  # SIGTERM lands during step 3: saved at step 3
    first = loop.train(_config(), tmp_path, print_summary=False)
    assert first["status"] == "stopped (SIGTERM)" and first["step"] == 3
    monkeypatch.undo()
    b = loop.train(_config(), tmp_path, print_summary=False)
    assert b["resumed_from"] == 3 and b["step"] == 8
    sa, sb = a["state"], b["state"]
    for field in ("params", "ema", "power_ema", "opt_state", "rng", "step"):
        assert tree_equal(getattr(sa, field), getattr(sb, field)), field
    assert a["data_state"] == b["data_state"]  # same data order
    assert a["last"]["loss"] == b["last"]["loss"]


def test_outputs_and_checkpoint_retention(straight):
    workdir, out = straight
    assert out["status"] == "finished" and out["step"] == 8
    assert Checkpointer(workdir).all_steps() == [4, 6, 8]  # last 2, plus every 4th
    rows = [json.loads(line) for line in (workdir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in rows)
    assert json.loads((workdir / "config.json").read_text())["train"]["batch_size"] == 16
    stored = Checkpointer(workdir).read_config(8)
    assert stored["model"]["net"]["model_channels"] == 8
    grids = sorted(p.name for p in (workdir / "samples").glob("grid_*.png"))
    assert grids == ["grid_00000000.png", "grid_00000004.png", "grid_00000008.png"]
    from PIL import Image

    img = Image.open(workdir / "samples" / "latest.png")
    assert img.size == (10 * 32, 2 * 32)  # 10 classes x sample_grid rows, 8px tiles upscaled x4
    assert list((workdir / "tensorboard").glob("events.*"))


def test_corrupt_newest_checkpoint_falls_back(straight, tmp_path):
    import shutil

    workdir, out = straight
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    state = out["state"]
    shape = jax.eval_shape(lambda s: s, state)
    target = abstract_state(shape, jax.tree.map(lambda x: x.sharding, state))
    with pytest.warns(UserWarning, match="8 is unreadable"):
        step, state, data, _ = Checkpointer(tmp_path).restore_latest(target)
    assert step == 6 and int(state.step) == 6 and data


def test_one_device_and_eight_devices_agree(straight, tmp_path):
    _, a = straight
    one = loop.train(_config(), tmp_path, devices=jax.devices()[:1], print_summary=False)
    assert a["num_devices"] == 8 and one["num_devices"] == 1
    np.testing.assert_allclose(one["last"]["loss"], a["last"]["loss"], rtol=1e-5)
    assert tree_max_diff(one["state"].params, a["state"].params) < 1e-5


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, cache):
    real, seen = loop.to_global, []

    def poisoned(batch, sharding):
        seen.append(1)
        if len(seen) >= 3:  # steps 3.. see NaN images
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return real(batch, sharding)

    monkeypatch.setattr(loop, "to_global", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        loop.train(_config(), tmp_path, print_summary=False)
    assert Checkpointer(tmp_path).all_steps() == [2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(straight, tmp_path):
    """train.py in 2 processes x 2 CPU devices (gloo) gives the 8-device run's first losses."""
    import subprocess
    import sys

    from train_testlib import ROOT

    port, procs = _free_port(), []
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for pid in range(2):
        cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
               f"--workdir={tmp_path}", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={pid}", "--config.train.total_kimg=0.032"]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [p.communicate(timeout=420)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    first = json.loads((straight[0] / "stats.jsonl").read_text().splitlines()[0])
    assert [r["step"] for r in rows] == [2] and first["step"] == 2
    np.testing.assert_allclose(rows[0]["loss"], first["loss"], rtol=1e-5)
    assert Checkpointer(tmp_path).all_steps() == [2]
