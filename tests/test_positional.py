"""Positional encodings: known values and the properties each scheme exists for."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jformer import positional


def test_sinusoidal_matches_the_paper_formula():
    T, D = 11, 16
    pe = np.asarray(positional.sinusoidal_positions(T, D))
    for pos in range(T):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert pe[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_relative_shift_is_linear():
    # The paper's motivation: PE[p + k] is a fixed linear (rotation) map of PE[p] for each frequency.
    pe = positional.sinusoidal_positions(40, 8)
    k = 5
    pairs = pe.reshape(40, 4, 2)
    w = 10000 ** (-jnp.arange(0, 8, 2) / 8) * k
    # [sin a, cos a] @ [[cos w, -sin w], [sin w, cos w]] = [sin(a + w), cos(a + w)]
    rot = jnp.stack([jnp.stack([jnp.cos(w), -jnp.sin(w)], -1), jnp.stack([jnp.sin(w), jnp.cos(w)], -1)], -2)
    shifted = jnp.einsum("tfi,fij->tfj", pairs[:-k], rot)
    np.testing.assert_allclose(shifted, pairs[k:], atol=1e-4)


def test_rotary_depends_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 2, 8))  # [T=1, N=2, H=8]
    k = jax.random.normal(jax.random.key(1), (1, 2, 8))

    def score(pq, pk):
        return jnp.einsum("tnh,tnh->n", positional.rotary(q, jnp.array([pq])),
                          positional.rotary(k, jnp.array([pk])))

    np.testing.assert_allclose(score(3, 1), score(10, 8), atol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.einsum("tnh,tnh->n", q, k), atol=1e-5)
    assert not np.allclose(score(3, 1), score(1, 3))
    rotated = positional.rotary(q, jnp.array([7]))
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1), atol=1e-5)


def test_alibi_slopes_known_values():
    np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads.
    np.testing.assert_allclose(positional.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_bias_is_linear_in_distance():
    bias = positional.alibi_bias(4, 5)
    assert bias.shape == (4, 5, 5)
    slopes = positional.alibi_slopes(4)
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_allclose(bias, -slopes[:, None, None] * np.abs(i - j)[None], atol=1e-6)
    batched = positional.alibi_bias(4, jnp.array([[3], [4]]), jnp.arange(5)[None].repeat(2, 0))
    assert batched.shape == (2, 4, 1, 5)
    np.testing.assert_allclose(batched[1], bias[:, 4:5], atol=1e-6)


def test_learned_positions_lookup():
    params = positional.init_learned_positions(jax.random.key(0), 10, 4)
    np.testing.assert_array_equal(positional.learned_positions(params, jnp.array([3, 1])),
                                  params["embedding"][jnp.array([3, 1])])


def test_bad_widths():
    with pytest.raises(ValueError, match="even width"):
        positional.sinusoidal_positions(4, 5)
    with pytest.raises(ValueError, match="even head width"):
        positional.rotary(jnp.ones((2, 1, 3)), jnp.arange(2))
