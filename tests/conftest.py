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
