"""A run survives its readers, restarts, neighbours, a full disk and bad input (issue 13).

One tiny run, interrupted by SIGINT at step 5 while a reader loads it, is shared by the
tests; each test that changes a workdir works on a copy of it.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from train_testlib import ROOT, compile_cache, tiny_config, tree_equal

from edm_jax import api
from edm_jax.checkpoint_reader import committed_steps, quiet_orbax, read_json_item
from edm_jax.nets.spec import model_from_spec
from edm_jax.train import loop
from edm_jax.train.checkpoint import CheckpointSaveError, ConfigChangedError
from edm_jax.train.workdir_lock import WorkdirLockedError

PLANTED = "77.orbax-checkpoint-tmp-1"  # stands for another process's save in flight


def _env() -> dict:
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _config(**updates):
    return tiny_config(**{"log.keep_checkpoints": 2, **updates})


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, cache):
    """Ctrl-C (SIGINT) during step 5; a reader loads the workdir during step 4's batch."""
    workdir, seen, events = tmp_path_factory.mktemp("interrupted"), [], {}
    real = loop.to_global

    def to_global(batch, sharding):
        seen.append(1)
        if len(seen) == 1:
            (workdir / "checkpoints" / PLANTED).mkdir()
        if len(seen) == 4:  # a reader while the trainer saves
            deadline = time.monotonic() + 60
            while not committed_steps(workdir / "checkpoints") and time.monotonic() < deadline:
                time.sleep(0.05)  # step 2's save is asynchronous
            events["loaded"] = api.load(workdir)
        if len(seen) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(batch, sharding)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "to_global", to_global)
        out = loop.train(_config(), workdir, print_summary=False)
    return workdir, out, events


def _copy(workdir: Path, dst: Path) -> Path:
    shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns(PLANTED))
    return dst


def test_sigint_saves_and_readers_leave_the_workdir_alone(interrupted):
    workdir, out, events = interrupted
    assert out["status"] == "stopped (SIGINT)" and out["step"] == 5
    assert committed_steps(workdir / "checkpoints") == [4, 5]  # keep_checkpoints=2 honoured
    assert (workdir / "checkpoints" / PLANTED).is_dir()  # the reader cleaned nothing
    assert events["loaded"][0].label_dim == 10 and "run" not in out
    assert not (workdir / "lock").exists()  # released


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_load_reads_spec_and_ema_without_the_training_stack(interrupted):
    workdir, out, _ = interrupted
    before = _snapshot(workdir)
    code = (
        "import sys, json, hashlib, numpy as np, jax; from edm_jax import load; "
        f"m, p, c = load({str(workdir)!r}); "
        "print(json.dumps({'mods': sorted(k for k in ('edm_jax.train', 'optax', 'grain') "
        "if k in sys.modules), 'label_dim': m.label_dim, "
        "'sha': [hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(p)]}))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["mods"] == [] and got["label_dim"] == 10
    ema = jax.tree.leaves(jax.device_get(out["state"].ema))
    assert got["sha"] == [hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in ema]
    assert _snapshot(workdir) == before  # nothing written, moved or deleted
    spec = read_json_item(workdir / "checkpoints" / "5", "model_spec")
    model = model_from_spec(spec)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, out["state"].ema)


def test_load_falls_back_when_newest_step_lacks_metadata(interrupted, tmp_path):
    work = _copy(interrupted[0], tmp_path / "w")
    (work / "checkpoints" / "5" / "state" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match="5 is unreadable"):
        _, params, _ = api.load(work)
    assert tree_equal(params, api.load(work / "checkpoints" / "4")[1])


def test_load_of_a_checkpoint_without_model_spec_uses_its_config(interrupted, tmp_path):
    work = _copy(interrupted[0], tmp_path / "w")
    shutil.rmtree(work / "checkpoints" / "5" / "model_spec")  # as written by older versions
    (work / "checkpoints" / "5" / "sha256.json").unlink()
    model, params, config = api.load(work)
    assert model.label_dim == 10 and config.data.name == "digits"
    assert tree_equal(params, interrupted[1]["state"].ema)


def test_config_change_that_shapes_the_state_is_refused(interrupted, tmp_path):
    work = _copy(interrupted[0], tmp_path / "w")
    config = _config(**{"train.batch_size": 32})
    config.model.net.model_channels = 16
    with pytest.raises(ConfigChangedError) as e:
        loop.train(config, work, print_summary=False)
    assert "model.net.model_channels: 8 -> 16" in str(e.value)
    assert "train.batch_size: 16 -> 32" in str(e.value)
    assert committed_steps(work / "checkpoints") == [4, 5]  # nothing moved aside
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4", "5"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _flip_byte(step_dir: Path) -> None:
    """Flip one byte in the middle of the largest data file of the state."""
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=os.path.getsize)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_resume_moves_corrupt_step_aside_and_allows_safe_changes(interrupted, tmp_path, capsys):
    """A flipped byte, a half-written stats line and a stale lock: resume from step 4 with
    other loader/logging settings ends bitwise equal to the uninterrupted run."""
    workdir, out, _ = interrupted
    work = _copy(workdir, tmp_path / "w")
    _flip_byte(work / "checkpoints" / "5")
    with open(work / "stats.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a crash mid-write
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier"}
    (work / "lock").write_text(json.dumps(lock))
    config = _config(**{"data.num_workers": 1, "log.log_every_steps": 1})
    config.log.checkpoint_every_steps, config.train.total_kimg = 1, 0.256
    with pytest.warns(UserWarning) as record:
        b = loop.train(config, work, stop_at_step=5, print_summary=False)
    messages = [str(w.message) for w in record]
    assert sum("5 is unreadable" in m for m in messages) == 1, messages
    assert any("stale lock" in m for m in messages), messages
    assert "safe to change: data.num_workers: 0 -> 1" in capsys.readouterr().out
    assert b["resumed_from"] == 4 and b["step"] == 5
    assert len(list((work / "checkpoints").glob("5.unreadable-*"))) == 1  # moved, not deleted
    assert committed_steps(work / "checkpoints") == [4, 5]
    for field in ("params", "ema", "opt_state", "rng", "step"):
        assert tree_equal(getattr(out["state"], field), getattr(b["state"], field)), field
    assert b["data_state"] == out["data_state"]
    rows = [json.loads(line) for line in (work / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]


def test_second_trainer_is_refused_naming_the_holder(tmp_path, cache):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01 10:00"}
        (tmp_path / "lock").write_text(json.dumps(info))
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}, started 2026-01-01"):
            loop.train(_config(), tmp_path, print_summary=False)
        assert json.loads((tmp_path / "lock").read_text()) == info
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_failed_save_stops_at_once_naming_path_and_free_space(interrupted, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    work = _copy(interrupted[0], tmp_path / "w")

    def full_disk(self, step, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as e:
        loop.train(_config(), work, print_summary=False)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint 6" in msg and str(work / "checkpoints") in msg
    assert "No space left on device" in msg and "GiB free" in msg
    rows = [json.loads(line) for line in (work / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6  # stopped at the failed save, every line whole


def test_orbax_noise_is_silenced(caplog):
    quiet_orbax()
    with caplog.at_level(logging.WARNING, logger="absl"):
        logging.getLogger("absl").warning("Unable to find the step 2 for deletion or renaming")
        logging.getLogger("absl").warning("Metadata file does not exist: /x/_CHECKPOINT_METADATA")
        logging.getLogger("absl").warning("something a user should see")
    assert [r.getMessage() for r in caplog.records] == ["something a user should see"]


WORKER_SCRIPT = """
import os, sys, time, numpy as np
from edm_jax.data.pipeline import make_pipeline
from edm_jax.data.sources import ArraySource
src = ArraySource(np.zeros((64, 8, 8, 1), np.uint8), resolution=8, channels=1, use_labels=False)
p = make_pipeline(src, global_batch_size=8, seed=0, num_workers=1)
next(p)
me = str(os.getpid())
kids = [d for d in os.listdir('/proc') if d.isdigit() and
        open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()[1] == me]
print(' '.join(kids), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_die_with_a_killed_parent():
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT], env=_env(), stdout=subprocess.PIPE, text=True
    )
    kids = [int(k) for k in proc.stdout.readline().split()]
    assert kids, "no grain worker started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    alive = kids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [k for k in kids if os.path.exists(f"/proc/{k}") and not _zombie(k)]
    for k in alive:
        os.kill(k, signal.SIGKILL)
    assert not alive, "grain workers outlived their parent"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_train_cli_user_error_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={tmp_path}", "--config.optim.lr=inf"]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: config.optim.lr must be a finite number > 0, got inf"
    ]


def test_float16_on_cpu_is_rejected():
    from edm_jax.train.validate import check_numbers_and_platform

    with pytest.raises(ValueError, match="model.dtype='float16' is not supported on the CPU"):
        check_numbers_and_platform(_config(**{"model.dtype": "float16"}), jax.devices())
    for lr in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="optim.lr must be a finite number > 0"):
            check_numbers_and_platform(_config(**{"optim.lr": lr}), jax.devices())


def test_sampler_inputs_are_checked():
    from edm_jax.samplers import SAMPLERS
    from edm_jax.samplers.checks import check_scalar, check_seeds, check_sigmas

    check_sigmas(np.array([80.0, 1.0, 0.0]))
    check_sigmas(np.array([80.0, 1.0]))  # part of a grid, as k-diffusion allows
    for bad, match in [
        ([0.0, 1.0, 80.0], "non-increasing"),
        ([80.0, -1.0, 0.0], ">= 0"),
        ([80.0, np.nan, 0.0], "finite"),
        ([0.0, 0.0, 0.0], "all zero"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_sigmas(np.array(bad))
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        check_scalar("cfg_scale", float("nan"))
    with pytest.raises(ValueError, match="seed 4294967296 is out of range"):
        check_seeds([0, 2**32])
    x = np.zeros((2, 4, 4, 1), np.float32)
    for name in ("euler", "heun", "dpmpp_2m", "euler_ancestral"):  # grids reach every sampler
        with pytest.raises(ValueError, match="non-increasing"):
            SAMPLERS[name](lambda x, s: x, x, np.array([0.002, 80.0, 0.0]), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="sigma_min=80.0 must be below sigma_max=0.002"):
        SAMPLERS["dpm_fast"](lambda x, s: x, x, 80.0, 0.002, 10)
    with pytest.raises(ValueError, match="sigma_max must be a finite number"):
        SAMPLERS["dpm_fast"](lambda x, s: x, x, 0.002, float("inf"), 10)


# --------------------------------------------------------------------------- issue 25


def test_network_and_precond_changes_are_refused_on_resume(interrupted, tmp_path):
    """Keys the old config did not spell out count: label dropout, sigma_data, the spec."""
    work = _copy(interrupted[0], tmp_path / "w")
    config = _config()
    config.model.net.label_dropout = 0.1
    config.model.precond_kwargs.sigma_data = 0.25
    config.model.net.channel_mult_emb = 2
    with pytest.raises(ConfigChangedError) as e:
        loop.train(config, work, print_summary=False)
    msg = str(e.value)
    assert "model.net.label_dropout: <unset> -> 0.1" in msg
    assert "model.precond_kwargs.sigma_data: <unset> -> 0.25" in msg
    assert "model spec net.channel_mult_emb: 4 -> 2" in msg
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4", "5"]


def _saved_tree(step_dir: Path):
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def test_restore_into_another_structure_is_one_error_and_renames_nothing(interrupted, tmp_path):
    from edm_jax.train.checkpoint import Checkpointer, CheckpointMismatchError

    work = _copy(interrupted[0], tmp_path / "w")
    tree = _saved_tree(work / "checkpoints" / "5")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    target["params"]["extra"] = {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}
    ckpt = Checkpointer(work, use_async=False)
    try:
        with pytest.raises(CheckpointMismatchError) as e:
            ckpt.restore_latest(target)
    finally:
        ckpt.close()
    assert "\n" not in str(e.value) and "params/extra/kernel: absent -> float32[3, 3]" in str(
        e.value
    )
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4", "5"]


def test_a_step_without_manifest_is_not_trusted_when_older_ones_have_one(interrupted, tmp_path):
    """A kill between orbax's commit and the manifest (older versions) plus a flipped byte:
    the run resumes from the verified step before, bitwise equal to the uninterrupted run."""
    workdir, out, _ = interrupted
    work = _copy(workdir, tmp_path / "w")
    (work / "checkpoints" / "5" / "sha256.json").unlink()
    _flip_byte(work / "checkpoints" / "5")
    with pytest.warns(UserWarning, match=r"5 is unverified \(it has no sha256.json"):
        b = loop.train(_config(), work, stop_at_step=5, print_summary=False)
    assert b["resumed_from"] == 4 and b["step"] == 5
    assert len(list((work / "checkpoints").glob("5.unverified-*"))) == 1
    for field in ("params", "ema", "opt_state", "rng", "step"):
        assert tree_equal(getattr(out["state"], field), getattr(b["state"], field)), field


def test_the_manifest_is_part_of_the_commit(tmp_path):
    """Once orbax has committed an async save, its manifest is there (no finish() needed)."""
    import jax.numpy as jnp

    from edm_jax.checkpoint_reader import verify_manifest
    from edm_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path)
    try:
        state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
        assert ckpt.save(3, state, {"pos": 1}, "{}", {"arch": "x"})
        ckpt.manager.wait_until_finished()  # orbax alone: our finish() writes nothing more
        step_dir = tmp_path / "checkpoints" / "3"
        assert (step_dir / "sha256.json").exists() and verify_manifest(step_dir) is None
    finally:
        ckpt.close()


def test_every_checkpoint_unreadable_refuses_and_keeps_the_history(interrupted, tmp_path):
    from edm_jax.train.checkpoint import NoReadableCheckpointError

    work = _copy(interrupted[0], tmp_path / "w")
    for step in ("4", "5"):
        _flip_byte(work / "checkpoints" / step)
    stats = (work / "stats.jsonl").read_text()
    with pytest.warns(UserWarning, match="is unreadable"):
        with pytest.raises(NoReadableCheckpointError, match=r"steps 5, 4, moved aside"):
            loop.train(_config(), work, print_summary=False)
    assert (work / "stats.jsonl").read_text() == stats
    assert committed_steps(work / "checkpoints") == []
    assert len(list((work / "checkpoints").glob("*.unreadable-*"))) == 2


def test_a_reader_keeps_up_with_rotation(interrupted, tmp_path, monkeypatch):
    """While the reader fails on step 5, the run saves step 6 and rotates step 4 away."""
    from edm_jax import checkpoint_reader as checkpoints

    work = _copy(interrupted[0], tmp_path / "w")
    real = checkpoints._read_step

    def read_step(step_dir):
        if step_dir.name == "5":
            shutil.copytree(step_dir, step_dir.parent / "6")
            shutil.rmtree(step_dir.parent / "4")
            raise OSError("deleted while reading")
        return real(step_dir)

    monkeypatch.setattr(checkpoints, "_read_step", read_step)
    with pytest.warns(UserWarning, match="reading checkpoint 6"):
        _, params, _ = api.load(work)
    assert tree_equal(params, interrupted[1]["state"].ema)


def test_a_corrupt_step_is_reported_once(interrupted, tmp_path, caplog):
    """One warning, not a warning and a log line with the same text."""
    from edm_jax.train.checkpoint import Checkpointer

    work = _copy(interrupted[0], tmp_path / "w")
    ckpt = Checkpointer(work, use_async=False)
    try:
        with caplog.at_level(logging.WARNING), pytest.warns(UserWarning) as record:
            ckpt._move_aside(5, "a flipped byte")
    finally:
        ckpt.close()
    said = [str(w.message) for w in record] + [r.getMessage() for r in caplog.records]
    assert sum("a flipped byte" in m for m in said) == 1, said
