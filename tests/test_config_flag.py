"""config_io.define_config_flag on public absl / ml_collections API: --config plus typed
--config.<key> overrides, as ml_collections' config_flags read them."""

import ast
from pathlib import Path

import pytest
from absl import flags

from edm_jax.train import config_io

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _parse(monkeypatch, *args: str):
    """The config of `train.py --config=tiny.py *args` (a fresh FlagValues)."""
    argv = ["train.py", f"--config={TINY}", *args]
    monkeypatch.setattr("sys.argv", argv)
    fv = flags.FlagValues()
    holder = config_io.define_config_flag("config", flag_values=fv)
    fv(argv)
    return holder.value


def test_overrides_take_the_type_of_the_key(monkeypatch):
    c = _parse(
        monkeypatch, "--config.optim.lr=1", "--config.train.fsdp", "--config.train.batch_size",
        "32", "--config.model.net.channel_mult=(1, 2)", "--config.model.net.label_dropout=0.1",
        "--config.eval.sampler=euler",
    )  # fmt: skip
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.fsdp is True and c.train.batch_size == 32
    assert c.model.net.channel_mult == (1, 2)  # a tuple key: a Python literal
    assert c.model.net.label_dropout == 0.1  # a field of the network, not of tiny.py's net
    assert c.eval.sampler == "euler" and c.is_locked
    assert (
        _parse(monkeypatch, "--config.train.fsdp=true", "--noconfig.train.fsdp").train.fsdp is False
    )


@pytest.mark.parametrize(
    "arg, match",
    [
        ("--config.train.batch_size=abc", r"config.train.batch_size='abc' must be an int$"),
        ("--config.optim.lr=fast", r"config.optim.lr='fast' must be a float$"),
        ("--config.train.fsdp=maybe", r"config.train.fsdp='maybe' must be a bool \(true/false\)"),
        ("--config.train.batchsize=3", r"'train.batchsize' \(did you mean 'batch_size'\?\)"),
    ],
)
def test_a_bad_override_is_one_flag_error(monkeypatch, arg, match):
    with pytest.raises(flags.IllegalFlagValueError, match=match):
        _parse(monkeypatch, arg)


def test_an_override_before_the_config_is_refused(monkeypatch):
    argv = ["train.py", "--config.train.batch_size=8", f"--config={TINY}"]
    monkeypatch.setattr("sys.argv", argv)
    fv = flags.FlagValues()
    config_io.define_config_flag("config", flag_values=fv)
    with pytest.raises(flags.IllegalFlagValueError, match="comes before --config"):
        fv(argv)


def test_config_io_uses_no_private_ml_collections_api():
    tree = ast.parse((ROOT / "edm_jax" / "train" / "config_io.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("config_flags" in (m or "") for m in modules)
    private = [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
        and isinstance(n.value, ast.Name) and n.value.id in ("flags", "ml_collections")
    ]  # fmt: skip
    assert private == []
