"""Shared test fixtures: float64 switch and the reference fixtures in ../shared."""

import json
import os
from pathlib import Path

import jax
import jax.monitoring
import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture
def x64():
    """Run one test with jax_enable_x64 on, restoring the previous setting after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The ../shared/fixtures folder; tests that need it skip with a reason if absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def sampler_fixture(fixtures_dir) -> dict:
    """The parsed samplers.json reference file."""
    return json.loads((fixtures_dir / "samplers.json").read_text())


_COMPILES = {"n": 0}


def _count(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["n"] += 1


@pytest.fixture
def compile_counter():
    """Number of XLA backend compilations since the fixture started (a callable)."""
    jax.monitoring.register_event_duration_secs_listener(_count)
    start = _COMPILES["n"]
    yield lambda: _COMPILES["n"] - start
    jax.monitoring.unregister_event_duration_listener(_count)


def pytest_configure(config):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A workdir from a real (2-step) training run of configs/tiny.py (digits, 8x8x1), shared."""
    import importlib.util
    from pathlib import Path

    from edm_jax.train import train

    spec = importlib.util.spec_from_file_location(
        "tiny_config", Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.total_kimg = 2 * config.train.batch_size / 1000  # 2 steps
    config.log.checkpoint_every_steps = 2
    config.model.net.channel_mult = (1,)  # one resolution level: the fastest to compile
    workdir = tmp_path_factory.mktemp("tiny_run")
    train(config, workdir, print_summary=False)
    return workdir
