"""Transformer models: encoder-decoder (seq2seq), decoder-only LM, encoder-only classifier.

Each model is an ``init_<model>(key, cfg) -> params`` and an
``<model>_apply(params, ..., cfg=cfg, exe=exe) -> (logits, aux)`` pair, always a pair:
``aux = {"state": new BatchNorm statistics ({} without BatchNorm), "attention": weights
or None (``return_attention``), "cache": the updated cache or None}``. ``cfg`` is what
the model is, ``exe`` (default ``ExecConfig()``) how it runs.

Dropout is active only when a PRNG ``key`` is given; ``train`` selects
BatchNorm's batch statistics (and updates its running statistics).

Incremental decoding: ``decoding.init_lm_cache`` / ``decoding.init_seq2seq_cache`` make
a key/value cache; ``lm_apply(..., cache=cache)`` and ``seq2seq_decode(..., cache=cache)``
then run only the T new positions (the same layers, attending to the cached
keys/values) and return the updated cache in ``aux["cache"]``. Cache layout, per
decoder stack (heads first, as the per-head products read it; one dict per layer, so a
decoded token writes its rows in place instead of re-stacking [L] arrays)::

    {"layers": [{"key": [B, K, S_max, H], "value": [B, K, S_max, H],
                 # seq2seq only: the encoder memory projected once per layer
                 "cross_key": [B, K, S, H], "cross_value": [B, K, S, H]}] * L,
     "index": int32 [],            # positions already cached (the same for every row)
     "valid": bool [B, S_max],     # cached (self-attention) keys that are not padding
     "memory_valid": bool [B, S]}  # seq2seq only: source keys that are not padding
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jformer import blocks, layers, positional
from jformer.blocks import Context
from jformer.config import ExecConfig, TransformerConfig

Array = jax.Array


def init_state(params: dict, cfg: TransformerConfig) -> dict:
    """BatchNorm running statistics for ``params``: ``{"mean": 0, "var": 1}`` beside every norm.

    Empty for LayerNorm / RMSNorm models. Stacked layers get stacked [L, D] statistics.
    """
    if cfg.norm != "batch":
        return {}

    def walk(tree):
        out = {}
        for name, sub in tree.items():
            if not isinstance(sub, dict):
                continue
            if name.endswith("norm"):
                out[name] = {"mean": jnp.zeros_like(sub["scale"]), "var": jnp.ones_like(sub["scale"])}
            elif s := walk(sub):
                out[name] = s
        return out

    return walk(params)


def check_state(cfg: TransformerConfig, state) -> None:
    """A BatchNorm model needs its running statistics: raise a ValueError saying how, if missing."""
    if cfg.norm == "batch" and state is None:
        raise ValueError("a BatchNorm model needs its running statistics: pass "
                         "state=init_state(params, cfg) (and keep the returned aux['state'])")


def init_encoder(key: Array, cfg: TransformerConfig, num_layers: int | None = None) -> dict:
    """Encoder stack (self-attention layers; also the LM's causal stack): ``blocks.init_stack``."""
    return blocks.init_stack(key, cfg, blocks.init_encoder_layer,
                             cfg.num_layers if num_layers is None else num_layers)


def init_decoder(key: Array, cfg: TransformerConfig) -> dict:
    """Decoder stack (self + cross attention layers) of ``cfg.decoder_layers`` layers."""
    return blocks.init_stack(key, cfg, blocks.init_decoder_layer, cfg.decoder_layers)


# ----------------------------------------------------------- token embeddings


def _init_std(cfg: TransformerConfig) -> float | None:
    """Std of token embeddings and output heads: None (each layer's default) or GPT-2's 0.02."""
    return blocks.init_stds(cfg, 1)[0]


def _init_embeddings(key: Array, cfg: TransformerConfig, vocab_size: int, max_len: int) -> dict:
    k_tok, k_pos = jax.random.split(key)
    params = {"token": layers.init_embedding(k_tok, vocab_size, cfg.d_model, std=_init_std(cfg))}
    if cfg.positions == "learned":
        params["position"] = positional.init_learned_positions(k_pos, max_len, cfg.d_model)
    return params


def _embed(params: dict, tokens: Array, cfg: TransformerConfig, exe: ExecConfig, key: Array | None,
           positions: Array | None = None, max_len: int | None = None, embeddings: Array | None = None) -> Array:
    """Token embeddings (× √D if configured) plus absolute positions, then dropout: [B, T] -> [B, T, D].

    ``positions`` [T] default to 0..T-1; decoding with a cache passes index..index+T-1.
    ``max_len``: the side's position limit (``cfg.max_len``, or ``cfg.source_max_len``).
    ``embeddings`` [B, T, D]: given token embeddings instead of the table's rows.
    """
    T = tokens.shape[-1]
    if cfg.positions == "learned":
        positional.check_table_length("a sequence", T, cfg.max_len if max_len is None else max_len)
    positions = jnp.arange(T) if positions is None else positions
    x = layers.embed(params["token"], tokens) if embeddings is None else embeddings
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.d_model)
    if cfg.positions == "sinusoidal":
        x = x + positional.sinusoidal_positions(positions, cfg.d_model)
    elif cfg.positions == "learned":
        x = x + positional.learned_positions(params["position"], positions)
    # Every later layer casts its float32 parameters to the dtype of its input.
    return layers.dropout(x.astype(exe.compute_dtype), cfg.dropout_rate, key)


def _relative_positions(cfg: TransformerConfig, q_positions: int | Array,
                        k_positions: int | Array | None = None) -> dict:
    """Self-attention arguments for relative schemes: ALiBi ``bias`` or RoPE ``rope_positions``.

    Positions are [T] / [S] arrays or lengths (0..T-1); keys default to the queries.
    """
    if cfg.positions == "alibi":
        return {"bias": positional.alibi_bias(cfg.num_heads, q_positions, k_positions)}
    if cfg.positions == "rope":
        return {"rope_positions": jnp.arange(q_positions) if isinstance(q_positions, int) else q_positions}
    return {}


def real_tokens(tokens: Array | None, cfg: TransformerConfig, explicit: Array | None = None,
                name: str = "mask") -> Array | None:
    """Real (non-pad) tokens [B, T]: ``explicit`` if given (checked against tokens), else
    ``tokens != cfg.pad_id``, else None (no padding)."""
    if explicit is not None:
        if explicit.dtype != jnp.bool_:
            raise TypeError(f"{name} must be boolean [B, T] (True = a real token that may be attended), "
                            f"got dtype {explicit.dtype}")
        if tokens is not None and explicit.shape != tokens.shape:
            raise ValueError(f"{name} of shape {tuple(explicit.shape)} must match its tokens "
                             f"{tuple(tokens.shape)}")
        return explicit
    return None if cfg.pad_id is None or tokens is None else tokens != cfg.pad_id


def _key_mask(valid: Array | None) -> Array | None:
    return None if valid is None else valid[:, None, None, :]


def check_tokens(name: str, tokens: Array, vocab_size: int) -> None:
    """Raise a ValueError unless ``tokens`` are integer ids [B, T] inside [0, vocab_size) (where concrete)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids [B, T], got shape {tuple(tokens.shape)} "
                         f"dtype {tokens.dtype}")
    layers.check_ids(name, tokens, vocab_size)


def _check_cache_room(cache: dict, T: int, S_max: int) -> Array:
    """Whether T more positions fit in a cache of S_max; raises if the index is concrete and they do not.

    Under ``jit`` the index is traced: the caller turns the logits into NaN instead, because
    ``dynamic_update_slice`` would clamp the write and return finite, wrong logits.
    """
    index = cache["index"]
    if not isinstance(index, jax.core.Tracer) and int(index) + T > S_max:
        raise ValueError(f"cache overflow: {int(index)} cached positions + {T} new tokens exceed the "
                         f"cache's max_len={S_max}; make the cache with a larger max_len")
    return index + T <= S_max



def _write_cache_valid(cache: dict, valid: Array | None, shape: tuple) -> tuple[dict, Array]:
    """The cache with the new tokens' padding written at its index, and the key mask [B, 1, 1, S_max]
    of every cached key (causality over the cache is added inside the attention)."""
    new_valid = jnp.ones(shape, bool) if valid is None else valid
    cache = {**cache, "valid": jax.lax.dynamic_update_slice_in_dim(cache["valid"], new_valid, cache["index"], 1)}
    return cache, _key_mask(cache["valid"])


def _head(params: dict, embeddings: dict, x: Array, cfg: TransformerConfig, exe: ExecConfig) -> Array:
    if cfg.tie_embeddings:
        return layers.embed_attend(embeddings["token"], x)
    return layers.dense(params["head"], x, fast=exe.use_fast_dense)


def _aux(state=None, attention=None, cache=None) -> dict:
    return {"state": {} if state is None else state, "attention": attention, "cache": cache}


# ---------------------------------------------------------------- seq2seq


def init_seq2seq(key: Array, cfg: TransformerConfig) -> dict:
    """Encoder-decoder parameters: embeddings, encoder, decoder, output head.

    Embeddings: ``src_embed`` and ``tgt_embed``, or one ``embed`` with
    ``cfg.share_embeddings`` (one vocabulary; its position table, if learned, covers
    both ``max_len`` and ``src_max_len``). ``head`` [D, V] unless ``cfg.tie_embeddings``.
    """
    k_se, k_te, k_enc, k_dec, k_head = jax.random.split(key, 5)
    if cfg.share_embeddings:
        params = {"embed": _init_embeddings(k_te, cfg, cfg.vocab_size, max(cfg.max_len, cfg.source_max_len))}
    else:
        params = {"src_embed": _init_embeddings(k_se, cfg, cfg.source_vocab_size, cfg.source_max_len),
                  "tgt_embed": _init_embeddings(k_te, cfg, cfg.vocab_size, cfg.max_len)}
    params["encoder"] = init_encoder(k_enc, cfg)
    params["decoder"] = init_decoder(k_dec, cfg)
    if not cfg.tie_embeddings:
        params["head"] = layers.init_dense(k_head, cfg.d_model, cfg.vocab_size, use_bias=cfg.use_bias,
                                           std=_init_std(cfg))
    return params


def _embeddings(params: dict, side: str) -> dict:
    return params["embed"] if "embed" in params else params[f"{side}_embed"]


def seq2seq_encode(params: dict, src: Array, *, cfg: TransformerConfig, exe: ExecConfig | None = None,
                   src_mask: Array | None = None, state: dict | None = None, train: bool = False,
                   key: Array | None = None, return_weights: bool = False) -> tuple[Array, dict]:
    """Encode source tokens [B, S] -> ``(memory [B, S, D], aux)``; ``aux["attention"]`` [L, B, N, S, S].

    ``src_mask`` [B, S] bool (True = a real token) overrides the padding ``cfg.pad_id`` implies.
    """
    exe = exe or ExecConfig()
    check_tokens("src", src, cfg.source_vocab_size)
    k_emb, k_enc = blocks.split_keys(key, 2)
    valid = real_tokens(src, cfg, src_mask, "src_mask")
    x = _embed(_embeddings(params, "src"), src, cfg, exe, k_emb, max_len=cfg.source_max_len)
    ctx = Context(cfg, exe, mask=_key_mask(valid), valid=valid, train=train, return_weights=return_weights,
                  **_relative_positions(cfg, src.shape[-1]))
    return blocks.stack(blocks.encoder_layer, params["encoder"], x, ctx, key=k_enc,
                        state=(state or {}).get("encoder"))


def seq2seq_decode(params: dict, memory: Array | None, src: Array | None, tgt_in: Array, *,
                   cfg: TransformerConfig, exe: ExecConfig | None = None, src_mask: Array | None = None,
                   tgt_mask: Array | None = None, state: dict | None = None, train: bool = False,
                   key: Array | None = None, return_weights: bool = False,
                   cache: dict | None = None) -> tuple[Array, dict]:
    """Decode target inputs [B, T] against memory [B, S, D] -> ``(logits [B, T, V], aux)``.

    The source tokens [B, S] (or ``src_mask`` [B, S], True = real) give the
    cross-attention padding mask; target padding (``tgt_mask`` [B, T], or ``cfg.pad_id``)
    masks decoder self-attention keys, on top of causality.
    ``aux["attention"] = {"self": [L, B, N, T, T], "cross": [L, B, N, T, S]}``.

    With a ``cache`` from ``decoding.init_seq2seq_cache`` (which already holds the
    projected memory and its padding mask: pass ``memory=src=None``), tgt_in are the
    target inputs at positions cache["index"]..cache["index"]+T-1, self-attention
    weights have S_max keys, and ``aux["cache"]`` is the updated cache.
    """
    exe = exe or ExecConfig()
    check_tokens("tgt_in", tgt_in, cfg.vocab_size)
    k_emb, k_dec = blocks.split_keys(key, 2)
    T = tgt_in.shape[-1]
    valid = real_tokens(tgt_in, cfg, tgt_mask, "tgt_mask")
    fits = None
    if cache is None:
        positions = None
        ctx = Context(cfg, exe, mask=_key_mask(valid), is_causal=True, valid=valid, memory=memory,
                      memory_mask=_key_mask(real_tokens(src, cfg, src_mask, "src_mask")), train=train,
                      return_weights=return_weights, **_relative_positions(cfg, T))
    else:
        S_max = cache["valid"].shape[-1]
        fits = _check_cache_room(cache, T, S_max)
        positions = cache["index"] + jnp.arange(T)
        cache, mask = _write_cache_valid(cache, valid, tgt_in.shape)
        ctx = Context(cfg, exe, mask=mask, is_causal=True, valid=valid,
                      memory_mask=_key_mask(cache["memory_valid"]), cache_index=cache["index"], train=train,
                      return_weights=return_weights, **_relative_positions(cfg, positions, S_max))
    embeddings = _embeddings(params, "tgt")
    y = _embed(embeddings, tgt_in, cfg, exe, k_emb, positions)
    y, aux = blocks.stack(blocks.decoder_layer, params["decoder"], y, ctx, key=k_dec,
                          state=(state or {}).get("decoder"),
                          cache=None if cache is None else cache["layers"])
    logits = _head(params, embeddings, y, cfg, exe)
    if cache is not None:
        logits = layers.nan_unless(fits, logits)
        aux = {**aux, "cache": {**cache, "layers": aux["cache"], "index": cache["index"] + T}}
    return logits, aux


def seq2seq_apply(params: dict, src: Array, tgt_in: Array, *, cfg: TransformerConfig,
                  exe: ExecConfig | None = None, src_mask: Array | None = None,
                  tgt_mask: Array | None = None, state: dict | None = None, train: bool = False,
                  key: Array | None = None, return_attention: bool = False) -> tuple[Array, dict]:
    """Encoder-decoder forward pass: P(y_t | y_<t, x) logits [B, T, V] for source [B, S], target inputs [B, T].

    Padding comes from ``cfg.pad_id``, or explicitly from ``src_mask`` [B, S] and
    ``tgt_mask`` [B, T] (bool, True = a real token that may be attended).
    Returns ``(logits, aux)``; attention weights (if requested): ``{"encoder": [L, B, N, S, S],
    "decoder_self": [L, B, N, T, T], "decoder_cross": [L, B, N, T, S]}``.
    """
    check_state(cfg, state)
    k_enc, k_dec = blocks.split_keys(key, 2)
    memory, enc = seq2seq_encode(params, src, cfg=cfg, exe=exe, src_mask=src_mask, state=state, train=train,
                                 key=k_enc, return_weights=return_attention)
    logits, dec = seq2seq_decode(params, memory, src, tgt_in, cfg=cfg, exe=exe, src_mask=src_mask,
                                 tgt_mask=tgt_mask, state=state, train=train, key=k_dec,
                                 return_weights=return_attention)
    weights = ({"encoder": enc["attention"], "decoder_self": dec["attention"]["self"],
                "decoder_cross": dec["attention"]["cross"]} if return_attention else None)
    return logits, _aux({"encoder": enc["state"], "decoder": dec["state"]} if state else {}, weights)


# ----------------------------------------------------------- decoder-only LM


def init_lm(key: Array, cfg: TransformerConfig) -> dict:
    """Decoder-only LM parameters: embeddings, a causal self-attention stack, output head."""
    k_emb, k_dec, k_head = jax.random.split(key, 3)
    params = {"embed": _init_embeddings(k_emb, cfg, cfg.vocab_size, cfg.max_len),
              "decoder": init_encoder(k_dec, cfg)}
    if not cfg.tie_embeddings:
        params["head"] = layers.init_dense(k_head, cfg.d_model, cfg.vocab_size, use_bias=cfg.use_bias,
                                           std=_init_std(cfg))
    return params


def lm_apply(params: dict, tokens: Array, *, cfg: TransformerConfig, exe: ExecConfig | None = None,
             state: dict | None = None, train: bool = False, key: Array | None = None,
             return_attention: bool = False, cache: dict | None = None, causal: bool = True,
             tokens_mask: Array | None = None, embeddings: Array | None = None) -> tuple[Array, dict]:
    """Decoder-only LM: next-token logits P(x_{t+1} | x_≤t) [B, T, V] for tokens [B, T].

    The decoder is the encoder layer stack under a causal mask, plus key padding
    when ``cfg.pad_id`` is set (by default no token is padding). Returns
    ``(logits, aux)``; attention weights (if requested): [L, B, N, T, T].

    For studies of what the mask does: ``causal=False`` lets every query see every key
    (the model can read the token it predicts; no cache then); ``tokens_mask`` [B, T] bool
    (True = a key that exists) overrides the padding ``cfg.pad_id`` implies; ``embeddings``
    [B, T, D] replace the table's token embeddings (before √D scaling and positions), so
    that gradients per position are ``jax.grad`` with respect to them.

    With a ``cache`` from ``decoding.init_lm_cache``, tokens are positions
    cache["index"]..cache["index"]+T-1 of sequences whose earlier positions are
    cached (T = P to prefill a prompt, then T = 1 per generated token);
    ``aux["cache"]`` is the updated cache (weights then have S_max keys).
    """
    exe = exe or ExecConfig()
    check_state(cfg, state)
    check_tokens("tokens", tokens, cfg.vocab_size)
    k_emb, k_dec = blocks.split_keys(key, 2)
    T = tokens.shape[-1]
    if not causal and cache is not None:
        raise ValueError("lm_apply(causal=False) cannot decode with a cache: cached decoding is causal")
    if embeddings is not None and embeddings.shape != (*tokens.shape, cfg.d_model):
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} must be tokens' shape "
                         f"{tuple(tokens.shape)} + (d_model={cfg.d_model},)")
    valid = real_tokens(tokens, cfg, tokens_mask, "tokens_mask")
    fits = None
    if cache is None:
        positions = None
        # causality: is_causal (blockwise attention then skips whole blocks)
        ctx = Context(cfg, exe, mask=_key_mask(valid), is_causal=causal, valid=valid, train=train,
                      return_weights=return_attention, **_relative_positions(cfg, T))
    else:
        S_max = cache["valid"].shape[-1]
        fits = _check_cache_room(cache, T, S_max)
        positions = cache["index"] + jnp.arange(T)
        cache, mask = _write_cache_valid(cache, valid, tokens.shape)
        ctx = Context(cfg, exe, mask=mask, is_causal=True, valid=valid, cache_index=cache["index"],
                      train=train, return_weights=return_attention,
                      **_relative_positions(cfg, positions, S_max))
    x = _embed(params["embed"], tokens, cfg, exe, k_emb, positions, embeddings=embeddings)
    x, aux = blocks.stack(blocks.encoder_layer, params["decoder"], x, ctx, key=k_dec,
                          state=(state or {}).get("decoder"),
                          cache=None if cache is None else cache["layers"])
    logits = _head(params, params["embed"], x, cfg, exe)
    new_cache = None
    if cache is not None:
        logits = layers.nan_unless(fits, logits)
        new_cache = {**cache, "layers": aux["cache"], "index": cache["index"] + T}
    return logits, _aux({"decoder": aux["state"]} if state else {}, aux["attention"], new_cache)


# ---------------------------------------------------------- encoder classifier


def init_classifier(key: Array, cfg: TransformerConfig) -> dict:
    """Encoder-only classifier parameters: embeddings, encoder, ``head`` [D, num_classes]."""
    if cfg.num_classes is None:
        raise ValueError("TransformerConfig.num_classes must be set for a classifier")
    k_emb, k_enc, k_head = jax.random.split(key, 3)
    return {"embed": _init_embeddings(k_emb, cfg, cfg.vocab_size, cfg.max_len),
            "encoder": init_encoder(k_enc, cfg),
            "head": layers.init_dense(k_head, cfg.d_model, cfg.num_classes, std=_init_std(cfg))}


def classifier_apply(params: dict, tokens: Array, *, cfg: TransformerConfig, exe: ExecConfig | None = None,
                     state: dict | None = None, train: bool = False, key: Array | None = None,
                     return_attention: bool = False) -> tuple[Array, dict]:
    """Encoder-only classifier: ``(class logits [B, C], aux)`` for tokens [B, T].

    Pools the encoder output by the mean over real tokens (``pooling="mean"``)
    or by the first position (``"cls"``), then a dense head.
    """
    exe = exe or ExecConfig()
    check_state(cfg, state)
    check_tokens("tokens", tokens, cfg.vocab_size)
    k_emb, k_enc = blocks.split_keys(key, 2)
    valid = real_tokens(tokens, cfg)
    x = _embed(params["embed"], tokens, cfg, exe, k_emb)
    ctx = Context(cfg, exe, mask=_key_mask(valid), valid=valid, train=train, return_weights=return_attention,
                  **_relative_positions(cfg, tokens.shape[-1]))
    x, aux = blocks.stack(blocks.encoder_layer, params["encoder"], x, ctx, key=k_enc,
                          state=(state or {}).get("encoder"))
    if cfg.pooling == "cls":
        pooled = x[:, 0]
    else:
        w = jnp.ones(tokens.shape, x.dtype) if valid is None else valid.astype(x.dtype)
        pooled = (x * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
    logits = layers.dense(params["head"], pooled, fast=exe.use_fast_dense)
    return logits, _aux({"encoder": aux["state"]} if state else {}, aux["attention"])
