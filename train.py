"""Train an EDM-style diffusion model: python train.py --config configs/digits.py --workdir runs/x.

k-diffusion's config files train as they are: python train.py --config config_mnist.json
--name RUN (--name is the workdir); --grow-from WORKDIR starts a fresh image_v1 run from the
EMA of a smaller one (progressive growing).

Overrides: --config.train.batch_size=64; variants: --config configs/cifar10.py:arch=ncsnpp;
YAML/JSON configs: --config my.yaml. Multi-host: --coordinator_address/--num_processes/
--process_id or the JAX_* environment variables.

A user error (bad config key or value, missing data, a workdir in use or holding a run
with another config) prints one line ``error: ...`` and exits 2; a run that cannot go on
(non-finite loss, failed checkpoint save) prints one line and exits 1. ``--debug`` shows
the full traceback instead.
"""

import os
import re
import sys

from absl import app, flags, logging

from edm_jax.train import config_io

CONFIG = config_io.define_config_flag("config", default="configs/digits.py")
WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "run directory (checkpoints, logs)")
NAME = flags.DEFINE_string("name", None, "k-diffusion's run name: the run directory (--workdir)")
GNS = flags.DEFINE_bool(
    "gns", False, "log the gradient noise scale in stats.jsonl (train.gns; needs grad_accum >= 2)"
)
GROW = flags.DEFINE_string(
    "grow-from", None, "k-diffusion image_v1: start from the EMA of the smaller run in this workdir"
)
COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
AUTO = flags.DEFINE_bool("distributed_auto", False, "multi-host: let jax detect the cluster")
STOP = flags.DEFINE_integer("stop_at_step", None, "save and stop once this step is reached")
CACHE = flags.DEFINE_string(
    "jax_cache_dir", None, "persistent XLA compilation cache (reused by later runs)"
)
DEBUG = flags.DEFINE_bool("debug", False, "show full tracebacks of errors")

# A user can fix these: exit status 2. A run that cannot go on: exit status 1.
USER_ERRORS = (ValueError, KeyError, OSError)


def _one_line(e: BaseException) -> str:
    """The error message on one line."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "error: " + " ".join(text.split())


def _flag_message(text: str) -> str:
    """absl's flag error without repeated prefixes; an override's error names its key alone."""
    m = re.match(r"flag --config=(\S+): (?:config \1: )?(.*)", text)
    if m:
        override = m.group(2).startswith("config.")  # "config.<key>='v' must be an int"
        return m.group(2) if override else f"config {m.group(1)}: {m.group(2)}"
    return text


def parse_flags(argv):
    """absl flag parsing; a bad flag or config prints one line and exits 2 (unless --debug)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, *USER_ERRORS) as e:
        if "--debug" in argv:
            raise
        line = "error: " + _flag_message(_one_line(e)[len("error: ") :])
        if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an unknown override key
            key = str(e).strip("'\" ")
            arg = next((a for a in argv[1:] if key and key in a), "")
            line = f"error: unknown config key {key!r} in {arg}"
        print(line, file=sys.stderr)
        sys.exit(2)


def main(argv):
    """Parse flags, start multi-host if asked, train."""
    del argv
    import jax

    from edm_jax.train import NonFiniteLossError, maybe_initialize, train
    from edm_jax.train.checkpoint import CheckpointSaveError
    from edm_jax.train.workdir_lock import WorkdirLockedError

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if CACHE.value:
        jax.config.update("jax_compilation_cache_dir", CACHE.value)

    maybe_initialize(COORD.value, NPROC.value, PID.value, auto=AUTO.value)
    try:
        config = CONFIG.value
        if GNS.value:
            config.train.gns = True
        train(config, _workdir(), stop_at_step=STOP.value, grow_from=GROW.value)
    except (NonFiniteLossError, CheckpointSaveError, WorkdirLockedError, *USER_ERRORS) as e:
        if DEBUG.value:
            raise
        _quiet_exit(2 if isinstance(e, (WorkdirLockedError, *USER_ERRORS)) else 1, _one_line(e))


def _workdir() -> str:
    """--workdir, or k-diffusion's --name (both given and different: an error)."""
    if NAME.value is None:
        return WORKDIR.value
    if flags.FLAGS["workdir"].present and WORKDIR.value != NAME.value:
        raise ValueError(f"--name={NAME.value!r} and --workdir={WORKDIR.value!r}: give one of them")
    return NAME.value


def _quiet_exit(code: int, line: str) -> None:
    """Print the one error line and leave at once.

    After a failed save (a full disk) orbax's background threads and asyncio futures would
    print hundreds of lines of tracebacks at interpreter exit; the run's own cleanup (lock,
    checkpointer, data workers) has already happened in train()'s finally. --debug shows
    the traceback instead.
    """
    import logging as std_logging

    std_logging.disable(std_logging.CRITICAL)
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
