"""Encoder and decoder layers on one contract, and one scanned stack function for both.

The layer contract, shared by every layer kind of jformer and by the stacks of them::

    layer(params, x, ctx, *, key=None, state=None, cache=None) -> (y, aux)
    aux = {"state": dict, "attention": weights or None, "cache": cache or None}

``ctx`` (a ``Context``) carries what every layer of a stack shares: the model and
execution configs, masks, the attention bias, positions, the train flag, the encoder
memory and the cache index. ``key`` (dropout), ``state`` (BatchNorm running
statistics) and ``cache`` (the layer's KV cache) are per layer: ``stack`` splits and
stacks them along the layer axis. ``aux`` has the same keys whatever was requested.

A sublayer (attention or feed-forward) is wrapped in a residual connection with its
norm placed after the sum (Post-LN, the original paper) or before the sublayer (Pre-LN):

    Post-LN:  x ← Norm(x + Dropout(Sublayer(x)))
    Pre-LN:   x ← x + Dropout(Sublayer(Norm(x)))      (then one final Norm)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import jax

from jformer import layers
from jformer.attention import init_multi_head_attention, multi_head_attention
from jformer.cache import heads_first
from jformer.config import ExecConfig, TransformerConfig

Array = jax.Array
Layer = Callable[..., tuple]

# GPT-2 / nanoGPT initialisation: every weight matrix and embedding ~ N(0, 0.02²).
GPT2_INIT_STD = 0.02


@dataclass(frozen=True)
class Context:
    """What every layer of a stack shares (the third argument of the layer contract).

    Attributes:
      cfg, exe: what the model is and how it runs.
      mask: self-attention mask, boolean broadcastable to [B, N, T, S], True = may attend
        (S = T, or S_max with a cache).
      bias: additive self-attention bias [.., N, T, S] (ALiBi).
      is_causal: self-attention is causal (query t sees keys <= t).
      rope_positions: positions [T] of rotary embeddings, or None.
      valid: [B, T] real (non-pad) positions, for BatchNorm statistics.
      memory: [B, S, D] encoder output for cross-attention (decoder layers; None with a cache).
      memory_mask: cross-attention mask broadcastable to [B, N, T, S].
      cache_index: int32 [], positions already in the caches (x holds the next T).
      train: BatchNorm uses (and updates) batch statistics.
      return_weights: layers return their attention weights in ``aux["attention"]``.
    """

    cfg: TransformerConfig
    exe: ExecConfig = ExecConfig()
    mask: Array | None = None
    bias: Array | None = None
    is_causal: bool = False
    rope_positions: Array | None = None
    valid: Array | None = None
    memory: Array | None = None
    memory_mask: Array | None = None
    cache_index: Array | None = None
    train: bool = False
    return_weights: bool = False

    def replace(self, **changes) -> Context:
        return dataclasses.replace(self, **changes)


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
    ``"none"`` has no parameters (an empty dict keeps every layer's tree the same shape).
    """
    if cfg.norm == "none":
        return {}
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


def apply_norm(ctx: Context, params: dict, state: dict | None, x: Array) -> tuple[Array, dict | None]:
    """x [..., D] through ``ctx.cfg.norm``; returns the output and the (BatchNorm) state.

    ``"none"`` is the identity: the residual stream x + Σ sublayer(·) is left unnormalised."""
    cfg = ctx.cfg
    if cfg.norm == "none":
        return x, state
    if cfg.norm == "layer":
        return layers.layer_norm(params, x, eps=cfg.norm_eps), state
    if cfg.norm == "rms":
        return layers.rms_norm(params, x, eps=cfg.norm_eps), state
    return layers.batch_norm(params, state, x, train=ctx.train, valid=ctx.valid, eps=cfg.norm_eps,
                             momentum=cfg.batch_norm_momentum, axis_name=ctx.exe.batch_norm_axis_name)


def _residual(ctx, params, state, name, x, sublayer, key):
    """Apply ``sublayer`` to x with a residual connection and Pre/Post norm ``<name>_norm``.

    Returns the new x, the updated state dict, and the sublayer's auxiliary output.
    """
    norm, rate = name + "_norm", ctx.cfg.dropout_rate
    if ctx.cfg.norm_position == "pre":
        h, s = apply_norm(ctx, params[norm], state.get(norm), x)
        y, aux = sublayer(h)
        x = x + layers.dropout(y, rate, key)
    else:
        y, aux = sublayer(x)
        x, s = apply_norm(ctx, params[norm], state.get(norm), x + layers.dropout(y, rate, key))
    return x, ({**state, norm: s} if s is not None else state), aux


def _attention(ctx, params, x, kv, *, mask, bias=None, is_causal=False, rope_positions=None, key=None,
               cache=None):
    """Multi-head attention as configured -> (out, {"attention", "cache"}); the reference path
    runs when attention dropout is active or weights are requested."""
    cfg = ctx.cfg
    dropping = key is not None and cfg.attention_dropout_rate > 0.0
    impl = None if (ctx.return_weights or dropping) else ctx.exe.attention_impl
    return multi_head_attention(params, x, kv, mask=mask, bias=bias, is_causal=is_causal,
                                rope_positions=rope_positions, rope_base=cfg.rope_base,
                                dropout_rate=cfg.attention_dropout_rate, key=key,
                                return_weights=ctx.return_weights, implementation=impl,
                                fast_dense=ctx.exe.use_fast_dense,
                                cache=cache, cache_index=None if cache is None else ctx.cache_index)


def _ffn(ctx, params, key):
    cfg = ctx.cfg
    return lambda h: (layers.feed_forward(params, h, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
                                          key=key, fast_dense=ctx.exe.use_fast_dense), None)


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


def encoder_layer(params: dict, x: Array, ctx: Context, *, key: Array | None = None,
                  state: dict | None = None, cache: dict | None = None) -> tuple[Array, dict]:
    """Encoder layer: x ← Residual(SelfAttention(x)), x ← Residual(FFN(x)); x [B, T, D] -> [B, T, D].

    With ``ctx.is_causal`` (or a causal ``ctx.mask``, or a ``cache``) this is also the
    decoder-only (GPT) layer. ``cache``: this layer's self-attention keys/values
    ``{"key", "value"}`` [B, K, S_max, H] holding ``ctx.cache_index`` positions.

    Returns ``(x, aux)``: ``aux["attention"]`` self-attention weights [B, N, T, S] (if
    ``ctx.return_weights``), ``aux["cache"]`` the updated cache (if one was given).
    """
    state = {} if state is None else state
    k_attn, k_res1, k_ffn, k_res2 = split_keys(key, 4)
    x, state, a = _residual(
        ctx, params, state, "self_attn", x,
        lambda h: _attention(ctx, params["self_attn"], h, None, mask=ctx.mask, bias=ctx.bias,
                             is_causal=ctx.is_causal, rope_positions=ctx.rope_positions, key=k_attn,
                             cache=cache),
        k_res1)
    x, state, _ = _residual(ctx, params, state, "ffn", x, _ffn(ctx, params["ffn"], k_ffn), k_res2)
    return x, {"state": state, "attention": a["attention"], "cache": a["cache"]}


def init_decoder_layer(key: Array, cfg: TransformerConfig, num_layers: int | None = None) -> dict:
    """Masked self-attention + cross-attention + feed-forward layer parameters.

    ``num_layers``: the decoder stack's depth (default ``cfg.num_decoder_layers``, or
    ``cfg.num_layers``), for ``cfg.init="gpt2"`` as in ``init_encoder_layer``.
    """
    if num_layers is None:
        num_layers = cfg.decoder_layers
    std, residual_std = init_stds(cfg, num_layers)
    k1, k2 = jax.random.split(key)
    params = init_encoder_layer(k1, cfg, num_layers)
    params["cross_attn"] = init_multi_head_attention(k2, cfg.d_model, cfg.num_heads,
                                                     num_kv_heads=cfg.num_kv_heads, use_bias=cfg.use_bias,
                                                     std=std, out_std=residual_std)
    params["cross_attn_norm"] = init_norm(cfg)
    return params


def decoder_layer(params: dict, y: Array, ctx: Context, *, key: Array | None = None,
                  state: dict | None = None, cache: dict | None = None) -> tuple[Array, dict]:
    """Decoder layer: y ← Residual(MaskedSelfAttention(y)), y ← Residual(CrossAttention(y, memory)),
    y ← Residual(FFN(y)); y [B, T, D] -> [B, T, D], memory ``ctx.memory`` [B, S, D].

    ``ctx.mask``/``ctx.is_causal`` mask the self-attention, ``ctx.memory_mask`` the
    cross-attention. ``cache``: ``{"key", "value"}`` [B, K, S_max, H] self-attention
    keys/values (as ``encoder_layer``) and ``{"cross_key", "cross_value"}`` [B, K, S, H],
    the memory projected once (``decoding.init_seq2seq_cache``); ``ctx.memory`` is then unused.

    Returns ``(y, aux)``: ``aux["attention"] = {"self": [B, N, T, T|S_max], "cross": [B, N, T, S]}``
    (if ``ctx.return_weights``), ``aux["cache"]`` the updated cache (if one was given).
    """
    state = {} if state is None else state
    k_sa, k_r1, k_ca, k_r2, k_ffn, k_r3 = split_keys(key, 6)
    self_cache = None if cache is None else {"key": cache["key"], "value": cache["value"]}
    y, state, a_self = _residual(
        ctx, params, state, "self_attn", y,
        lambda h: _attention(ctx, params["self_attn"], h, None, mask=ctx.mask, bias=ctx.bias,
                             is_causal=ctx.is_causal, rope_positions=ctx.rope_positions, key=k_sa,
                             cache=self_cache),
        k_r1)
    memory = ctx.memory if cache is None else (heads_first(cache["cross_key"]), heads_first(cache["cross_value"]))
    y, state, a_cross = _residual(
        ctx, params, state, "cross_attn", y,
        lambda h: _attention(ctx, params["cross_attn"], h, memory, mask=ctx.memory_mask, key=k_ca),
        k_r2)
    y, state, _ = _residual(ctx, params, state, "ffn", y, _ffn(ctx, params["ffn"], k_ffn), k_r3)
    weights = {"self": a_self["attention"], "cross": a_cross["attention"]} if ctx.return_weights else None
    return y, {"state": state, "attention": weights,
               "cache": None if cache is None else {**cache, **a_self["cache"]}}


# ---------------------------------------------------------------------- stacks


def init_stack(key: Array, cfg: TransformerConfig, init_layer: Callable, num_layers: int) -> dict:
    """A stack of ``num_layers`` layers: ``{"layers": params stacked on a leading [L] axis}``
    and, if ``cfg.use_final_norm``, ``"final_norm"``.

    ``init_layer(key, cfg, num_layers)`` is ``init_encoder_layer`` or ``init_decoder_layer``.
    """
    params = {"layers": jax.vmap(lambda k: init_layer(k, cfg, num_layers))(jax.random.split(key, num_layers))}
    if cfg.use_final_norm:
        params["final_norm"] = init_norm(cfg)
    return params


def unstack_layers(params: dict) -> dict:
    """``params`` with every layer stack (a ``"layers"`` entry, stacked on [L] by
    ``init_stack``) as a list of L per-layer trees, which ``run_stack`` also runs."""
    def split(name, tree):
        if name == "layers" and not isinstance(tree, list):
            n = jax.tree_util.tree_leaves(tree)[0].shape[0]
            return [jax.tree_util.tree_map(lambda a: a[i], tree) for i in range(n)]
        return {k: split(k, v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return split(None, params)


def stack(layer: Layer, params: dict, x: Array, ctx: Context, *, key: Array | None = None,
          state: dict | None = None, cache: list | None = None) -> tuple[Array, dict]:
    """A layer stack on the layer contract: ``x ← layer(params_l, x, ctx, key_l, state_l, cache_l)``
    for l = 1..L, then the final norm if the stack has one. x [B, T, D] -> [B, T, D].

    ``layer`` is ``encoder_layer`` or ``decoder_layer`` (or any layer on the contract);
    ``params`` from ``init_stack`` (layers stacked on [L], or a list of L per-layer trees,
    ``unstack_layers``). With ``ctx.exe.scan_layers`` the stack is one ``lax.scan``
    (compile time independent of L); otherwise a Python loop with identical results.
    ``ctx.exe.remat`` recomputes each layer's activations in the backward pass
    (``jax.checkpoint``): True saves nothing inside a layer, a ``REMAT_POLICIES`` name
    chooses what is kept.

    ``cache``: a list of L per-layer caches. A cached (decoding) call, or listed params,
    is always the Python loop: decoding makes both lists once, before its token loop,
    because inside the loop a stack on [L] would be sliced (weights) and re-stacked
    (caches), i.e. copied, at every token.

    Returns ``(x, aux)``: ``aux["state"]`` ``{"layers": stacked [L] states, "final_norm"}``
    (BatchNorm only, else ``{}``), ``aux["attention"]`` per-layer weights stacked on [L],
    ``aux["cache"]`` the list of updated caches.
    """
    state = {} if state is None else state
    stacked = params["layers"]
    listed = isinstance(stacked, list)
    num_layers = len(stacked) if listed else jax.tree_util.tree_leaves(stacked)[0].shape[0]
    if cache is not None and len(cache) != num_layers:
        raise ValueError(f"a cache of {len(cache)} layers for a stack of {num_layers}")
    keys = None if key is None else jax.random.split(key, num_layers)

    def one(p, s, h, k, c):
        return layer(p, h, ctx, key=k, state=s, cache=c)

    remat = ctx.exe.remat
    if remat:
        one = jax.checkpoint(one, policy=getattr(jax.checkpoint_policies,
                                                 "nothing_saveable" if remat is True else remat))

    def body(h, xs):
        p, s, k, c = xs
        h, aux = one(p, s, h, k, c)
        return h, (aux["state"], aux["attention"], aux["cache"])

    layer_state = state.get("layers", {})
    if ctx.exe.scan_layers and cache is None and not listed:
        x, (layer_state, weights, _) = jax.lax.scan(body, x, (stacked, layer_state, keys, None))
        new_cache = None
    else:
        outs, new_cache = [], []
        for i in range(num_layers):
            s_k = jax.tree_util.tree_map(lambda a: a[i], (layer_state, keys))
            p = stacked[i] if listed else jax.tree_util.tree_map(lambda a: a[i], stacked)
            x, (s, w, c) = body(x, (p, *s_k, None if cache is None else cache[i]))
            outs.append((s, w))
            new_cache.append(c)
        layer_state, weights = jax.tree_util.tree_map(lambda *a: jax.numpy.stack(a), *outs)
        new_cache = None if cache is None else new_cache
    state = {**state, "layers": layer_state} if layer_state else state
    if ctx.cfg.use_final_norm:
        x, s = apply_norm(ctx, params["final_norm"], state.get("final_norm"), x)
        if s is not None:
            state = {**state, "final_norm": s}
    return x, {"state": state, "attention": weights, "cache": new_cache}
