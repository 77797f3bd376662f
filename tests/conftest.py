"""Eight CPU devices for the multi-device tests (jformer.parallel).

XLA reads the flag once, when jax initialises its backends, so it is set here,
before any test module imports jax. Single-device code is unaffected: arrays
live on device 0 unless sharded.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()


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
