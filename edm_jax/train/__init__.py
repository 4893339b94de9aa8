"""Training: config loading and validation, train state and EMA, sharded step, checkpoints, loop."""

from edm_jax.nets.spec import build_model_from_config
from edm_jax.train.checkpoint import Checkpointer
from edm_jax.train.config_io import default_config, load_config, merge_mapping, to_json
from edm_jax.train.loop import setup, total_steps, train
from edm_jax.train.multihost import maybe_initialize
from edm_jax.train.reporting import NonFiniteLossError
from edm_jax.train.state import TrainState, init_state, make_optimizer
from edm_jax.train.step import make_mesh, make_train_step, state_sharding
from edm_jax.train.validate import validate_config, validate_data

__all__ = [
    "Checkpointer",
    "NonFiniteLossError",
    "TrainState",
    "build_model_from_config",
    "default_config",
    "init_state",
    "load_config",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "maybe_initialize",
    "merge_mapping",
    "setup",
    "state_sharding",
    "to_json",
    "total_steps",
    "train",
    "validate_config",
    "validate_data",
]
