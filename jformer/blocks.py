"""Encoder and decoder layers with residual connections, and scanned layer stacks.

A sublayer (attention or feed-forward) is wrapped in a residual connection
with its norm placed after the sum (Post-LN, the original paper) or before the
sublayer (Pre-LN):

    Post-LN:  x ← Norm(x + Dropout(Sublayer(x)))
    Pre-LN:   x ← x + Dropout(Sublayer(Norm(x)))      (then one final Norm)

Every layer function is ``layer(params, state, x, ...) -> (x, state, weights)``;
``state`` holds BatchNorm running statistics (empty for LayerNorm / RMSNorm).
Given a key/value ``cache`` (incremental decoding, see
``attention.multi_head_attention``), a layer runs on the T newest positions only
and appends the updated cache: ``(x, state, weights, cache)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from jformer import layers
from jformer.attention import heads_first, init_multi_head_attention, multi_head_attention

if TYPE_CHECKING:
    from jformer.models import TransformerConfig

Array = jax.Array

REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")

# GPT-2 / nanoGPT initialisation: every weight matrix and embedding ~ N(0, 0.02²).
GPT2_INIT_STD = 0.02


def split_keys(key: Array | None, n: int) -> list[Array | None]:
    """``n`` independent keys from ``key``; ``None`` stays ``None`` (deterministic)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


# ----------------------------------------------------------------------- norms


def init_norm(cfg: TransformerConfig) -> dict:
    """Parameters of the configured norm: [D] ``scale``, and [D] ``bias`` for LayerNorm with
    ``cfg.use_bias`` and for BatchNorm (never for RMSNorm).

    ``use_bias=False`` drops the LayerNorm bias too, as nanoGPT's ``bias=False`` and
    ``torch.nn.TransformerEncoderLayer(bias=False)`` do. BatchNorm keeps its shift: its
    torch counterpart has no bias switch, and the shift is what re-centres the features.
    """
    if cfg.norm == "rms":
        return layers.init_rms_norm(cfg.d_model)
    return layers.init_layer_norm(cfg.d_model, use_bias=cfg.use_bias or cfg.norm == "batch")


def init_stds(cfg: TransformerConfig, num_layers: int) -> tuple[float | None, float | None]:
    """``(std, residual_std)`` of the weight matrices of a stack of ``num_layers`` layers.

    ``cfg.init == "default"``: ``(None, None)``, i.e. Glorot-uniform kernels.
    ``cfg.init == "gpt2"`` (GPT-2 / nanoGPT): every kernel ~ N(0, 0.02²), except the
    projections that write into the residual stream (attention ``out``, FFN ``wo``) with

        residual_std = 0.02 / sqrt(2 · L),   L = num_layers (the stack's depth),

    because each layer adds two such outputs to the residual stream, whose variance
    would otherwise grow with depth (GPT-2 paper, §2.3). In a seq2seq decoder the
    cross-attention ``out`` is scaled the same way.
    """
    if cfg.init != "gpt2":
        return None, None
    return GPT2_INIT_STD, GPT2_INIT_STD / math.sqrt(2 * num_layers)


def apply_norm(cfg: TransformerConfig, params: dict, state: dict | None, x: Array, *,
               valid: Array | None, train: bool) -> tuple[Array, dict | None]:
    """x [..., D] through ``cfg.norm``; returns the output and the (BatchNorm) state."""
    if cfg.norm == "layer":
        return layers.layer_norm(params, x, eps=cfg.norm_eps), state
    if cfg.norm == "rms":
        return layers.rms_norm(params, x, eps=cfg.norm_eps), state
    return layers.batch_norm(params, state, x, train=train, valid=valid, eps=cfg.norm_eps,
                             momentum=cfg.batch_norm_momentum, axis_name=cfg.batch_norm_axis_name)


def _residual(cfg, params, state, name, x, sublayer, *, valid, train, key):
    """Apply ``sublayer`` to x with a residual connection and Pre/Post norm ``<name>_norm``.

    Returns the new x, the updated state dict, and the sublayer's auxiliary output.
    """
    norm = name + "_norm"
    if cfg.norm_position == "pre":
        h, s = apply_norm(cfg, params[norm], state.get(norm), x, valid=valid, train=train)
        y, aux = sublayer(h)
        x = x + layers.dropout(y, cfg.dropout_rate, key)
    else:
        y, aux = sublayer(x)
        x, s = apply_norm(cfg, params[norm], state.get(norm), x + layers.dropout(y, cfg.dropout_rate, key),
                          valid=valid, train=train)
    return x, ({**state, norm: s} if s is not None else state), aux


def _attention(cfg, params, x, kv, *, mask, bias, rope_positions, key, return_weights,
               is_causal=False, cache=None, cache_index=None):
    """Multi-head attention as configured -> (out, (weights or None, cache or None)); falls
    back to the reference path when attention dropout is active or weights are requested."""
    dropping = key is not None and cfg.attention_dropout_rate > 0.0
    impl = None if (return_weights or dropping) else cfg.attention_impl
    out = multi_head_attention(params, x, kv, mask=mask, bias=bias, is_causal=is_causal,
                               rope_positions=rope_positions,
                               rope_base=cfg.rope_base, dropout_rate=cfg.attention_dropout_rate,
                               key=key, return_weights=return_weights, implementation=impl,
                               cache=cache, cache_index=cache_index)
    out = out if isinstance(out, tuple) else (out,)
    return out[0], (out[1] if return_weights else None, out[-1] if cache is not None else None)


# ---------------------------------------------------------------------- layers


def init_encoder_layer(key: Array, cfg: TransformerConfig, num_layers: int | None = None) -> dict:
    """Self-attention + feed-forward layer parameters.

    ``num_layers``, the depth of the stack the layer belongs to (default ``cfg.num_layers``),
    sets the residual projections' scale under ``cfg.init="gpt2"`` (``init_stds``).
    """
    std, residual_std = init_stds(cfg, cfg.num_layers if num_layers is None else num_layers)
    k1, k2 = jax.random.split(key)
    return {
        "self_attn": init_multi_head_attention(k1, cfg.d_model, cfg.num_heads,
                                               num_kv_heads=cfg.num_kv_heads, use_bias=cfg.use_bias,
                                               std=std, out_std=residual_std),
        "self_attn_norm": init_norm(cfg),
        "ffn": layers.init_feed_forward(k2, cfg.d_model, cfg.d_ff, activation=cfg.activation,
                                        use_bias=cfg.use_bias, std=std, out_std=residual_std),
        "ffn_norm": init_norm(cfg),
    }


def encoder_layer(params: dict, state: dict, x: Array, *, cfg: TransformerConfig,
                  mask: Array | None = None, bias: Array | None = None, is_causal: bool = False,
                  rope_positions: Array | None = None, valid: Array | None = None,
                  train: bool = False, key: Array | None = None,
                  return_weights: bool = False, cache: dict | None = None,
                  cache_index: Array | None = None) -> tuple:
    """Encoder layer: x ← Residual(SelfAttention), x ← Residual(FFN).

    With ``is_causal`` (or a causal ``mask``, or a ``cache``) this is also the
    decoder-only (GPT) layer.

    Args:
      x: [B, T, D]; mask: broadcastable to [B, N, T, S]; bias: [.., N, T, S]
        (S = T, or S_max with a cache); is_causal: position t attends to keys <= t
        (as a mask, but blockwise attention can skip whole blocks);
      valid: [B, T] real (non-pad) positions, for BatchNorm statistics;
      cache, cache_index: self-attention keys/values ``{"key", "value"}`` [B, K, S_max, H]
        (``attention.init_kv_cache``) and the int32 count of positions already in them (x holds positions
        cache_index..cache_index+T-1).

    Returns:
      x [B, T, D], state, self-attention weights [B, N, T, S] (or None), and the
      updated cache if one was given.
    """
    k_attn, k_res1, k_ffn, k_res2 = split_keys(key, 4)
    x, state, (w, cache) = _residual(
        cfg, params, state, "self_attn", x,
        lambda h: _attention(cfg, params["self_attn"], h, None, mask=mask, bias=bias, is_causal=is_causal,
                             rope_positions=rope_positions, key=k_attn, return_weights=return_weights,
                             cache=cache, cache_index=cache_index),
        valid=valid, train=train, key=k_res1)
    x, state, _ = _residual(
        cfg, params, state, "ffn", x,
        lambda h: (layers.feed_forward(params["ffn"], h, activation=cfg.activation,
                                       dropout_rate=cfg.dropout_rate, key=k_ffn), None),
        valid=valid, train=train, key=k_res2)
    return (x, state, w) if cache is None else (x, state, w, cache)


def init_decoder_layer(key: Array, cfg: TransformerConfig, num_layers: int | None = None) -> dict:
    """Masked self-attention + cross-attention + feed-forward layer parameters.

    ``num_layers``: the decoder stack's depth (default ``cfg.num_decoder_layers``, or
    ``cfg.num_layers``), for ``cfg.init="gpt2"`` as in ``init_encoder_layer``.
    """
    if num_layers is None:
        num_layers = cfg.num_layers if cfg.num_decoder_layers is None else cfg.num_decoder_layers
    std, residual_std = init_stds(cfg, num_layers)
    k1, k2 = jax.random.split(key)
    params = init_encoder_layer(k1, cfg, num_layers)
    params["cross_attn"] = init_multi_head_attention(k2, cfg.d_model, cfg.num_heads,
                                                     num_kv_heads=cfg.num_kv_heads, use_bias=cfg.use_bias,
                                                     std=std, out_std=residual_std)
    params["cross_attn_norm"] = init_norm(cfg)
    return params


def decoder_layer(params: dict, state: dict, y: Array, memory: Array | None, *, cfg: TransformerConfig,
                  self_mask: Array | None = None, cross_mask: Array | None = None,
                  is_causal: bool = False, bias: Array | None = None,
                  rope_positions: Array | None = None,
                  valid: Array | None = None, train: bool = False, key: Array | None = None,
                  return_weights: bool = False, cache: dict | None = None,
                  cache_index: Array | None = None) -> tuple:
    """Decoder layer: y ← Residual(MaskedSelfAttention), y ← Residual(CrossAttention(y, memory)), y ← Residual(FFN).

    Args:
      y: [B, T, D] target side; memory: [B, S, D] encoder output (``None`` with a cache);
      self_mask: broadcastable to [B, N, T, T]; cross_mask: to [B, N, T, S];
      is_causal: self-attention is causal (instead of, or on top of, a causal self_mask).
      cache, cache_index: ``{"key", "value"}`` [B, K, S_max, H] self-attention cache
        (see ``encoder_layer``) and ``{"cross_key", "cross_value"}`` [B, K, S, H],
        the memory projected once by ``attention.project_kv``, heads first.

    Returns:
      y [B, T, D], state, (self weights [B, N, T, T] (T x S_max with a cache), cross
      weights [B, N, T, S]) or None, and the updated cache if one was given.
    """
    k_sa, k_r1, k_ca, k_r2, k_ffn, k_r3 = split_keys(key, 6)
    self_cache = None if cache is None else {"key": cache["key"], "value": cache["value"]}
    y, state, (w_self, self_cache) = _residual(
        cfg, params, state, "self_attn", y,
        lambda h: _attention(cfg, params["self_attn"], h, None, mask=self_mask, bias=bias, is_causal=is_causal,
                             rope_positions=rope_positions, key=k_sa, return_weights=return_weights,
                             cache=self_cache, cache_index=cache_index),
        valid=valid, train=train, key=k_r1)
    memory_kv = memory if cache is None else (heads_first(cache["cross_key"]), heads_first(cache["cross_value"]))
    y, state, (w_cross, _) = _residual(
        cfg, params, state, "cross_attn", y,
        lambda h: _attention(cfg, params["cross_attn"], h, memory_kv, mask=cross_mask, bias=None,
                             rope_positions=None, key=k_ca, return_weights=return_weights),
        valid=valid, train=train, key=k_r2)
    y, state, _ = _residual(
        cfg, params, state, "ffn", y,
        lambda h: (layers.feed_forward(params["ffn"], h, activation=cfg.activation,
                                       dropout_rate=cfg.dropout_rate, key=k_ffn), None),
        valid=valid, train=train, key=k_r3)
    weights = (w_self, w_cross) if return_weights else None
    return (y, state, weights) if cache is None else (y, state, weights, {**cache, **self_cache})


# ---------------------------------------------------------------------- stacks


def init_stack(key: Array, init_layer: Callable[[Array], dict], num_layers: int) -> dict:
    """Parameters of ``num_layers`` layers stacked on a leading [L] axis."""
    return jax.vmap(init_layer)(jax.random.split(key, num_layers))


def unstack_layers(params: dict) -> dict:
    """``params`` with every layer stack (a ``"layers"`` entry, stacked on [L] by
    ``init_stack``) as a list of L per-layer trees, which ``run_stack`` also runs."""
    def split(name, tree):
        if name == "layers" and not isinstance(tree, list):
            n = jax.tree_util.tree_leaves(tree)[0].shape[0]
            return [jax.tree_util.tree_map(lambda a: a[i], tree) for i in range(n)]
        return {k: split(k, v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return split(None, params)


def run_stack(layer: Callable, params: dict | list, state: dict, x: Array, key: Array | None, *,
              cache: list | None = None, scan: bool = True, remat: bool | str = False) -> tuple:
    """Run ``x ← layer(params_l, state_l, x, key_l)`` for l = 1..L over stacked params
    (or a list of L per-layer params, ``unstack_layers``).

    ``layer(p, s, x, k) -> (x, s, weights)``. With ``scan`` the stack is one
    ``lax.scan`` (compile time independent of L); otherwise a Python loop that
    gives identical results and is easier to step through. ``remat`` recomputes
    each layer's activations in the backward pass (``jax.checkpoint``): ``True``
    saves nothing inside a layer, a policy name from ``REMAT_POLICIES`` (a
    ``jax.checkpoint_policies`` member, e.g. ``"dots_saveable"``: keep matmul
    outputs, recompute the cheap elementwise ops) chooses what is kept.

    A ``cache``, a list of L per-layer key/value caches, goes with the params: the
    layer is then ``layer(p, s, x, k, c) -> (x, s, weights, c)``. A cached (decoding)
    call, or a list of params, is always the Python loop. Decoding passes both as
    lists, made once before its token loop: inside the loop, a stack on [L] would be
    sliced (weights) and re-stacked (caches), i.e. copied, at every token.

    Returns x, the stacked new state, per-layer outputs stacked on [L], and the
    updated list of caches if one was given.
    """
    listed = isinstance(params, list)
    num_layers = len(params) if listed else jax.tree_util.tree_leaves(params)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num_layers)
    if remat:
        policy = getattr(jax.checkpoint_policies, "nothing_saveable" if remat is True else remat)
        fn = jax.checkpoint(layer, policy=policy)
    else:
        fn = layer

    def body(x, xs):
        p, s, k, c = xs
        if c is None:
            x, s, w = fn(p, s, x, k)
        else:
            x, s, w, c = fn(p, s, x, k, c)
        return x, (s, w, c)

    if scan and cache is None and not listed:
        x, (state, weights, cache) = jax.lax.scan(body, x, (params, state, keys, cache))
    else:
        if cache is not None and len(cache) != num_layers:
            raise ValueError(f"a cache of {len(cache)} layers for a stack of {num_layers}")
        outs, new_cache = [], []
        for i in range(num_layers):
            s_k = jax.tree_util.tree_map(lambda a: a[i], (state, keys))
            p = params[i] if listed else jax.tree_util.tree_map(lambda a: a[i], params)
            x, (s, w, c) = body(x, (p, *s_k, None if cache is None else cache[i]))
            outs.append((s, w))
            new_cache.append(c)
        state, weights = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
        cache = None if cache is None else new_cache
    return (x, state, weights) if cache is None else (x, state, weights, cache)
