"""Training configs, validation, learning-rate schedule and EMA rules (no compilation)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testlib import ROOT, tiny_config

from edm_jax.train import config_io, state, validate
from edm_jax.train.loop import train


def test_yaml_and_json_configs_hold_the_same_keys(tmp_path):
    base = tiny_config()
    values = {
        "train": {"batch_size": 32},
        "model": {"arch": "ncsnpp", "net": {"model_channels": 4}},
    }
    (tmp_path / "c.json").write_text(json.dumps(values))
    yaml = "train:\n  batch_size: 32\nmodel:\n  arch: ncsnpp\n  net:\n    model_channels: 4\n"
    (tmp_path / "c.yaml").write_text(yaml)
    a = config_io.load_config(str(tmp_path / "c.json"))
    b = config_io.load_config(str(tmp_path / "c.yaml"))
    assert a.to_dict() == b.to_dict()
    assert a.train.batch_size == 32 and a.model.arch == "ncsnpp" and a.model.net.model_channels == 4
    assert a.optim.lr == config_io.default_config().optim.lr  # the rest are the defaults
    assert base.train.batch_size == 16


def test_resolved_config_round_trips_through_json(tmp_path):
    c = config_io.load_config(str(ROOT / "configs" / "digits.py"))
    (tmp_path / "r.json").write_text(config_io.to_json(c))
    again = config_io.load_config(str(tmp_path / "r.json"))
    assert config_io.to_json(again) == config_io.to_json(c)
    assert again.model.net.channel_mult == (1, 2)


def test_unknown_key_in_yaml_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  batchsize: 32\n")
    with pytest.raises(ValueError, match="train.batchsize"):
        config_io.load_config(str(tmp_path / "c.yaml"))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_io.load_config("nope.py")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model.arch", "unet9000", "model.arch"),
        ("train.batch_size", 12, "train.batch_size"),  # 12 is not divisible by 8 devices
        ("model.img_resolution", 16, "model.img_resolution"),  # data is 8x8
        ("model.dtype", "float8", "model.dtype"),
        ("loss.name", "l1", "loss.name"),
        ("loss.density", "lognormall", "did you mean 'lognormal'"),
        ("loss.weighting", "min-snr", "loss.weighting"),
        ("loss.kwargs", {"Pmean": 0.0}, "loss.kwargs: unknown options"),
        ("train.remat", "some", "train.remat"),
        ("optim.lr", -1.0, "optim.lr"),
        ("ema.snapshot_every_kimg", -1.0, "config.ema.snapshot_every_kimg must be a number >= 0"),
    ],
)
def test_bad_values_fail_before_compiling(tmp_path, monkeypatch, key, value, match):
    def no_compile(*a, **k):
        raise AssertionError("compiled despite a bad config")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        train(tiny_config(**{key: value}), tmp_path)


def test_unknown_net_field_and_resolution_divisibility_are_named():
    c = tiny_config()
    c.model.net.widht = 3
    with pytest.raises(ValueError, match=r"model\.net\.widht"):
        validate.validate_config(c, 8)
    c = tiny_config(**{"data.resolution": 10})
    c.model.net.channel_mult = (1, 2, 2)

    class Source:
        resolution, channels, num_classes = 10, 1, 10

    with pytest.raises(ValueError, match=r"data\.resolution"):
        validate.validate_data(c, Source())


def test_lr_schedule_is_edm_rampup():
    sched = state.lr_schedule(1e-3, rampup_kimg=10.0, batch_size=500)
    got = [float(sched(jnp.asarray(n))) for n in (0, 1, 10, 20, 100)]
    np.testing.assert_allclose(got, [0.0, 5e-5, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_edm_ema_beta_halflife_with_rampup():
    beta = state.edm_ema_beta(jnp.asarray(1e6), 512, halflife_kimg=500.0, rampup_ratio=0.05)
    np.testing.assert_allclose(float(beta), 0.5 ** (512 / 50_000), rtol=1e-6)  # ramped: 5%
    beta = state.edm_ema_beta(jnp.asarray(1e8), 512, halflife_kimg=500.0, rampup_ratio=0.05)
    np.testing.assert_allclose(float(beta), 0.5 ** (512 / 500_000), rtol=1e-6)
    assert float(state.edm_ema_beta(jnp.asarray(0.0), 512, 500.0, 0.05)) == 0.0  # copy at start


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1, 0.2])
def test_power_ema_std_and_exponent_invert(std):
    assert state.exp_to_std(state.std_to_exp(std)) == pytest.approx(std, rel=1e-9)


def test_power_ema_weights_are_the_edm2_power_profile(x64):
    """After T steps, theta_t has weight (t^(g+1) - (t-1)^(g+1)) / T^(g+1) (telescoping betas)."""
    gamma, batch, T = state.std_to_exp(0.1), 4, 12
    thetas = jnp.arange(1.0, T + 1.0) ** 2  # any sequence
    ema = jnp.zeros([])
    for t in range(1, T + 1):
        beta = state.power_ema_beta(jnp.asarray(t * batch), batch, gamma)
        ema = state.ema_update(ema, thetas[t - 1], beta)
    t = np.arange(1, T + 1, dtype=np.float64)
    w = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / T ** (gamma + 1)
    np.testing.assert_allclose(float(ema), float(np.sum(w * np.asarray(thetas))), rtol=1e-12)


@pytest.mark.parametrize(
    "spec",
    ["digits.py", "digits.py:cfg", "mnist.py", "cifar10.py", "cifar10.py:arch=ncsnpp,cond=0",
     "ffhq64.py", "afhqv2_64.py:arch=ncsnpp", "imagenet64.py", "tiny.py"],
)  # fmt: skip
def test_every_shipped_config_validates(spec):
    c = config_io.load_config(str(ROOT / "configs" / spec))
    validate.validate_config(c, 8)
    assert set(c.keys()) == set(config_io.default_config().keys())


def test_cifar10_is_edm_config_f():
    c = config_io.load_config(str(ROOT / "configs" / "cifar10.py:arch=ncsnpp"))
    assert c.model.arch == "ncsnpp_cifar10" and c.train.batch_size == 512
    assert (c.optim.lr, c.optim.lr_rampup_kimg, c.ema.halflife_kimg) == (1e-3, 10000.0, 500.0)
    assert (c.model.net.dropout, c.train.augment_p, c.train.total_kimg) == (0.13, 0.12, 200000.0)
    with pytest.raises(ValueError, match="arhc"):
        config_io.load_config(str(ROOT / "configs" / "cifar10.py:arhc=ncsnpp"))


def test_config_flag_parser_reads_py_variants_and_yaml(tmp_path):
    parser = config_io._AnyConfigParser(name="config")
    c = parser.parse(f"{ROOT / 'configs' / 'cifar10.py'}:arch=ncsnpp")
    assert c.model.arch == "ncsnpp_cifar10"
    (tmp_path / "c.yml").write_text("optim:\n  lr: 0.0005\n")
    c = parser.parse(str(tmp_path / "c.yml"))
    assert c.optim.lr == 0.0005
    with pytest.raises(AttributeError):  # locked like config_flags' own configs
        c.optim.lrr = 1.0


# --------------------------------------------------------------------------- variants and files


@pytest.mark.parametrize(
    "spec,match",
    [
        ("digits.py:uncnd", r"unknown config variant 'uncnd'.*valid: \['cfg', 'cond'\]"),
        ("ffhq64.py:cond=0", r"unknown config variant 'cond'.*valid: \['arch'\]"),
        ("ffhq64.py:foo", r"unknown config variant 'foo'"),
        ("afhqv2_64.py:arch=ncsnp", r"arch='ncsnp'.*did you mean 'ncsnpp'.*\['ddpmpp', 'ncsnpp'\]"),
        ("cifar10.py:cond=maybe", r"cond='maybe' must be a flag"),
        ("tiny.py:arch=ncsnpp", r"unknown config variant 'arch'.*valid: \['cond'\]"),
    ],
)
def test_a_variant_typo_is_an_error(spec, match):
    with pytest.raises(ValueError, match=match):
        config_io.load_config(str(ROOT / "configs" / spec))


def test_variants_are_typed():
    assert not config_io.load_config(str(ROOT / "configs" / "cifar10.py:cond=0")).data.use_labels
    assert not config_io.load_config(str(ROOT / "configs" / "digits.py:cond=false")).data.use_labels
    c = config_io.load_config(str(ROOT / "configs" / "digits.py:cfg"))
    assert c.data.use_labels and c.model.net.label_dropout == 0.1
    assert config_io.load_config(str(ROOT / "configs" / "imagenet64.py:fsdp")).train.fsdp
    c = config_io.load_config(str(ROOT / "configs" / "afhqv2_64.py:arch=ncsnpp"))
    assert (c.model.arch, c.model.net.dropout) == ("ncsnpp_64", 0.25)
    v = config_io.parse_variant("n=3, lr=1e-3,name=x,on", n=1, lr=0.1, name="", on=False)
    assert (v.n, v.lr, v.name, v.on) == (3, 1e-3, "x", True)
    with pytest.raises(ValueError, match="n='three' must be of type int"):
        config_io.parse_variant("n=three", n=1)


def test_no_config_loads_a_sibling_by_path():
    for path in (ROOT / "configs").glob("*.py"):
        assert "spec_from_file_location" not in path.read_text(), path.name


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_yaml_numbers_take_the_default_type(tmp_path):
    c = config_io.load_config(_write(tmp_path, "c.yaml", "optim:\n  lr: 1e-3\n  eps: 1\n"))
    assert c.optim.lr == 1e-3 and isinstance(c.optim.lr, float)
    assert c.optim.eps == 1.0 and isinstance(c.optim.eps, float)
    with pytest.raises(
        ValueError, match=r"c2\.yaml:2: config key 'train.batch_size' must be an int"
    ):
        config_io.load_config(_write(tmp_path, "c2.yaml", "train:\n  batch_size: abc\n"))
    with pytest.raises(
        ValueError, match=r"c3\.json:1: .*'train.batch_size' must be an int, got 2.5"
    ):
        config_io.load_config(_write(tmp_path, "c3.json", '{"train": {"batch_size": 2.5}}'))


def test_config_file_errors_name_the_file_and_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "train:\n  batch_size: 32\n   total_kimg: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:3:\d+: invalid YAML"):
        config_io.load_config(path)
    path = _write(tmp_path, "bad.json", '{"train":\n {"batch_size": 32,}}')
    with pytest.raises(ValueError, match=r"bad\.json:2:\d+: invalid JSON"):
        config_io.load_config(path)
    for text in ("", "# nothing here\n"):
        with pytest.raises(ValueError, match="empty|no settings"):
            config_io.load_config(_write(tmp_path, "empty.yaml", text))
    path = _write(tmp_path, "typo.yaml", "train:\n  batchsize: 32\n")
    with pytest.raises(
        ValueError, match=r"typo\.yaml:2: .*'train.batchsize' \(did you mean 'batch_size'\?\)"
    ):
        config_io.load_config(path)


def test_unknown_override_key_is_one_flag_error(monkeypatch):
    from absl import flags

    spec = str(ROOT / "configs" / "tiny.py")
    argv = ["train.py", "--config", spec, "--config.train.batchsize=3"]
    monkeypatch.setattr("sys.argv", argv)
    fv = flags.FlagValues()
    config_io.define_config_flag("config", flag_values=fv)
    with pytest.raises(flags.IllegalFlagValueError, match=r"'train.batchsize' \(did you mean "
                       r"'batch_size'\?\)"):  # fmt: skip
        fv(argv)
    argv = ["train.py", "--config", spec, "--config.optim.lr=1e-4"]
    monkeypatch.setattr("sys.argv", argv)
    fv = flags.FlagValues()
    flag = config_io.define_config_flag("config", flag_values=fv)
    fv(argv)
    assert flag.value.optim.lr == 1e-4 and flag.value.train.batch_size == 16
