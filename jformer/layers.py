"""Building layers as pure functions: dense, embedding, feed-forward, dropout, norms.

Every layer is ``init_<layer>(key, ...) -> params`` and ``<layer>(params, x, ...)``.
Leaf names follow Flax (``kernel``, ``bias``, ``scale``, ``embedding``).
Normalisation statistics are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jformer.config import ACTIVATIONS

Array = jax.Array
Shape = int | tuple[int, ...]



def _tuple(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


# ----------------------------------------------------------------------- dense


def init_dense(key: Array, in_shape: Shape, out_shape: Shape, *, use_bias: bool = True,
               std: float | None = None) -> dict:
    """Dense parameters: ``kernel`` [*in_shape, *out_shape], ``bias`` [*out_shape] zeros.

    The kernel is Glorot uniform (variance 2 / (fan_in + fan_out)) by default, or
    N(0, std²) when ``std`` is given (GPT-2 / nanoGPT: std = 0.02 whatever the shape).
    """
    in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
    n_in = len(in_shape)
    if std is None:
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform",
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
    else:
        init = jax.nn.initializers.normal(std)
    params = {"kernel": init(key, in_shape + out_shape, jnp.float32)}
    if use_bias:
        params["bias"] = jnp.zeros(out_shape, jnp.float32)
    return params


@jax.custom_jvp
def _matmul(x: Array, w: Array) -> Array:
    """x [M, K] @ w [K, N], with a tangent written so that its transpose, the backward pass,
    runs every product in the form XLA:CPU sends to its fast kernel (see ``dense``)."""
    return x @ w


@_matmul.defjvp
def _matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    barrier = jax.lax.optimization_barrier
    contract_first = (((0,), (0,)), ((), ()))
    contract_last = (((1,), (1,)), ((), ()))
    if x.shape[1] <= w.shape[1]:
        # x dw = (xᵀ)ᵀ dw; transposed: dW = xᵀ g with xᵀ [K, M] materialised once.
        t_w = jax.lax.dot_general(barrier(x.T), dw, contract_first)
    else:
        # x dw = (dwᵀ xᵀ)ᵀ; transposed: dWᵀ = gᵀ x with gᵀ [N, M] materialised (the smaller).
        t_w = barrier(jax.lax.dot_general(barrier(dw.T), x, contract_last)).T
    return x @ w, dx @ w + t_w


def dense(params: dict, x: Array, *, axes: int = 1, fast: bool = False) -> Array:
    """``x W + b``, contracting the last ``axes`` axes of x with the first of the kernel.

    x [..., *in_shape] -> [..., *out_shape]; the kernel is cast to x's dtype.

    ``fast``: the same product with a custom JVP whose transpose computes the weight
    gradient ``dW = xᵀ g`` by first materialising the transpose of the smaller of x and
    g. Plain autodiff leaves XLA:CPU a product that contracts the token axis of both
    operands, which it runs in a slow kernel; values and every transform are unchanged
    (``ExecConfig.fast_dense`` turns it on for CPU; measurements in docs/performance.md).
    """
    kernel = params["kernel"].astype(x.dtype)
    in_shape, out_shape = kernel.shape[:axes], kernel.shape[axes:]
    if fast:
        y = _matmul(x.reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1))
        y = y.reshape(x.shape[:x.ndim - axes] + out_shape)
    else:
        y = jnp.tensordot(x, kernel, axes=axes)
    if "bias" in params:
        y = y + jnp.broadcast_to(params["bias"].astype(x.dtype), y.shape)
    return y


# ------------------------------------------------------------------- embedding


def init_embedding(key: Array, vocab_size: int, d_model: int, *, std: float | None = None) -> dict:
    """Embedding table ``embedding`` [V, D] ~ N(0, std²).

    ``std`` defaults to 1/√D, so √D-scaled embeddings have unit scale; GPT-2 / nanoGPT
    use std = 0.02 (unscaled embeddings, the table doubling as the tied output head).
    """
    table = jax.random.normal(key, (vocab_size, d_model), jnp.float32)
    return {"embedding": table / math.sqrt(d_model) if std is None else std * table}


def check_ids(name: str, ids, vocab_size: int) -> None:
    """Raise a ValueError naming the first id of ``ids`` outside [0, vocab_size), if values are concrete.

    Under ``jit`` the values are unknown here (a tracer passes); the lookups themselves
    (``embed``, the losses) then turn such ids into NaN instead of wrapping them.
    """
    if isinstance(ids, jax.core.Tracer):
        return
    a = np.asarray(ids)
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} holds id {a[where]} at position {list(where)} (shape {tuple(a.shape)}), "
                         f"outside the vocabulary [0, {vocab_size}); {int(bad.sum())} id(s) out of range")


def in_range(ids: Array, size: int) -> Array:
    """Boolean [...]: whether each id lies in [0, size)."""
    return (ids >= 0) & (ids < size)


def nan_unless(ok: Array, x: Array) -> Array:
    """x where ``ok`` (broadcastable), NaN elsewhere: how a bad value shows inside ``jit``,
    where it cannot raise, instead of passing for a plausible number."""
    return jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype))


def embed(params: dict, ids: Array) -> Array:
    """Look up token ids [...] -> vectors [..., D]; an id outside [0, V) gives a NaN vector.

    NaN rather than ``jnp.take``'s default (a negative id wraps to V + id): a wrong id
    inside ``jit``, where it cannot raise, must not pass for a plausible embedding.
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    table = params["embedding"]
    valid = in_range(ids, table.shape[0])
    return nan_unless(valid[..., None], jnp.take(table, jnp.where(valid, ids, 0), axis=0))


def embed_attend(params: dict, x: Array) -> Array:
    """Tied output projection: logits = x Eᵀ, x [..., D] -> [..., V]."""
    return x @ params["embedding"].astype(x.dtype).T


# ---------------------------------------------------------------- feed-forward


def init_feed_forward(key: Array, d_model: int, d_ff: int, *, activation: str = "relu",
                      use_bias: bool = True, std: float | None = None,
                      out_std: float | None = None) -> dict:
    """Position-wise FFN parameters: ``wi`` [D, F], ``wo`` [F, D], plus ``gate`` [D, F] for SwiGLU.

    Kernels are Glorot uniform, or N(0, std²) for ``wi``/``gate`` and N(0, out_std²)
    for ``wo`` (``out_std`` defaults to ``std``): GPT-2 shrinks the projection that
    writes into the residual stream (see ``blocks.init_stds``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out_std = std if out_std is None else out_std
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"wi": init_dense(k1, d_model, d_ff, use_bias=use_bias, std=std),
              "wo": init_dense(k2, d_ff, d_model, use_bias=use_bias, std=out_std)}
    if activation == "swiglu":
        params["gate"] = init_dense(k3, d_model, d_ff, use_bias=use_bias, std=std)
    return params


def feed_forward(params: dict, x: Array, *, activation: str = "relu", dropout_rate: float = 0.0,
                 key: Array | None = None, fast_dense: bool = False) -> Array:
    """FFN(x) = act(x W_i + b_i) W_o + b_o, applied at every position; x [..., D] -> [..., D].

    ``relu`` is the paper's; ``gelu`` the exact GELU x·Φ(x); ``gelu_tanh`` its tanh
    approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³))) (GPT-2, BERT); ``swiglu`` is
    (Swish(x W_gate) ⊙ x W_i) W_o. Dropout on the hidden layer if ``key`` is given.
    ``fast_dense``: see ``dense``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (activation == "swiglu") != ("gate" in params):
        raise ValueError(f"activation={activation!r} does not match the parameters "
                         f"(keys {sorted(params)}); SwiGLU needs a 'gate' projection")
    h = dense(params["wi"], x, fast=fast_dense)
    if activation == "relu":
        h = jax.nn.relu(h)
    elif activation in ("gelu", "gelu_tanh"):
        h = jax.nn.gelu(h, approximate=activation == "gelu_tanh")
    else:
        h = jax.nn.silu(dense(params["gate"], x, fast=fast_dense)) * h
    h = dropout(h, dropout_rate, key)
    return dense(params["wo"], h, fast=fast_dense)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout: keep each entry with probability 1 - rate and scale by 1/(1 - rate).

    No key (or rate 0) returns x unchanged: deterministic evaluation.
    """
    if key is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ----------------------------------------------------------------------- norms


def init_layer_norm(d_model: int, *, use_bias: bool = True) -> dict:
    """LayerNorm parameters: ``scale`` ones [D] and, with ``use_bias``, ``bias`` zeros [D].

    Without a bias the norm is ``torch.nn.LayerNorm(bias=False)`` (nanoGPT's ``bias=False``).
    """
    params = {"scale": jnp.ones((d_model,), jnp.float32)}
    if use_bias:
        params["bias"] = jnp.zeros((d_model,), jnp.float32)
    return params


def layer_norm(params: dict, x: Array, *, eps: float = 1e-5) -> Array:
    """LayerNorm over the feature axis: (x - mean) / sqrt(var + eps) · scale (+ bias if present); x [..., D]."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * jnp.broadcast_to(params["scale"], x.shape)
    if "bias" in params:
        y = y + jnp.broadcast_to(params["bias"], x.shape)
    return y.astype(x.dtype)


def init_rms_norm(d_model: int) -> dict:
    """RMSNorm parameters: ``scale`` ones [D]."""
    return {"scale": jnp.ones((d_model,), jnp.float32)}


def rms_norm(params: dict, x: Array, *, eps: float = 1e-5) -> Array:
    """RMSNorm: x / sqrt(mean(x²) + eps) · scale; x [..., D]."""
    x32 = x.astype(jnp.float32)
    scale = jnp.broadcast_to(params["scale"], x.shape)  # explicit: tests run with rank promotion off
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * scale
    return y.astype(x.dtype)


def init_batch_norm(d_model: int) -> tuple[dict, dict]:
    """BatchNorm parameters (``scale``, ``bias`` [D]) and running-statistics state (``mean`` 0, ``var`` 1)."""
    return init_layer_norm(d_model), {"mean": jnp.zeros((d_model,), jnp.float32),
                                      "var": jnp.ones((d_model,), jnp.float32)}


def batch_norm(params: dict, state: dict, x: Array, *, train: bool, valid: Array | None = None,
               momentum: float = 0.9, eps: float = 1e-5,
               axis_name: str | None = None) -> tuple[Array, dict]:
    """BatchNorm over every axis but the feature axis: x [..., D] -> ([..., D], new state).

    Training normalises with the batch statistics of the positions where
    ``valid`` [...] is True (padding is ignored) and updates the running
    statistics ``state ← momentum · state + (1 - momentum) · batch``; evaluation
    normalises with the running statistics and returns the state unchanged.
    ``axis_name`` averages the statistics across devices (``pmap``/``shard_map``).
    """
    x32 = x.astype(jnp.float32)
    if train:
        w = jnp.ones(x.shape[:-1], jnp.float32) if valid is None else valid.astype(jnp.float32)
        if w.shape != x.shape[:-1]:
            raise ValueError(f"valid {tuple(w.shape)} must match x {tuple(x.shape)} without its feature axis")
        w = w[..., None]
        axes = tuple(range(x.ndim - 1))
        sums = (jnp.sum(w * x32, axes), jnp.sum(w * x32 * x32, axes), jnp.sum(w))
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        s1, s2, count = sums
        count = jnp.maximum(count, 1.0)
        mean = s1 / count
        var = jnp.maximum(s2 / count - mean * mean, 0.0)
        state = {"mean": momentum * state["mean"] + (1 - momentum) * mean,
                 "var": momentum * state["var"] + (1 - momentum) * var}
    else:
        mean, var = state["mean"], state["var"]
    def expand(v):  # [D] -> [1, ..., 1, D]
        return v.reshape((1,) * (x.ndim - 1) + v.shape)

    y = (x32 - expand(mean)) * expand(jax.lax.rsqrt(var + eps) * params["scale"]) + expand(params["bias"])
    return y.astype(x.dtype), state
