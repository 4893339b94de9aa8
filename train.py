"""Train an EDM-style diffusion model: python train.py --config configs/digits.py --workdir runs/x.

Overrides: --config.train.batch_size=64; variants: --config configs/cifar10.py:arch=ncsnpp;
YAML/JSON configs: --config my.yaml. Multi-host: --coordinator_address/--num_processes/
--process_id or the JAX_* environment variables.
"""

import sys

from absl import app, flags, logging

from edm_jax.train import config_io

CONFIG = config_io.define_config_flag("config", default="configs/digits.py")
WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "run directory (checkpoints, logs)")
COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
AUTO = flags.DEFINE_bool("distributed_auto", False, "multi-host: let jax detect the cluster")
STOP = flags.DEFINE_integer("stop_at_step", None, "save and stop once this step is reached")
CACHE = flags.DEFINE_string(
    "jax_cache_dir", None, "persistent XLA compilation cache (reused by later runs)"
)


def main(argv):
    """Parse flags, start multi-host if asked, train."""
    del argv
    import jax

    from edm_jax.train import NonFiniteLossError, maybe_initialize, train

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if CACHE.value:
        jax.config.update("jax_compilation_cache_dir", CACHE.value)

    maybe_initialize(COORD.value, NPROC.value, PID.value, auto=AUTO.value)
    try:
        train(CONFIG.value, WORKDIR.value, stop_at_step=STOP.value)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
