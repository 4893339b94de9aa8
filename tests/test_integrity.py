"""Integrity of a run's files (issue 25): the lock, stats.jsonl, config comparison, CLI errors.

The tests that need a trained run live in test_reliability.py beside its shared run.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from train_testlib import ROOT

from edm_jax.train.checkpoint import config_changes
from edm_jax.train.reporting import Reporter, append_line
from edm_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError


def _env() -> dict:
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- the lock

RACE_SCRIPT = r"""
import importlib.util, json, multiprocessing as mp, os, socket, subprocess, sys, time
spec = importlib.util.spec_from_file_location("wl", sys.argv[1])
wl = importlib.util.module_from_spec(spec); spec.loader.exec_module(wl)
import warnings; warnings.simplefilter("ignore")
workdir, trials = sys.argv[2], int(sys.argv[3])
ctx = mp.get_context("fork")

def dead_pid():
    p = subprocess.Popen(["true"]); p.wait(); return p.pid

def contender(barrier, won):
    barrier.wait()
    try:
        wl.WorkdirLock(workdir).acquire()
    except wl.WorkdirLockedError:
        os._exit(0)
    with won.get_lock():
        won.value += 1
    time.sleep(0.05)  # hold it while the other one tries
    os._exit(0)

both = 0
for _ in range(trials):
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": "earlier"}
    with open(os.path.join(workdir, "lock"), "w") as f:
        f.write(json.dumps(stale))
    barrier, won = ctx.Barrier(2), ctx.Value("i", 0)
    procs = [ctx.Process(target=contender, args=(barrier, won)) for _ in range(2)]
    for p in procs: p.start()
    for p in procs: p.join()
    both += won.value == 2
    if won.value == 0:
        print("nobody took the stale lock"); sys.exit(1)
print(both)
"""


def test_stale_lock_takeover_has_one_winner(tmp_path):
    """Two trainers racing for a stale lock (barrier-synchronised, 60 trials): one wins."""
    module = ROOT / "edm_jax" / "train" / "workdir_lock.py"
    res = subprocess.run(
        [sys.executable, "-c", RACE_SCRIPT, str(module), str(tmp_path), "60"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "0", "both trainers held the lock"


@pytest.mark.parametrize("content", ["", "[1, 2]", '{"host": "h", "pid": "abc"}', "{not json"])
def test_unreadable_lock_is_stale_and_taken_over(tmp_path, content):
    (tmp_path / "lock").write_text(content)
    lock = WorkdirLock(tmp_path)
    with pytest.warns(UserWarning, match="unreadable lock"):
        lock.acquire()
    try:
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "lock").exists()


def test_lock_held_by_a_live_process_is_refused_even_with_a_garbled_file(tmp_path):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "import importlib.util as u; s = u.spec_from_file_location('wl', sys.argv[2]);"
        "wl = u.module_from_spec(s); s.loader.exec_module(wl);"
        "l = wl.WorkdirLock(sys.argv[3]); l.acquire(); print('held', flush=True); time.sleep(60)"
    )
    module = ROOT / "edm_jax" / "train" / "workdir_lock.py"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(ROOT), str(module), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "lock").write_text("")  # a reader sees an empty file: still held
        with pytest.raises(WorkdirLockedError, match="in use by another trainer"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_written_whole(tmp_path, monkeypatch):
    """The holder's info is written before anyone can read the lock as held."""
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    try:
        info = json.loads((tmp_path / "lock").read_text())
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    finally:
        lock.release()


# --------------------------------------------------------------------------- config comparison


def _full(**model) -> dict:
    from edm_jax.train import default_config

    config = json.loads(default_config().to_json())
    config["model"].update(model)
    return config


def test_config_changes_compare_the_union_of_keys():
    old = _full(net={"label_dropout": 0.1, "model_channels": 8}, precond_kwargs={})
    new = _full(net={"model_channels": 8}, precond_kwargs={"sigma_data": 0.25})
    refused, allowed = config_changes(old, new)
    assert refused == [
        "model.net.label_dropout: 0.1 -> <unset>",
        "model.precond_kwargs.sigma_data: <unset> -> 0.25",
    ]
    assert allowed == []
    assert config_changes(new, new) == ([], [])


def test_config_changes_fill_keys_a_newer_version_added_with_their_defaults():
    """An old checkpoint's config lacks keys added later: their default is no change."""
    new, old = _full(), _full()
    del old["optim"]["ref_batches"]  # not spelled out by an older version
    assert config_changes(old, new) == ([], [])
    new["optim"]["ref_batches"] = 1.0
    assert config_changes(old, new)[0] == ["optim.ref_batches: 70000.0 -> 1.0"]


def test_model_spec_changes_are_refused():
    from edm_jax.train.checkpoint import spec_changes

    old = {"arch": "ddpmpp", "net": {"channel_mult_emb": 4}, "precond_kwargs": {}}
    new = {"arch": "ddpmpp", "net": {"channel_mult_emb": 2}, "precond_kwargs": {}}
    assert spec_changes(old, new) == ["model spec net.channel_mult_emb: 4 -> 2"]
    assert spec_changes(old, old) == []


# --------------------------------------------------------------------------- stats.jsonl


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_stats_rows_are_strict_json(tmp_path):
    reporter = Reporter(tmp_path, total_steps=4, start_step=0, batch_size=2, use_tqdm=False,
                        use_tensorboard=False)  # fmt: skip
    reporter.log(1, {"loss": 0.5, "grad_norm": float("inf"), "x": float("nan")}, 1e-3)
    row = _strict((tmp_path / "stats.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] is None and row["x"] is None and row["loss"] == 0.5


def test_disk_full_on_stats_names_the_file_and_free_space(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as e:
        append_line(tmp_path / "stats.jsonl", "{}")
    msg = str(e.value)
    assert str(tmp_path / "stats.jsonl") in msg and "No space left" in msg and "GiB free" in msg


# --------------------------------------------------------------------------- CLI errors


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={tmp_path}", *overrides]  # fmt: skip
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.total_kimg=inf", "config.train.total_kimg must be a finite number > 0"),
        ("--config.seed=4294967296", "config.seed must be an int in [0, 2**32), got 4294967296"),
        ("--config.train.batch_size=1048576", "fewer than global_batch_size=1048576"),
    ],
)
def test_train_cli_bad_numbers_are_one_line(tmp_path, override, message):
    res = _train(tmp_path, override)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines[:5]


# --------------------------------------------------------------------------- images


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_named_image_error(tmp_path):
    from edm_jax.data.images import decode_image, read_header, verify_image

    bomb = _png_claiming(40000, 40000)
    for fn in (
        read_header,
        lambda d, n: decode_image(d, 8, 1, n),
        lambda d, n: verify_image(d, 8, n),
    ):
        with pytest.raises(ValueError, match="bomb.png"):
            fn(bomb, "bomb.png")


def test_dataset_tool_skips_a_decompression_bomb(tmp_path):
    import PIL.Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(src / f"{i}.png")
    (src / "bomb.png").write_bytes(_png_claiming(40000, 40000))
    cmd = [sys.executable, "-m", "edm_jax.data.tool", "--source", str(src), "--dest",
           str(tmp_path / "out.zip")]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "bomb.png" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([*cmd, "--skip-bad"], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bomb.png" in res.stdout + res.stderr


# --------------------------------------------------------------------------- issue 23.8

FULL_DISK = r"""
import asyncio, sys, threading, time
import orbax.checkpoint as ocp

def full_disk(self, step, *args, **kwargs):
    def background():  # what orbax's own threads do after a failed write
        time.sleep(0.5)
        raise RuntimeError("background save thread failed")
    threading.Thread(target=background).start()
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    fut.set_exception(OSError(28, "No space left on device"))  # never retrieved
    raise OSError(28, "No space left on device")

ocp.CheckpointManager.save = full_disk
root = sys.argv[1]
sys.argv = [root + "/train.py", *sys.argv[2:]]
sys.path.insert(0, root)
import runpy
runpy.run_path(root + "/train.py", run_name="__main__")
"""


def test_full_disk_is_one_line(tmp_path):
    cmd = [sys.executable, "-c", FULL_DISK, str(ROOT), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={tmp_path}"]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr[-3000:]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "GiB free" in lines[0], (
        lines
    )


def test_diverged_parameters_are_never_saved():
    from edm_jax.train.reporting import NonFiniteLossError, check_params

    check_params({"w": np.ones((3, 3)), "b": -np.ones(2)}, 5)
    with pytest.raises(NonFiniteLossError, match=r"diverged at step 7 \(max \|\['w'\]\| = 3e\+11"):
        check_params({"w": np.full((2,), 3e11), "b": np.ones(2)}, 7)
    with pytest.raises(NonFiniteLossError, match=r"\['b'\]\| = nan"):
        check_params({"w": np.ones(2), "b": np.array([1.0, np.nan])}, 7)
