"""Layers: parity with flax.linen, BatchNorm state semantics, dropout."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jformer import layers
from tests.hlo_text import computations

# Every test runs with implicit rank promotion an error (tests/conftest.py); those taking
# ``variant`` run both under jax.jit and eagerly (chex.variants(with_jit=True, without_jit=True)).
pytestmark = pytest.mark.usefixtures("no_rank_promotion")

X = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 2.0 + 1.0


def _add_bias(y, b):
    """y [..., *b.shape] + b, broadcast explicitly (implicit rank promotion raises here)."""
    return y + jnp.broadcast_to(b, y.shape)


def test_dense_matches_flax(variant):
    module = nn.Dense(7)
    variables = module.init(jax.random.key(1), X)
    dense = variant(layers.dense)
    chex.assert_trees_all_close(dense(variables["params"], X), module.apply(variables, X), atol=1e-5)
    p = layers.init_dense(jax.random.key(2), 16, (4, 2))
    chex.assert_shape(p["kernel"], (16, 4, 2))
    y = dense(p, X)
    chex.assert_shape(y, (3, 5, 4, 2))
    chex.assert_trees_all_close(y, jnp.einsum("btd,dij->btij", X, p["kernel"]), atol=1e-5)
    # axes=2 contracts the last two axes of x with the first two of the kernel.
    p2 = layers.init_dense(jax.random.key(3), (5, 16), 3)
    y2 = variant(layers.dense, static_argnames="axes")(p2, X, axes=2)
    chex.assert_trees_all_close(y2, _add_bias(jnp.einsum("btd,tdo->bo", X, p2["kernel"]), p2["bias"]), atol=1e-4)


def _plain_dense(p, x):
    """x W + b by plain autodiff: the reference for dense's custom JVP."""
    return _add_bias(jnp.tensordot(x, p["kernel"], axes=1), p["bias"])


@pytest.mark.parametrize("out_shape", [(40,), (4, 2)], ids=["wide", "narrow"])
def test_dense_derivatives_equal_plain_autodiff(variant, out_shape):
    """dense's custom JVP (both branches: x narrower than the output, or wider) gives the
    derivatives of x W + b: gradients, forward mode, second order, and under vmap."""
    p = layers.init_dense(jax.random.key(2), 16, out_shape)
    c = jax.random.normal(jax.random.key(3), X.shape[:-1] + out_shape)

    def loss(dense):
        return lambda p, x: jnp.sum(jnp.sin(dense(p, x)) * c[:, :x.shape[1]])

    fast_dense = functools.partial(layers.dense, fast=True)  # the custom JVP is opt-in
    ours, ref = loss(fast_dense), loss(_plain_dense)
    # fast=True is the same function as the default path, in value and gradient.
    slow = loss(layers.dense)
    chex.assert_trees_all_close(variant(ours)(p, X), slow(p, X), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(variant(jax.grad(ours, (0, 1)))(p, X), jax.grad(slow, (0, 1))(p, X),
                                rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(variant(jax.grad(ours, (0, 1)))(p, X), jax.grad(ref, (0, 1))(p, X),
                                rtol=1e-5, atol=1e-5)
    tangents = (jax.tree.map(jnp.ones_like, p), X)
    jvp = variant(lambda primals, tangents: jax.jvp(ours, primals, tangents)[1])
    np.testing.assert_allclose(jvp((p, X), tangents), jax.jvp(ref, (p, X), tangents)[1], rtol=1e-5)
    hess = [variant(jax.hessian(ours, 1))(p, X[:, :2]), jax.hessian(ref, 1)(p, X[:, :2])]
    chex.assert_trees_all_close(hess[0], hess[1], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(variant(jax.vmap(fast_dense, (None, 0)))(p, X), _plain_dense(p, X),
                                rtol=1e-5, atol=1e-5)


def _unfused_dots(hlo: str) -> int:
    """Dot instructions of a compiled module that XLA:CPU left outside a fusion: those run in
    its generic (Eigen) kernel, while fused ones go to its fast matmul library."""
    fused = set(re.findall(r"fusion\(.*calls=%([\w.\-]+)", hlo))
    return sum(" dot(" in line for name, lines in computations(hlo).items() if name not in fused for line in lines)


@pytest.mark.parametrize("d_in, out_shape", [(16, (40,)), (64, (16,))], ids=["wide", "narrow"])
def test_dense_backward_runs_every_product_in_the_fast_matmul_kernel(d_in, out_shape):
    """Plain autodiff's weight gradient xᵀ g contracts the token axis of both operands, which
    XLA:CPU leaves to its slow generic dot; dense's backward transposes the smaller operand first."""
    x = jax.random.normal(jax.random.key(0), (256, d_in))
    p = layers.init_dense(jax.random.key(2), d_in, out_shape)

    def compiled(dense):
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(dense(p, x))), (0, 1)))
        return grad.lower(p, x).compile().as_text()

    plain = _unfused_dots(compiled(_plain_dense))
    if plain == 0:
        pytest.skip("this XLA:CPU runs plain autodiff's products in fused kernels too")
    assert _unfused_dots(compiled(functools.partial(layers.dense, fast=True))) == 0


@pytest.mark.parametrize("ours, theirs", [
    (layers.layer_norm, nn.LayerNorm(epsilon=1e-5)),
    (layers.layer_norm, nn.LayerNorm(epsilon=1e-5, use_bias=False)),
    (layers.rms_norm, nn.RMSNorm(epsilon=1e-5)),
], ids=["layer", "layer-no-bias", "rms"])
def test_norms_match_flax(variant, ours, theirs):
    variables = theirs.init(jax.random.key(1), X)
    params = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape),
                                    variables["params"])
    chex.assert_trees_all_close(variant(functools.partial(ours, eps=1e-5))(params, X),
                                theirs.apply({"params": params}, X), atol=1e-5)


def test_layer_norm_without_bias(variant):
    p = layers.init_layer_norm(16, use_bias=False)
    assert set(p) == {"scale"}
    layer_norm = variant(layers.layer_norm)
    chex.assert_trees_all_close(layer_norm(p, X), layer_norm({**p, "bias": jnp.zeros(16)}, X), rtol=1e-7, atol=0)
    assert set(layers.init_layer_norm(16)) == {"scale", "bias"}


def _assert_normal(a, std, what):
    """Sample mean and std of a (large) tensor: N(0, std²) within 3% of std."""
    a = np.asarray(a, np.float64)
    assert abs(a.mean()) < 0.03 * std, (what, a.mean())
    np.testing.assert_allclose(a.std(), std, rtol=0.03, err_msg=what)


def test_inits_with_a_given_std_are_normal():
    """std= gives N(0, std²) kernels and embeddings whatever the shape (GPT-2's 0.02);
    without it the defaults stay Glorot uniform (bounded) and N(0, 1/D)."""
    keys = jax.random.split(jax.random.key(3), 4)
    _assert_normal(layers.init_dense(keys[0], 256, (8, 32), std=0.02)["kernel"], 0.02, "dense")
    _assert_normal(layers.init_embedding(keys[1], 512, 128, std=0.02)["embedding"], 0.02, "embedding")
    ffn = layers.init_feed_forward(keys[2], 128, 512, activation="swiglu", std=0.02, out_std=0.005)
    for name, std in (("wi", 0.02), ("gate", 0.02), ("wo", 0.005)):
        _assert_normal(ffn[name]["kernel"], std, name)
        np.testing.assert_array_equal(ffn[name]["bias"], 0.0)
    glorot = layers.init_dense(keys[3], 256, 256)["kernel"]  # U(±√(6 / 512)), std √(2 / 512)
    assert float(jnp.abs(glorot).max()) <= np.sqrt(6 / 512)
    np.testing.assert_allclose(float(glorot.std()), np.sqrt(2 / 512), rtol=0.03)
    _assert_normal(layers.init_embedding(keys[1], 512, 64)["embedding"], 1 / 8, "default embedding")


def test_layer_norm_bf16_computes_in_float32(variant):
    p = layers.init_layer_norm(16)
    y = variant(layers.layer_norm)(p, (X + 1000.0).astype(jnp.bfloat16))
    chex.assert_shape(y, X.shape)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(y.astype(jnp.float32).std(-1), 1.0, atol=0.1)


def test_batch_norm_matches_flax_train_and_eval(variant):
    params, state = layers.init_batch_norm(16)
    batch_norm = variant(layers.batch_norm, static_argnames="train")
    module = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    variables = module.init(jax.random.key(1), X, use_running_average=False)
    ref, updates = module.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    y, new_state = batch_norm(params, state, X, train=True)
    chex.assert_trees_all_close(y, ref, atol=1e-4)
    np.testing.assert_allclose(new_state["mean"], updates["batch_stats"]["mean"], atol=1e-5)
    np.testing.assert_allclose(new_state["var"], updates["batch_stats"]["var"], atol=1e-4)
    # Eval uses the running statistics, not the batch's, and leaves them unchanged.
    ref_eval = module.apply({**variables, **updates}, X[:1], use_running_average=True)
    y_eval, same = batch_norm(params, new_state, X[:1], train=False)
    chex.assert_trees_all_close(y_eval, ref_eval, atol=1e-4)
    chex.assert_trees_all_equal(same, new_state)
    if not variant.jit:
        assert same is new_state
    mean, var = (new_state[k].reshape(1, 1, 16) for k in ("mean", "var"))
    chex.assert_trees_all_close(y_eval, (X[:1] - mean) / jnp.sqrt(var + 1e-5), atol=1e-4)


def test_batch_norm_ignores_padding(variant):
    params, state = layers.init_batch_norm(16)
    batch_norm = variant(layers.batch_norm, static_argnames="train")
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    padded = jnp.where(valid[..., None], X, 1e6)  # garbage at padded positions
    _, s_masked = batch_norm(params, state, padded, train=True, valid=valid)
    _, s_rows = batch_norm(params, state, X[valid], train=True)
    np.testing.assert_allclose(s_masked["mean"], s_rows["mean"], rtol=1e-4)
    np.testing.assert_allclose(s_masked["var"], s_rows["var"], rtol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_feed_forward(variant, activation):
    p = layers.init_feed_forward(jax.random.key(0), 16, 32, activation=activation)
    feed_forward = variant(layers.feed_forward, static_argnames="activation")
    y = feed_forward(p, X, activation=activation)
    h = _add_bias(X @ p["wi"]["kernel"], p["wi"]["bias"])
    if activation == "relu":
        h = np.maximum(h, 0)
    elif activation == "gelu":
        h = jax.nn.gelu(h, approximate=False)
    else:
        g = _add_bias(X @ p["gate"]["kernel"], p["gate"]["bias"])
        h = g * jax.nn.sigmoid(g) * h
    chex.assert_trees_all_close(y, _add_bias(h @ p["wo"]["kernel"], p["wo"]["bias"]), atol=1e-4)
    # Position-wise: each position is transformed independently.
    chex.assert_trees_all_close(feed_forward(p, X[:, 2:3], activation=activation), y[:, 2:3], atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        feed_forward(p, X, activation="relu" if activation == "swiglu" else "swiglu")


def test_dropout(variant):
    dropout = variant(layers.dropout, static_argnums=1)  # the rate is checked in Python
    np.testing.assert_array_equal(dropout(X, 0.5, None), X)
    y = dropout(X, 0.5, jax.random.key(1))
    chex.assert_shape(y, X.shape)
    dropped = y == 0
    assert 0.3 < float(dropped.mean()) < 0.7
    np.testing.assert_allclose(y[~dropped], 2 * X[~dropped], rtol=1e-6)
    with pytest.raises(ValueError, match="dropout rate"):
        dropout(X, 1.0, jax.random.key(1))


def test_embedding_and_tied_output(variant):
    p = layers.init_embedding(jax.random.key(0), 11, 16)
    embed = variant(layers.embed)
    ids = jnp.array([[1, 2], [10, 0]])
    np.testing.assert_array_equal(embed(p, ids), p["embedding"][ids])
    logits = variant(layers.embed_attend)(p, embed(p, ids))
    chex.assert_shape(logits, (2, 2, 11))
    chex.assert_trees_all_close(logits, jnp.einsum("btd,vd->btv", p["embedding"][ids], p["embedding"]), atol=1e-5)
    with pytest.raises(TypeError, match="integers"):
        embed(p, ids.astype(jnp.float32))
    # An id outside [0, V) gives a NaN vector, eagerly and under jit (never a wrapped lookup).
    bad = embed(p, jnp.array([3, -1, 11]))
    assert not bool(jnp.isnan(bad[0]).any()) and bool(jnp.isnan(bad[1:]).all())
