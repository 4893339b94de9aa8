"""One home for the grid samplers' calling convention: ``@declare`` and its ``Declaration``.

``@declare(name, options, noise=..., noise_option=...)`` on a step builder ``build(denoise, x,
sigmas, noise, **options) -> (step, carry)`` (``step(carry, i) -> (carry, (x, denoised[,
sigma_hat]))``, x first in a tuple carry) makes k-diffusion's ``sample_<name>(denoise, x,
sigmas, *, rng=None, noise_sampler=None, return_trajectory=False, extra_args=None,
callback=None, disable=None, **options)``; ``SAMPLER_INFO`` reads its entry from the same
``Declaration``, so the option defaults are written once.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from edm_jax.checks import did_you_mean
from edm_jax.samplers.core import finish, is_zero, prepare, scan_steps, with_extra_args
from edm_jax.samplers.noise import resolve_brownian, resolve_noise

NOISE_KINDS = ("none", "gaussian", "brownian")
CONVENTION = ("rng", "noise_sampler", "return_trajectory", "extra_args", "callback", "disable")


@dataclasses.dataclass(frozen=True)
class Declaration:
    """A grid sampler's name, options with defaults (read-only) and noise.

    ``noise``: 'none', 'gaussian' (``resolve_noise``: normal draws from rng) or 'brownian'
    (``resolve_brownian``: a Brownian tree over the grid, at the stage sigmas of option ``r``
    where the sampler has one). ``noise_option``: the option whose concrete 0 turns the
    noise off ('eta'; 's_churn' only when no noise_sampler is given, as EDM's churn).
    ``check(options)``: raises a one-line ValueError for a bad value, before any compute.
    """

    name: str
    options: Mapping[str, Any]
    doc: str
    noise: str = "none"
    noise_option: str | None = None
    check: Callable[[Mapping[str, Any]], None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if (self.noise == "none") != (self.noise_option is None):
            raise ValueError(f"{self.name}: noise_option goes with noise, got {self.noise_option}")
        if self.noise_option is not None and self.noise_option not in self.options:
            raise ValueError(f"{self.name}: noise_option {self.noise_option!r} is not an option")

    @property
    def stochastic(self) -> bool:
        """True if the sampler adds noise with its default options."""
        return self.noise_option is not None and self.options[self.noise_option] != 0

    def resolve_noise(self, options: Mapping[str, Any], rng, noise_sampler, x, sigmas):
        """The noise sampler a call uses (None when it adds no noise)."""
        if self.noise_option is None:
            return None
        off = is_zero(options[self.noise_option])
        if off and (self.noise_option != "s_churn" or noise_sampler is None):
            return None
        if self.noise == "gaussian":
            return resolve_noise(noise_sampler, rng, x, self.name)
        return resolve_brownian(noise_sampler, rng, x, sigmas, self.name, r=options.get("r"))


def declaration_of(fn: Callable) -> Declaration:
    """The Declaration a sampler was made from by ``declare``."""
    return fn.declaration  # type: ignore[attr-defined]


def _signature(decl: Declaration) -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ("denoise", "x", "sigmas")]  # fmt: skip
    params += [inspect.Parameter(n, keyword, default=None) for n in ("rng", "noise_sampler")]
    params += [inspect.Parameter(k, keyword, default=v) for k, v in decl.options.items()]
    params.append(inspect.Parameter("return_trajectory", keyword, default=False))
    params += [inspect.Parameter(n, keyword, default=None) for n in CONVENTION[3:]]
    return inspect.Signature(params)


def _make(decl: Declaration, build: Callable) -> Callable:
    """``sample_<decl.name>``: prepare, extra_args, noise, ``build``'s scan, finish."""
    fname = f"sample_{decl.name}"

    def sampler(
        denoise,
        x,
        sigmas,
        *,
        rng=None,
        noise_sampler=None,
        return_trajectory=False,
        extra_args=None,
        callback=None,
        disable=None,
        **options,
    ):
        unknown = sorted(set(options) - set(decl.options))
        if unknown:
            raise TypeError(
                f"{fname}() got an unexpected keyword argument {unknown[0]!r}"
                f"{did_you_mean(unknown[0], [*decl.options, *CONVENTION])}; "
                f"valid options: {sorted(decl.options)} and {list(CONVENTION)}"
            )
        opts = {**decl.options, **options}
        if decl.check is not None:
            decl.check(opts)
        x, sigmas = prepare(x, sigmas)
        denoise = with_extra_args(denoise, extra_args)
        noise = decl.resolve_noise(opts, rng, noise_sampler, x, sigmas)
        step, carry = build(denoise, x, sigmas, noise, **opts)
        n = sigmas.shape[0] - 1
        carry, traj = scan_steps(step, carry, n, return_trajectory, callback, sigmas)
        return finish(carry[0] if isinstance(carry, tuple) else carry, traj, return_trajectory)

    defaults = ", ".join(f"{k}={v!r}" for k, v in decl.options.items()) or "none"
    sampler.__name__ = sampler.__qualname__ = fname
    sampler.__module__ = build.__module__
    sampler.__doc__ = f"{decl.doc}\n\nOptions (defaults): {defaults}."
    sampler.__signature__ = _signature(decl)  # type: ignore[attr-defined]
    sampler.declaration = decl  # type: ignore[attr-defined]
    return sampler


def declare(
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    noise: str = "none",
    noise_option: str | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    doc: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: a step builder -> ``sample_<name>`` (doc: the builder's docstring)."""

    def wrap(build: Callable) -> Callable:
        text = doc if doc is not None else inspect.getdoc(build) or ""
        return _make(Declaration(name, options or {}, text, noise, noise_option, check), build)

    return wrap
