"""Eight CPU devices for the multi-device tests (jformer.parallel), and cheap compiles.

XLA reads its flags once, when jax initialises its backends, so they are set here,
before any test module imports jax. Single-device code is unaffected by the device
count: arrays live on device 0 unless sharded. Most of the suite's time is XLA:CPU
compiling small programs that then run for milliseconds, so LLVM's optimisation level
is lowered to 0 (measured: the masks study's tests took 55 s of CPU instead of 77 s);
the HLO passes, and so the numerics the tests check, are the same.
"""

import os

for _flag, _value in (("--xla_force_host_platform_device_count", "8"), ("--xla_backend_optimization_level", "0")):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()


# ------------------------------------------------------------------ fixtures
# jax is imported inside the fixtures, so that the flag above is set before any jax import.

import pytest  # noqa: E402


@pytest.fixture
def no_rank_promotion():
    """Run the test with ``jax_numpy_rank_promotion="raise"``: an implicit broadcast of a
    lower-rank operand (``x [B, T, D] + b [D]``) raises instead of silently adding axes."""
    import jax

    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(params=["with_jit", "without_jit"])
def variant(request):
    """``chex.variants(with_jit=True, without_jit=True)`` as a pytest fixture: ``variant(fn)``
    is ``jax.jit(fn, static_argnums=..., static_argnames=...)`` or ``fn`` itself, as chex's
    ``self.variant``. Pass arrays as arguments (not closed over) so the jit variant traces them."""
    import jax

    def apply(fn, *, static_argnums=None, static_argnames=None):
        if request.param == "with_jit":
            return jax.jit(fn, static_argnums=static_argnums, static_argnames=static_argnames)
        return fn

    apply.jit = request.param == "with_jit"
    return apply
