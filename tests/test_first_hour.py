"""A researcher's first hour (issue 23): own images by class name, overrides, CLI errors.

One tiny run on a generated folder of two classes is shared: trained through train.py with a
network field the config file does not set, stopped, resumed, then sampled by class name.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_testlib import ROOT


def _env() -> dict:
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _train(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _run(str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
                f"--workdir={workdir}", *overrides)  # fmt: skip


def _one_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:8]
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A folder of 8x8 greyscale images in two class subfolders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    for name, mask in (("circle", (yy - 3.5) ** 2 + (xx - 3.5) ** 2 < 9), ("square", None)):
        (root / name).mkdir()
        for i in range(24):
            base = mask if mask is not None else (abs(yy - 3.5) < 3) & (abs(xx - 3.5) < 3)
            img = np.where(base, 220, 30) + rng.integers(0, 20, (8, 8))
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(shapes, tmp_path_factory):
    """train.py on the folder with --config.model.net.label_dropout: stopped at 2, resumed."""
    workdir = tmp_path_factory.mktemp("run")
    data = ["--config.data.name=folder", f"--config.data.path={shapes}",
            "--config.model.net.label_dropout=0.1"]  # fmt: skip
    first = _train(workdir, *data, "--stop_at_step=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(workdir, *data, "--config.train.total_kimg=0.064")
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second


def test_folder_run_says_what_it_reads_compiles_stops_and_resumes(folder_run, shapes):
    workdir, first, second = folder_run
    out = first.stdout.splitlines()
    assert f"data: folder {shapes}: 48 images, 2 classes (circle, square), 8x8x1" in out
    assert any(line.startswith("compiling the train step") for line in out)
    assert "stopped at step 2; rerun the same command to resume" in out
    assert "resumed from step 2 of 4" in second.stdout.splitlines()
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["net"]["label_dropout"] == 0.1  # a field tiny.py does not set


def test_sample_by_class_name(folder_run, tmp_path):
    workdir = folder_run[0]
    res = _run(str(ROOT / "sample.py"), f"--workdir={workdir}", "--class=square",
               "--sampler=sample_euler", "--steps=2", "--seeds=0-1", f"--outdir={tmp_path}",
               "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "samples.npz") as f:
        assert f["labels"].tolist() == [1, 1]  # 'square' is the second class
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (64, 32)  # 2 tiles of 8 upscaled to 32
    bad = _run(str(ROOT / "sample.py"), f"--workdir={workdir}", "--class=sqare",
               f"--outdir={tmp_path}")  # fmt: skip
    assert "did you mean 'square'" in _one_error(bad)


def test_unknown_net_field_is_named_with_did_you_mean(tmp_path):
    line = _one_error(_train(tmp_path, "--config.model.net.label_dropot=0.1"))
    assert "unknown config key 'model.net.label_dropot' (did you mean 'label_dropout'?)" in line


def test_data_path_the_source_does_not_read_is_refused(tmp_path):
    line = _one_error(_train(tmp_path, f"--config.data.path={tmp_path}"))
    assert f"config.data.path='{tmp_path}' is not read by data.name='digits'" in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.batch_size=abc", "error: config.train.batch_size='abc' must be an int"),
        ("--config.eval.sampler=huen", "unknown sampler 'huen' (did you mean 'heun'?)"),
    ],
)
def test_flag_errors_name_the_key(tmp_path, override, message):
    assert message in _one_error(_train(tmp_path, override))


def test_sample_cli_errors_name_the_flag(tmp_path):
    sample = str(ROOT / "sample.py")
    assert "--steps must be an int >= 1, got 0" in _one_error(
        _run(sample, f"--workdir={tmp_path}", "--steps=0")
    )
    assert "unknown sampler 'eulr' (did you mean 'euler'?)" in _one_error(
        _run(sample, f"--workdir={tmp_path}", "--sampler=eulr")
    )
    assert "has no options ['s_chrun']" in _one_error(
        _run(sample, f"--workdir={tmp_path}", "--sampler=heun", "--option", "s_chrun=1")
    )


def test_list_samplers_shows_options_and_defaults():
    res = _run(str(ROOT / "sample.py"), "--list-samplers")
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert "s_churn=0.0" in lines["euler"] and "eta=1.0" in lines["euler_ancestral"]
    assert "edm_sampler," in lines and "ablation_sampler" in lines["edm_sampler,"]


def test_cfg_scale_on_a_model_without_label_dropout_warns(capsys):
    import argparse
    import types

    sys.path.insert(0, str(ROOT))
    try:
        import sample
    finally:
        sys.path.remove(str(ROOT))
    model = types.SimpleNamespace(net=types.SimpleNamespace(label_dropout=0.0))
    sample.warn_cfg_without_dropout(model, argparse.Namespace(cfg_scale=2.0, guide=None))
    assert "trained without label dropout" in capsys.readouterr().err
    model.net.label_dropout = 0.1
    sample.warn_cfg_without_dropout(model, argparse.Namespace(cfg_scale=2.0, guide=None))
    assert capsys.readouterr().err == ""


def test_metrics_calc_on_files_that_are_not_images(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    res = _run("-m", "edm_jax.metrics", "calc", f"--images={tmp_path}", "--metrics=is")
    line = _one_error(res)
    assert str(tmp_path / "a.png") in line
