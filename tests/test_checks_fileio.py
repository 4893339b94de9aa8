"""The shared input checks (edm_jax.checks) and atomic writes (edm_jax.fileio)."""

import os
import stat

import pytest

from edm_jax import checks, fileio


def test_check_choice_names_the_value_the_closest_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'hune' \(did you mean 'heun'\?\); "
                       r"valid: \['euler', 'heun'\]"):  # fmt: skip
        checks.check_choice("sampler", "hune", ("heun", "euler"))
    with pytest.raises(ValueError, match=r"unknown sampler 'zzz'; valid"):  # nothing close
        checks.check_choice("sampler", "zzz", ("heun", "euler"))
    checks.check_choice("sampler", "heun", {"heun": 1})  # a dict's keys are the choices
    with pytest.raises(ValueError, match=r"unknown level None; valid: \[1, 'a'\]"):
        checks.check_choice("level", None, (1, "a"))  # unsortable choices keep their order


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "config.json"
    fileio.atomic_write_text(path, "old")
    fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_open(path, "wb") as f:
        f.write(b"half of it")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="mode"):
        fileio.atomic_open(path, "a").__enter__()
