"""Encoder and decoder layers with residual connections, and scanned layer stacks.

A sublayer (attention or feed-forward) is wrapped in a residual connection
with its norm placed after the sum (Post-LN, the original paper) or before the
sublayer (Pre-LN):

    Post-LN:  x ← Norm(x + Dropout(Sublayer(x)))
    Pre-LN:   x ← x + Dropout(Sublayer(Norm(x)))      (then one final Norm)

Every layer function is ``layer(params, state, x, ...) -> (x, state, weights)``;
``state`` holds BatchNorm running statistics (empty for LayerNorm / RMSNorm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from jformer import layers
from jformer.attention import init_multi_head_attention, multi_head_attention

if TYPE_CHECKING:
    from jformer.models import TransformerConfig

Array = jax.Array


def split_keys(key: Array | None, n: int) -> list[Array | None]:
    """``n`` independent keys from ``key``; ``None`` stays ``None`` (deterministic)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


# ----------------------------------------------------------------------- norms


def init_norm(cfg: TransformerConfig) -> dict:
    """Parameters of the configured norm ([D] ``scale``, and ``bias`` except for RMSNorm)."""
    if cfg.norm == "rms":
        return layers.init_rms_norm(cfg.d_model)
    return layers.init_layer_norm(cfg.d_model)


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


def _attention(cfg, params, x, kv, *, mask, bias, rope_positions, key, return_weights):
    """Multi-head attention as configured; falls back to the reference path when
    attention dropout is active or weights are requested."""
    dropping = key is not None and cfg.attention_dropout_rate > 0.0
    impl = None if (return_weights or dropping) else cfg.attention_impl
    out = multi_head_attention(params, x, kv, mask=mask, bias=bias, rope_positions=rope_positions,
                               rope_base=cfg.rope_base, dropout_rate=cfg.attention_dropout_rate,
                               key=key, return_weights=return_weights, implementation=impl)
    return out if return_weights else (out, None)


# ---------------------------------------------------------------------- layers


def init_encoder_layer(key: Array, cfg: TransformerConfig) -> dict:
    """Self-attention + feed-forward layer parameters."""
    k1, k2 = jax.random.split(key)
    return {
        "self_attn": init_multi_head_attention(k1, cfg.d_model, cfg.num_heads,
                                               num_kv_heads=cfg.num_kv_heads, use_bias=cfg.use_bias),
        "self_attn_norm": init_norm(cfg),
        "ffn": layers.init_feed_forward(k2, cfg.d_model, cfg.d_ff, activation=cfg.activation,
                                        use_bias=cfg.use_bias),
        "ffn_norm": init_norm(cfg),
    }


def encoder_layer(params: dict, state: dict, x: Array, *, cfg: TransformerConfig,
                  mask: Array | None = None, bias: Array | None = None,
                  rope_positions: Array | None = None, valid: Array | None = None,
                  train: bool = False, key: Array | None = None,
                  return_weights: bool = False) -> tuple[Array, dict, Array | None]:
    """Encoder layer: x ← Residual(SelfAttention), x ← Residual(FFN).

    With a causal ``mask`` this is also the decoder-only (GPT) layer.

    Args:
      x: [B, T, D]; mask: broadcastable to [B, N, T, T]; bias: [.., N, T, T];
      valid: [B, T] real (non-pad) positions, for BatchNorm statistics.

    Returns:
      x [B, T, D], state, and self-attention weights [B, N, T, T] (or None).
    """
    k_attn, k_res1, k_ffn, k_res2 = split_keys(key, 4)
    x, state, w = _residual(
        cfg, params, state, "self_attn", x,
        lambda h: _attention(cfg, params["self_attn"], h, None, mask=mask, bias=bias,
                             rope_positions=rope_positions, key=k_attn, return_weights=return_weights),
        valid=valid, train=train, key=k_res1)
    x, state, _ = _residual(
        cfg, params, state, "ffn", x,
        lambda h: (layers.feed_forward(params["ffn"], h, activation=cfg.activation,
                                       dropout_rate=cfg.dropout_rate, key=k_ffn), None),
        valid=valid, train=train, key=k_res2)
    return x, state, w


def init_decoder_layer(key: Array, cfg: TransformerConfig) -> dict:
    """Masked self-attention + cross-attention + feed-forward layer parameters."""
    k1, k2 = jax.random.split(key)
    params = init_encoder_layer(k1, cfg)
    params["cross_attn"] = init_multi_head_attention(k2, cfg.d_model, cfg.num_heads,
                                                     num_kv_heads=cfg.num_kv_heads, use_bias=cfg.use_bias)
    params["cross_attn_norm"] = init_norm(cfg)
    return params


def decoder_layer(params: dict, state: dict, y: Array, memory: Array, *, cfg: TransformerConfig,
                  self_mask: Array | None = None, cross_mask: Array | None = None,
                  bias: Array | None = None, rope_positions: Array | None = None,
                  valid: Array | None = None, train: bool = False, key: Array | None = None,
                  return_weights: bool = False) -> tuple[Array, dict, tuple | None]:
    """Decoder layer: y ← Residual(MaskedSelfAttention), y ← Residual(CrossAttention(y, memory)), y ← Residual(FFN).

    Args:
      y: [B, T, D] target side; memory: [B, S, D] encoder output;
      self_mask: broadcastable to [B, N, T, T] (causal); cross_mask: to [B, N, T, S].

    Returns:
      y [B, T, D], state, and (self weights [B, N, T, T], cross weights [B, N, T, S]) or None.
    """
    k_sa, k_r1, k_ca, k_r2, k_ffn, k_r3 = split_keys(key, 6)
    y, state, w_self = _residual(
        cfg, params, state, "self_attn", y,
        lambda h: _attention(cfg, params["self_attn"], h, None, mask=self_mask, bias=bias,
                             rope_positions=rope_positions, key=k_sa, return_weights=return_weights),
        valid=valid, train=train, key=k_r1)
    y, state, w_cross = _residual(
        cfg, params, state, "cross_attn", y,
        lambda h: _attention(cfg, params["cross_attn"], h, memory, mask=cross_mask, bias=None,
                             rope_positions=None, key=k_ca, return_weights=return_weights),
        valid=valid, train=train, key=k_r2)
    y, state, _ = _residual(
        cfg, params, state, "ffn", y,
        lambda h: (layers.feed_forward(params["ffn"], h, activation=cfg.activation,
                                       dropout_rate=cfg.dropout_rate, key=k_ffn), None),
        valid=valid, train=train, key=k_r3)
    return y, state, ((w_self, w_cross) if return_weights else None)


# ---------------------------------------------------------------------- stacks


def init_stack(key: Array, init_layer: Callable[[Array], dict], num_layers: int) -> dict:
    """Parameters of ``num_layers`` layers stacked on a leading [L] axis."""
    return jax.vmap(init_layer)(jax.random.split(key, num_layers))


def run_stack(layer: Callable, params: dict, state: dict, x: Array, key: Array | None, *,
              scan: bool = True, remat: bool = False) -> tuple[Array, dict, object]:
    """Run ``x ← layer(params_l, state_l, x, key_l)`` for l = 1..L over stacked params.

    ``layer(p, s, x, k) -> (x, s, weights)``. With ``scan`` the stack is one
    ``lax.scan`` (compile time independent of L); otherwise a Python loop that
    gives identical results and is easier to step through. ``remat`` recomputes
    each layer's activations in the backward pass (``jax.checkpoint``).

    Returns x, the stacked new state, and per-layer outputs stacked on [L].
    """
    num_layers = jax.tree_util.tree_leaves(params)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num_layers)
    fn = jax.checkpoint(layer) if remat else layer

    def body(x, xs):
        p, s, k = xs
        x, s, w = fn(p, s, x, k)
        return x, (s, w)

    if scan:
        x, (state, weights) = jax.lax.scan(body, x, (params, state, keys))
        return x, state, weights
    outs = []
    for i in range(num_layers):
        x, out = body(x, jax.tree_util.tree_map(lambda a: a[i], (params, state, keys)))
        outs.append(out)
    state, weights = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    return x, state, weights
