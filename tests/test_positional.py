"""Positional encodings: known values and the properties each scheme exists for."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jformer import positional

# Every test runs with implicit rank promotion an error (tests/conftest.py); those taking
# ``variant`` run both under jax.jit and eagerly (chex.variants(with_jit=True, without_jit=True)).
pytestmark = pytest.mark.usefixtures("no_rank_promotion")

# Property tests: few examples, a few widths (each new shape compiles), no per-example deadline;
# the fixtures are stateless, so sharing them across examples is fine.
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HALF_WIDTHS = st.sampled_from([1, 3, 8, 32])  # D = 2, 6, 16, 64


def test_sinusoidal_matches_the_paper_formula(variant):
    T, D = 11, 16
    pe = variant(positional.sinusoidal_positions, static_argnums=(0, 1))(T, D)
    chex.assert_shape(pe, (T, D))
    pe = np.asarray(pe)
    for pos in range(T):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert pe[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_relative_shift_is_linear(variant):
    # The paper's motivation: PE[p + k] is a fixed linear (rotation) map of PE[p] for each frequency.
    pe = variant(positional.sinusoidal_positions, static_argnums=(0, 1))(40, 8)
    k = 5
    pairs = pe.reshape(40, 4, 2)
    w = 10000 ** (-jnp.arange(0, 8, 2) / 8) * k
    # [sin a, cos a] @ [[cos w, -sin w], [sin w, cos w]] = [sin(a + w), cos(a + w)]
    rot = jnp.stack([jnp.stack([jnp.cos(w), -jnp.sin(w)], -1), jnp.stack([jnp.sin(w), jnp.cos(w)], -1)], -2)
    shifted = jnp.einsum("tfi,fij->tfj", pairs[:-k], rot)
    np.testing.assert_allclose(shifted, pairs[k:], atol=1e-4)


def test_rotary_depends_on_relative_position_only(variant):
    q = jax.random.normal(jax.random.key(0), (1, 2, 8))  # [T=1, N=2, H=8]
    k = jax.random.normal(jax.random.key(1), (1, 2, 8))
    rotary = variant(positional.rotary)

    def score(pq, pk):
        return jnp.einsum("tnh,tnh->n", rotary(q, jnp.array([pq])), rotary(k, jnp.array([pk])))

    np.testing.assert_allclose(score(3, 1), score(10, 8), atol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.einsum("tnh,tnh->n", q, k), atol=1e-5)
    assert not np.allclose(score(3, 1), score(1, 3))
    rotated = rotary(q, jnp.array([7]))
    chex.assert_trees_all_close(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1), atol=1e-5)
    # Batched heads [B, T, N, H] at shared positions [T] or per-row positions [B, T]: each row is
    # rotated as on its own, and the dtype is kept.
    x = jax.random.normal(jax.random.key(2), (3, 4, 2, 8)).astype(jnp.bfloat16)
    rows = jnp.arange(12).reshape(3, 4)
    shared, per_row = rotary(x, jnp.arange(4)), rotary(x, rows)
    chex.assert_shape([shared, per_row], x.shape)
    chex.assert_type([shared, per_row], jnp.bfloat16)
    for b in range(3):
        chex.assert_trees_all_close(shared[b], rotary(x[b], jnp.arange(4)))
        chex.assert_trees_all_close(per_row[b], rotary(x[b], rows[b]))


def test_alibi_slopes_known_values():
    np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads.
    np.testing.assert_allclose(positional.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_bias_is_linear_in_distance(variant):
    bias = variant(positional.alibi_bias, static_argnums=(0, 1))(4, 5)
    chex.assert_shape(bias, (4, 5, 5))
    slopes = positional.alibi_slopes(4)
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_allclose(bias, -slopes[:, None, None] * np.abs(i - j)[None], atol=1e-6)
    batched = variant(positional.alibi_bias, static_argnums=0)(4, jnp.array([[3], [4]]),
                                                               jnp.arange(5)[None].repeat(2, 0))
    chex.assert_shape(batched, (2, 4, 1, 5))
    np.testing.assert_allclose(batched[1], bias[:, 4:5], atol=1e-6)


def test_learned_positions_lookup(variant):
    params = positional.init_learned_positions(jax.random.key(0), 10, 4)
    lookup = variant(positional.learned_positions)
    np.testing.assert_array_equal(lookup(params, jnp.array([3, 1])), params["embedding"][jnp.array([3, 1])])
    # Past the table: concrete positions raise; under jit the row is NaN rather than a wrapped lookup.
    if variant.jit:
        out = lookup(params, jnp.array([3, 10]))
        assert bool(jnp.isnan(out[1]).all()) and not bool(jnp.isnan(out[0]).any())
    else:
        with pytest.raises(ValueError, match="max_len|outside"):
            lookup(params, jnp.array([3, 10]))


def test_bad_widths(variant):
    with pytest.raises(ValueError, match="even width"):
        variant(positional.sinusoidal_positions, static_argnums=(0, 1))(4, 5)
    with pytest.raises(ValueError, match="even head width"):
        variant(positional.rotary)(jnp.ones((2, 1, 3)), jnp.arange(2))


# ------------------------------------------------------------------ properties


@PROPERTY
@given(p=st.integers(0, 2000), k=st.integers(0, 2000), half=HALF_WIDTHS)
def test_sinusoidal_entries_are_bounded_and_dot_products_depend_on_the_offset_only(variant, p, k, half):
    """PE[p] · PE[p + k] = Σ_i sin(ω_i p) sin(ω_i (p + k)) + cos(ω_i p) cos(ω_i (p + k)) = Σ_i cos(ω_i k),
    with ω_i = 10000^(-2i/D): whatever p, and with the paper's frequencies."""
    D = 2 * half
    pe = variant(positional.sinusoidal_positions, static_argnums=1)(jnp.array([0, k, p, p + k]), D)
    chex.assert_shape(pe, (4, D))
    pe = np.asarray(pe, np.float64)
    assert np.all(np.abs(pe) <= 1.0)
    omega = 10000.0 ** (-np.arange(0, D, 2) / D)
    expected = np.cos(omega * k).sum()
    np.testing.assert_allclose([pe[0] @ pe[1], pe[2] @ pe[3]], [expected, expected], rtol=0, atol=2e-3)


@PROPERTY
@given(p=st.integers(0, 1000), k=st.integers(-1000, 1000), half=HALF_WIDTHS, seed=st.integers(0, 2 ** 31 - 1))
def test_rotary_scores_depend_on_the_offset_only(variant, p, k, half, seed):
    """⟨rotary(q, p), rotary(k, p + k)⟩ = ⟨rotary(q, 0), rotary(k, k)⟩, and both equal the closed form
    Σ_i (q1 k1 + q2 k2) cos(k ω_i) − (q1 k2 − q2 k1) sin(k ω_i) over pairs (x_i, x_{i+H/2}), ω_i = 10000^(-2i/H)."""
    H = 2 * half
    q, kk = jax.random.normal(jax.random.key(seed), (2, 1, 3, H))  # [T=1, N=3, H] each
    rotary = variant(positional.rotary)

    def score(pq, pk):
        a, b = rotary(q, jnp.array([pq])), rotary(kk, jnp.array([pk]))
        chex.assert_shape([a, b], (1, 3, H))
        return np.einsum("tnh,tnh->n", np.asarray(a, np.float64), np.asarray(b, np.float64))

    qn, kn = np.asarray(q[0], np.float64), np.asarray(kk[0], np.float64)
    q1, q2, k1, k2 = qn[:, :half], qn[:, half:], kn[:, :half], kn[:, half:]
    angle = k * 10000.0 ** (-np.arange(0, H, 2) / H)
    expected = ((q1 * k1 + q2 * k2) * np.cos(angle) - (q1 * k2 - q2 * k1) * np.sin(angle)).sum(-1)
    scale = np.linalg.norm(qn, axis=-1) * np.linalg.norm(kn, axis=-1)  # the scores' magnitude bound
    for got in (score(p, p + k), score(0, k)):
        np.testing.assert_array_less(np.abs(got - expected), 1e-4 * scale + 1e-6)
