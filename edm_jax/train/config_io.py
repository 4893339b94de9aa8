"""Training configs: the default ConfigDict, config variants, loading .py / .yaml / .json.

A config is an ``ml_collections.ConfigDict`` with the sections of ``default_config()``.
``configs/<x>.py`` files start from ``default_config()`` and change what they need; their
``get_config(arg)`` reads its variant string ('arch=ncsnpp,cond=0') with ``parse_variant``,
which rejects unknown variants. A ``.yaml`` or ``.json`` file holds the same keys (any
subset) and is merged onto the defaults; unknown keys get a "did you mean", values are
converted to the default's type, parse errors name the file and line. ``load_config`` is
the one loader (the --config flag uses it too).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from edm_jax.checks import did_you_mean

__all__ = [
    "check_key_path", "default_config", "define_config_flag", "load_config", "merge_mapping", "parse_variant",
    "to_json",
]  # fmt: skip


def _section(**kw: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may hold, with EDM's CIFAR-10 values as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = _section(
        name="digits", resolution=8, channels=1, use_labels=False, path="", tfds_name="",
        tfds_data_dir="", split="train", cache=False, num_workers=0,
        encoder="", encoder_weights="",  # latent diffusion: VAE preset/config.json and .npz
    )  # fmt: skip
    c.model = _section(
        arch="ddpmpp", precond="edm", dtype="float32", self_cond=False, patch_size=1,
        img_resolution=0,  # 0: data.resolution
        net=ml_collections.ConfigDict(),  # network field overrides (model_channels, ...)
        precond_kwargs=ml_collections.ConfigDict(),
        kdiff_config="",  # arch 'kdiffusion': the loaded k-diffusion JSON config (its model)
    )  # fmt: skip
    # loss: a preset (edm/vp/ve) whose sigma density and weighting can be replaced
    # ('' keeps the preset's); kwargs: the density's options, sigma_data, uncertainty.
    c.loss = _section(name="edm", density="", weighting="", kwargs=ml_collections.ConfigDict())
    c.optim = _section(lr=1e-3, lr_rampup_kimg=10000.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0)
    c.optim.schedule = "edm"  # 'edm2': lr / sqrt(max(nimg / (ref_batches batch), 1)) (EDM2)
    c.optim.ref_batches = 70000.0
    # EDM: half-life in kimg with ramp-up (None-like: rampup_ratio=0); EDM2: power-EMA stds.
    c.ema = _section(halflife_kimg=500.0, rampup_ratio=0.05, power_stds=())
    c.ema.snapshot_every_kimg = 0.0  # EDM2 post-hoc EMA: write power EMAs (0: never)
    c.ema.snapshot_dtype = "float16"  # as NVlabs/edm2's snapshots
    c.train = _section(
        batch_size=512, total_kimg=200000.0, grad_accum=1, augment_p=0.0, self_cond_prob=0.5,
        remat="none", fsdp=False, fsdp_min_size=2**18,
        gns=False,  # log the gradient noise scale (its small batches: the grad_accum micro-batches)
    )  # fmt: skip
    c.log = _section(
        log_every_steps=100, checkpoint_every_steps=1000, keep_checkpoints=3,
        keep_period_steps=0, sample_every_kimg=0.0, sample_grid=8, sample_steps=18,
        sample_seed=0, tqdm=True, tensorboard=True,
    )  # fmt: skip
    # Sample-quality metrics during training (edm_jax.metrics; k-diffusion --evaluate-every).
    c.eval = _section(
        every_kimg=0.0, num=50000, metrics=("fid",), ref="", sampler="heun", steps=18,
        batch_size=64, seed=0, weights=_section(inception="", dinov2=""),
    )  # fmt: skip
    return c


# --------------------------------------------------------------------------- variants

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _variant_value(key: str, value: str | None, default: Any) -> Any:
    """One variant value converted to its default's type (a tuple default lists the choices)."""
    if isinstance(default, tuple):  # choices, the first is the default
        if value not in default:
            raise ValueError(
                f"config variant {key}={value!r} is not valid{did_you_mean(value, default)}; "
                f"valid: {list(default)}"
            )
        return value
    if isinstance(default, bool):
        if value is None or value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"config variant {key}={value!r} must be a flag: 1/0/true/false")
    if value is None:
        raise ValueError(f"config variant {key!r} needs a value: {key}=...")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(
            f"config variant {key}={value!r} must be of type {type(default).__name__}"
        ) from None


def parse_variant(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'k=v,flag,k2=v2' -> typed values over `defaults` (big_vision's parse_arg).

    A default's type converts the value (a bool takes 'flag', 'flag=1' or 'flag=0'; a
    tuple lists the valid choices, its first is the default). Unknown keys raise a
    ValueError with "did you mean" and the valid keys.
    """
    out = {k: v[0] if isinstance(v, tuple) else v for k, v in defaults.items()}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config variant {key!r}{did_you_mean(key, defaults)}; "
                f"valid: {sorted(defaults) or 'none (this config takes no variant)'}"
            )
        out[key] = _variant_value(key, value.strip() if eq else None, defaults[key])
    return ml_collections.ConfigDict(out)


# --------------------------------------------------------------------------- merging files


def _a(value: Any) -> str:
    """'an int', 'a float', 'a bool', 'a str': the type of a default, for messages."""
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _coerce(name: str, current: Any, value: Any) -> Any:
    """value converted to the type of the default `current` where that is unambiguous."""
    if isinstance(value, list):
        value = tuple(value)
    if current is None or value is None or isinstance(current, tuple):
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if type(value) is not type(current):
            raise ValueError(f"config key {name!r} must be {_a(current)}, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, (int, str)):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(current, int) and isinstance(value, float):
        raise ValueError(f"config key {name!r} must be an int, got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(value, (int, float)):
        raise ValueError(f"config key {name!r} must be {_a(current)}, got {value!r}")
    if isinstance(current, str) and not isinstance(value, str):
        raise ValueError(f"config key {name!r} must be {_a(current)}, got {value!r}")
    return value


def merge_mapping(
    config: ml_collections.ConfigDict, values: Mapping, prefix: str = ""
) -> ml_collections.ConfigDict:
    """Set config keys from a nested mapping; unknown keys raise ValueError with "did you mean"."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in config:
            raise ValueError(
                f"unknown config key {name!r}{did_you_mean(key, config.keys())}; "
                f"valid: {sorted(config.keys())}"
            )
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, Mapping):
            if not current.keys():  # open sections (net overrides, loss kwargs): take as is
                config[key] = ml_collections.ConfigDict(
                    {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            else:
                merge_mapping(current, value, prefix=f"{name}.")
        elif isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"config key {name!r} is a section; give it a mapping, not {value!r}")
        else:
            config[key] = _coerce(name, current, value)
    return config


def _yaml_loader():
    """PyYAML's SafeLoader reading YAML 1.2 floats too ('1e-3', not only '1.0e-3')."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    float_re = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return yaml, Loader


def _read_mapping(path: Path) -> Mapping:
    """Parse a .json or .yaml file into a mapping; errors name the file and line."""
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"config file {path} is empty")
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    else:
        yaml, loader = _yaml_loader()
        try:
            values = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(f"{where}: invalid YAML: {problem}") from None
    if values is None:
        raise ValueError(f"config file {path} holds no settings")
    if not isinstance(values, Mapping):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return values


def _key_line(path: Path, message: str) -> str:
    """':N' for the line of the config key quoted first in message (YAML and JSON), else ''."""
    match = re.search(r"config key '([\w.]+)'", message)
    if not match:
        return ""
    keys = match.group(1).split(".")
    lines = path.read_text().splitlines()
    i = 0
    for key in keys:  # each key at or after its parent's line
        pattern = re.compile(rf"(^|[\s{{,])[\"']?{re.escape(key)}[\"']?\s*:")
        while i < len(lines) and not pattern.search(lines[i]):
            i += 1
        if i == len(lines):
            return ""
    return f":{i + 1}"


def _is_kdiff(values: Mapping) -> bool:
    """A k-diffusion config file: its 'model' section names a 'type' (ours name an 'arch')."""
    model = values.get("model")
    return isinstance(model, Mapping) and "type" in model


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Config from 'x.py[:arg]' (its get_config(arg)), 'x.yaml' / 'x.yml' or 'x.json'."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path_str!r} not found")
    if path.suffix in (".json", ".yaml", ".yml"):
        if arg:
            raise ValueError(f"config {spec!r}: variants (':{arg}') apply to .py configs only")
        try:
            values = _read_mapping(path)
            if path.suffix == ".json" and _is_kdiff(values):  # k-diffusion's own config files
                from edm_jax.train.kdiff_run import to_train_config

                return to_train_config(values, default_config())
            return merge_mapping(default_config(), values)
        except ValueError as e:
            msg = str(e)
            if msg.startswith(str(path)):
                raise
            line = _key_line(path, msg)
            raise ValueError(f"{path}{line}: {msg}") from None
    if path.suffix != ".py":
        raise ValueError(f"config {spec!r}: expected a .py, .yaml, .yml or .json file")
    module_spec = importlib.util.spec_from_file_location(f"_edm_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config file {path} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ValueError(f"config {spec}: {e}") from None


NET_SECTION = "model.net."


def _net_defaults(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every settable field of config.model.arch's network with its (preset) default."""
    import dataclasses

    from edm_jax.nets.presets import net_fields, resolve_arch

    try:
        net_cls, preset = resolve_arch(config.model.arch)
    except ValueError:
        return {}  # validate_config names the bad arch
    settable = set(net_fields(net_cls))
    fields = {f.name: f.default for f in dataclasses.fields(net_cls) if f.name in settable}
    return {k: v for k, v in {**fields, **preset}.items() if v is not dataclasses.MISSING}


def add_net_fields(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Give config.model.net the network fields named by --config.model.net.<field> overrides.

    A field the config file did not set gets its default, so that the override parses to
    its type; a name that is no field of the network is an error with "did you mean".
    """
    defaults = _net_defaults(config)
    for path in overrides:
        if not path.startswith(NET_SECTION) or not defaults:
            continue
        key = path[len(NET_SECTION) :].split(".")[0]
        if key in config.model.net:
            continue
        if key not in defaults:
            raise ValueError(
                f"unknown config key 'model.net.{key}'{did_you_mean(key, defaults)}: not a field "
                f"of the {config.model.arch!r} network; valid: {sorted(defaults)}"
            )
        value = defaults[key]
        config.model.net[key] = tuple(value) if isinstance(value, list) else value


class _AnyConfigParser(flags.ArgumentParser):
    """The --config flag's parser: load_config (.py[:arg], .yaml/.yml, .json), then the
    ``--<name>.<key>=value`` overrides of argv, typed as the keys' current values; locked."""

    def __init__(self, name: str = "config", lock_config: bool = True, flag_values=None):
        self.name, self._lock_config = name, lock_config
        self._flag_values = flag_values  # the flags' home; None: a bare parser (no argv)
        self.parsing_default = False

    def parse(self, argument):
        """The config of ``argument`` with the command line's overrides applied."""
        argv = self._argv()
        if self.parsing_default and _spec_index(argv, self.name) >= 0:
            return None  # the command line names the config: the default is never loaded
        config = load_config(argument)
        overrides = _overrides(argv, self.name, config)
        add_net_fields(config, [path for path, _ in overrides])
        for path, text in overrides:
            _apply_override(config, self.name, path, text)
            flag = f"{self.name}.{path}"
            if isinstance(_get(config, path), bool) and flag in (self._flag_values or {}):
                self._flag_values[flag].boolean = True  # absl: --name.key alone is true
        if self._lock_config:
            config.lock()
        return config

    def flag_type(self) -> str:
        """absl's --help type name."""
        return "config object"

    def _argv(self) -> list[str]:
        """The command line (--flagfile expanded) as parsed now; none for a bare parser."""
        import sys

        if self._flag_values is None:
            return []
        return _flag_args(self._flag_values.read_flags_from_files(sys.argv, force_gnu=False))


def _flag_args(argv: list[str]) -> list[str]:
    """The arguments absl reads as flags: those before a '--'."""
    return argv[: argv.index("--")] if "--" in argv else list(argv)


def _spec_index(argv: list[str], name: str) -> int:
    """Index of the --name / --name=spec argument in argv, -1 if absent."""
    pattern = re.compile(rf"^--?{re.escape(name)}(=|$)")
    return next((i for i, a in enumerate(argv) if pattern.match(a)), -1)


def _override_names(argv: list[str], name: str) -> list[str]:
    """Key paths of the --name.<path>[=value] / --noname.<path> arguments, in order."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    return list(dict.fromkeys(m.group(1) for a in argv if (m := pattern.match(a))))


def _overrides(argv: list[str], name: str, config) -> list[tuple[str, str]]:
    """(key path, text) of each override in argv, the last of a key winning. A bool key
    alone is 'true' (--no<name>.<key>: 'false'); another key alone takes the next argument."""
    spec_at = _spec_index(argv, name)
    pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?$", re.S)
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        m = pattern.match(argv[i])
        i += 1
        if not m:
            continue
        neg, path, text = m.groups()
        if 0 <= spec_at and i - 1 < spec_at:
            raise ValueError(f"{argv[i - 1]} comes before --{name}; give overrides after it")
        current = _get(config, path)
        if text is None and (isinstance(current, bool) or neg):
            text = "false" if neg else "true"
        elif text is None:
            if i >= len(argv):
                raise ValueError(f"{argv[i - 1]} needs a value")
            text, i = argv[i], i + 1
        out.pop(path, None)
        out[path] = text
    return list(out.items())


def _get(config, path: str) -> Any:
    """config at the dotted path (None where the path is not there yet)."""
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return None
        node = node[key]
    return node


def _typed(flag: str, current: Any, text: str) -> Any:
    """An override's text as the type of the key's current value; a tuple, a section or an
    empty (None) key takes a Python literal, else the text itself."""
    try:
        if isinstance(current, bool):
            if text.lower() in _TRUE + ("t",) or text.lower() in _FALSE + ("f",):
                return text.lower() in _TRUE + ("t",)
            raise ValueError
        if isinstance(current, (int, float, str)):
            return type(current)(text)
    except ValueError:
        kind = "a bool (true/false)" if isinstance(current, bool) else _a(current)
        raise ValueError(f"{flag}={text!r} must be {kind}") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _apply_override(config, name: str, path: str, text: str) -> None:
    """Set config's key at the dotted path from the command line's text."""
    check_key_path(config, path)
    *parents, key = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        node[key] = _typed(f"{name}.{path}", node[key], text)
    else:  # inside a value (a tuple index...): not a key ml_collections can set
        raise ValueError(f"{name}.{path}: {'.'.join(parents)} is not a config section")


def check_key_path(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Raise ValueError with "did you mean" unless 'a.b.c' names a key of config."""
    node: Any = config
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(node, ml_collections.ConfigDict):
            return  # inside a value (a tuple index...): ml_collections decides
        if key not in node:
            where = ".".join(dotted.split(".")[:i] + [key])
            raise ValueError(
                f"unknown config key {where!r}{did_you_mean(key, node.keys())}; "
                f"valid: {sorted(node.keys())}"
            )
        node = node[key]


def define_config_flag(name: str = "config", default: str | None = None, flag_values=None):
    """An absl flag --name (a config file spec, read by load_config) whose value is the
    config with the command line's ``--name.<key>=value`` overrides applied, locked.

    Only public absl and ml_collections API: the overrides of argv (expanded --flagfile)
    are defined as flags of their own so that absl accepts them, and applied by the
    --name flag's parser. Bad files, variants and overrides give one "FATAL Flags parsing
    error" line (with "did you mean") instead of a traceback.
    """
    import sys

    flag_values = flags.FLAGS if flag_values is None else flag_values
    parser = _AnyConfigParser(name=name, lock_config=True, flag_values=flag_values)
    argv = _flag_args(flag_values.read_flags_from_files(sys.argv, force_gnu=False))
    for path in _override_names(argv, name):
        if f"{name}.{path}" not in flag_values:  # absl parses them; the parser applies them
            help_string = f"an override of --{name}'s key {path}"
            override: flags.Flag = flags.Flag(
                flags.ArgumentParser(), flags.ArgumentSerializer(), f"{name}.{path}", None,
                help_string,
            )  # fmt: skip
            flags.DEFINE_flag(override, flag_values)
    parser.parsing_default = True
    try:
        flag = flags.Flag(
            parser, flags.ArgumentSerializer(), name, default,
            "training config: configs/x.py[:variant], or a .yaml/.json file",
        )  # fmt: skip
    finally:
        parser.parsing_default = False
    return flags.DEFINE_flag(flag, flag_values)


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
