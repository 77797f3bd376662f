"""Transformer models: encoder-decoder (seq2seq), decoder-only LM, encoder-only classifier.

Each model is an ``init_<model>(key, cfg) -> params`` and an
``<model>_apply(params, ..., cfg=cfg)`` pair. An apply returns the logits, or
``(logits, aux)`` when ``state`` is passed (BatchNorm), attention weights are
requested or a cache is given; ``aux = {"state": new_state, "attention": weights
or None}``, plus ``"cache"`` (the updated cache) when one was given.

Dropout is active only when a PRNG ``key`` is given; ``train`` selects
BatchNorm's batch statistics (and updates its running statistics).

Incremental decoding: ``init_lm_cache`` / ``init_seq2seq_cache`` make a key/value
cache; ``lm_apply(..., cache=cache)`` and ``seq2seq_decode(..., cache=cache)`` then
run only the T new positions (the same layers, attending to the cached
keys/values) and return the updated cache. Cache layout, per decoder stack
(heads first, as the per-head products read it; one dict per layer, so a
decoded token writes its rows in place instead of re-stacking [L] arrays)::

    {"layers": [{"key": [B, K, S_max, H], "value": [B, K, S_max, H],
                 # seq2seq only: the encoder memory projected once per layer
                 "cross_key": [B, K, S, H], "cross_value": [B, K, S, H]}] * L,
     "index": int32 [],            # positions already cached (the same for every row)
     "valid": bool [B, S_max],     # LM only: cached keys that are not padding
     "memory_valid": bool [B, S]}  # seq2seq only: source keys that are not padding
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jformer import attention, blocks, layers, positional

Array = jax.Array

NORMS = ("layer", "rms", "batch")
NORM_POSITIONS = ("post", "pre")
POOLINGS = ("mean", "cls")
ATTENTION_IMPLS = (None, "xla", "cudnn", "blockwise")
COMPUTE_DTYPES = ("float32", "bfloat16")
INITS = ("default", "gpt2")


@dataclass(frozen=True)
class TransformerConfig:
    """Static hyper-parameters (hashable: pass as a static argument to ``jax.jit``).

    ``num_layers`` is the encoder depth (and the depth of LM / classifier stacks);
    ``num_decoder_layers`` the seq2seq decoder depth (default ``num_layers``).
    ``final_norm`` defaults to True for Pre-LN and False for Post-LN.
    ``use_bias=False`` removes the biases of every dense layer and of the LayerNorms
    (BatchNorm keeps its shift). ``init`` chooses the initialisation: ``"default"``
    (Glorot-uniform kernels, token embeddings ~ N(0, 1/D)) or ``"gpt2"`` (GPT-2 /
    nanoGPT: kernels and token embeddings ~ N(0, 0.02²), the residual output projections
    ~ N(0, 0.02² / (2L)), see ``blocks.init_stds``); biases are zero and learned
    positions ~ N(0, 0.02²) under both.

    Speed and memory switches: ``scan_layers`` (one ``lax.scan`` over the stack: compile
    time flat in depth), ``remat`` (which layer activations the backward pass recomputes
    rather than stores: a ``blocks.REMAT_POLICIES`` name, True for all, False for none;
    the default keeps the weight matmuls' outputs and recomputes the rest, which on CPU
    is 18% faster per lm-small train step than storing everything, and uses less memory),
    ``attention_impl`` (``None`` reference, ``"xla"``/``"cudnn"`` via
    ``jax.nn.dot_product_attention``, ``"blockwise"`` O(T)-memory online softmax), and
    ``compute_dtype="bfloat16"``: mixed precision — parameters stay float32 and are cast
    to bfloat16 where used, activations and matmuls run in bfloat16, while attention
    logits/softmax, norm statistics and the loss are computed in float32.
    """

    vocab_size: int = 256
    src_vocab_size: int | None = None
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    num_layers: int = 6
    num_decoder_layers: int | None = None
    d_ff: int = 2048
    activation: str = "relu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    norm: str = "layer"
    norm_position: str = "post"
    final_norm: bool | None = None
    norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.9
    batch_norm_axis_name: str | None = None
    positions: str = "sinusoidal"
    max_len: int = 512
    rope_base: float = 10000.0
    scale_embeddings: bool = True
    tie_embeddings: bool = False
    use_bias: bool = True
    init: str = "default"
    pad_id: int | None = 0
    num_classes: int | None = None
    pooling: str = "mean"
    scan_layers: bool = True
    remat: bool | str = "dots_with_no_batch_dims_saveable"
    attention_impl: str | None = None
    compute_dtype: str = "float32"

    def __post_init__(self):
        def one_of(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"TransformerConfig.{name} must be one of {allowed}, got {value!r}")

        one_of("activation", layers.ACTIVATIONS)
        one_of("norm", NORMS)
        one_of("norm_position", NORM_POSITIONS)
        one_of("positions", positional.KINDS)
        one_of("pooling", POOLINGS)
        one_of("attention_impl", ATTENTION_IMPLS)
        one_of("compute_dtype", COMPUTE_DTYPES)
        one_of("init", INITS)
        one_of("remat", (False, True, *blocks.REMAT_POLICIES))
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            layers.check_size(f"TransformerConfig.{name}", getattr(self, name))
        for name in ("src_vocab_size", "num_kv_heads", "num_decoder_layers", "num_classes"):
            if getattr(self, name) is not None:
                layers.check_size(f"TransformerConfig.{name}", getattr(self, name))
        for name in ("norm_eps", "rope_base"):
            if not getattr(self, name) > 0:  # also catches NaN
                raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.batch_norm_momentum < 1.0:
            raise ValueError(f"TransformerConfig.batch_norm_momentum must be in [0, 1), "
                             f"got {self.batch_norm_momentum!r}")
        if self.pad_id is not None:
            vocab = min(self.vocab_size, self.src_vocab_size or self.vocab_size)
            if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < vocab:
                raise ValueError(f"TransformerConfig.pad_id must be None or an id in [0, {vocab}) "
                                 f"(the vocabularies), got {self.pad_id!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig.num_heads={self.num_heads} does not divide "
                             f"d_model={self.d_model}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"TransformerConfig.num_kv_heads={self.num_kv_heads} does not divide "
                             f"num_heads={self.num_heads}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary positions rotate pairs of features: the head width "
                             f"d_model / num_heads = {self.d_model // self.num_heads} must be even")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def use_final_norm(self) -> bool:
        return self.norm_position == "pre" if self.final_norm is None else self.final_norm

    def replace(self, **overrides) -> TransformerConfig:
        """A copy with ``overrides``; unknown option names raise a ValueError listing the valid ones."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown TransformerConfig options {sorted(unknown)}; valid options: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)


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


# ----------------------------------------------------------- stacks on vectors


def init_encoder(key: Array, cfg: TransformerConfig, num_layers: int | None = None) -> dict:
    """Encoder stack: ``layers`` (stacked [L, ...]) and, if configured, ``final_norm``."""
    num_layers = cfg.num_layers if num_layers is None else num_layers
    params = {"layers": blocks.init_stack(key, lambda k: blocks.init_encoder_layer(k, cfg, num_layers),
                                          num_layers)}
    if cfg.use_final_norm:
        params["final_norm"] = blocks.init_norm(cfg)
    return params


def init_decoder(key: Array, cfg: TransformerConfig) -> dict:
    """Decoder stack (self + cross attention layers) and, if configured, ``final_norm``."""
    num_layers = cfg.num_layers if cfg.num_decoder_layers is None else cfg.num_decoder_layers
    params = {"layers": blocks.init_stack(key, lambda k: blocks.init_decoder_layer(k, cfg, num_layers),
                                          num_layers)}
    if cfg.use_final_norm:
        params["final_norm"] = blocks.init_norm(cfg)
    return params


def _final_norm(cfg, params, state, x, valid, train):
    if not cfg.use_final_norm:
        return x, state
    x, s = blocks.apply_norm(cfg, params["final_norm"], state.get("final_norm"), x,
                             valid=valid, train=train)
    return x, ({**state, "final_norm": s} if s is not None else state)


def encoder(params: dict, x: Array, *, cfg: TransformerConfig, mask: Array | None = None,
            bias: Array | None = None, is_causal: bool = False, rope_positions: Array | None = None,
            valid: Array | None = None, state: dict | None = None, train: bool = False,
            key: Array | None = None, return_weights: bool = False,
            cache: dict | None = None, cache_index: Array | None = None) -> tuple:
    """Encoder stack on vectors x [B, T, D] -> ([B, T, D], state, weights [L, B, N, T, T] or None).

    ``mask`` broadcastable to [B, N, T, T]; ``is_causal`` makes it a decoder-only
    (causal) stack; ``valid`` [B, T] marks real tokens for BatchNorm statistics.
    With a key/value ``cache`` (L dicts ``{"key", "value"}`` [B, K, S_max, H]) holding
    ``cache_index`` positions, x is positions cache_index..cache_index+T-1 of a
    causal stack, mask/bias/weights have S_max keys, and the updated cache is appended.
    """
    state = {} if state is None else state

    def layer(p, s, h, k, c=None):
        return blocks.encoder_layer(p, s, h, cfg=cfg, mask=mask, bias=bias, is_causal=is_causal,
                                    rope_positions=rope_positions,
                                    valid=valid, train=train, key=k, return_weights=return_weights,
                                    cache=c, cache_index=cache_index)

    x, layer_state, weights, *new_cache = blocks.run_stack(
        layer, params["layers"], state.get("layers", {}), x, key, cache=cache, scan=cfg.scan_layers,
        remat=cfg.remat)
    x, state = _final_norm(cfg, params, {**state, "layers": layer_state} if layer_state else state,
                           x, valid, train)
    return (x, state, weights, *new_cache)


def decoder(params: dict, y: Array, memory: Array | None, *, cfg: TransformerConfig,
            self_mask: Array | None = None, cross_mask: Array | None = None,
            is_causal: bool = False, bias: Array | None = None,
            rope_positions: Array | None = None,
            valid: Array | None = None, state: dict | None = None, train: bool = False,
            key: Array | None = None, return_weights: bool = False,
            cache: dict | None = None, cache_index: Array | None = None) -> tuple:
    """Decoder stack: y [B, T, D], memory [B, S, D] -> ([B, T, D], state, (self, cross) weights or None).

    ``self_mask`` broadcastable to [B, N, T, T], ``cross_mask`` to [B, N, T, S];
    ``is_causal`` makes self-attention causal (seq2seq decoding passes it, not a mask).
    With a ``cache`` (``init_seq2seq_cache``'s ``"layers"``: self-attention
    keys/values holding ``cache_index`` positions, and the memory's projected
    ``cross_key``/``cross_value``), memory may be None, y is positions
    cache_index..cache_index+T-1, and the updated cache is appended.
    """
    state = {} if state is None else state

    def layer(p, s, h, k, c=None):
        return blocks.decoder_layer(p, s, h, memory, cfg=cfg, self_mask=self_mask, cross_mask=cross_mask,
                                    is_causal=is_causal,
                                    bias=bias, rope_positions=rope_positions, valid=valid, train=train,
                                    key=k, return_weights=return_weights, cache=c, cache_index=cache_index)

    y, layer_state, weights, *new_cache = blocks.run_stack(
        layer, params["layers"], state.get("layers", {}), y, key, cache=cache, scan=cfg.scan_layers,
        remat=cfg.remat)
    y, state = _final_norm(cfg, params, {**state, "layers": layer_state} if layer_state else state,
                           y, valid, train)
    return (y, state, weights, *new_cache)


# ----------------------------------------------------------- token embeddings


def _init_std(cfg: TransformerConfig) -> float | None:
    """Std of token embeddings and output heads: None (each layer's default) or GPT-2's 0.02."""
    return blocks.init_stds(cfg, 1)[0]


def _init_embeddings(key: Array, cfg: TransformerConfig, vocab_size: int) -> dict:
    k_tok, k_pos = jax.random.split(key)
    params = {"token": layers.init_embedding(k_tok, vocab_size, cfg.d_model, std=_init_std(cfg))}
    if cfg.positions == "learned":
        params["position"] = positional.init_learned_positions(k_pos, cfg.max_len, cfg.d_model)
    return params


def _embed(params: dict, tokens: Array, cfg: TransformerConfig, key: Array | None,
           positions: Array | None = None) -> Array:
    """Token embeddings (× √D if configured) plus absolute positions, then dropout: [B, T] -> [B, T, D].

    ``positions`` [T] default to 0..T-1; decoding with a cache passes index..index+T-1.
    """
    T = tokens.shape[-1]
    if cfg.positions == "learned" and T > cfg.max_len:
        raise ValueError(f"sequence length {T} exceeds max_len={cfg.max_len} of learned positions")
    positions = jnp.arange(T) if positions is None else positions
    x = layers.embed(params["token"], tokens)
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.d_model)
    if cfg.positions == "sinusoidal":
        x = x + positional.sinusoidal_positions(positions, cfg.d_model)
    elif cfg.positions == "learned":
        x = x + positional.learned_positions(params["position"], positions)
    # Every later layer casts its float32 parameters to the dtype of its input.
    return layers.dropout(x.astype(cfg.compute_dtype), cfg.dropout_rate, key)


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


def _valid(tokens: Array, cfg: TransformerConfig) -> Array | None:
    return None if cfg.pad_id is None else tokens != cfg.pad_id


def _key_mask(valid: Array | None) -> Array | None:
    return None if valid is None else valid[:, None, None, :]


def _check_tokens(name: str, tokens: Array, vocab_size: int) -> None:
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



def _head(params: dict, embeddings: dict, x: Array, cfg: TransformerConfig) -> Array:
    if cfg.tie_embeddings:
        return layers.embed_attend(embeddings["token"], x)
    return layers.dense(params["head"], x)


def _finish(logits, state, weights, state_given, return_attention, cache=None):
    if cache is not None:
        return logits, {"state": state, "attention": weights if return_attention else None, "cache": cache}
    if state_given or return_attention:
        return logits, {"state": state, "attention": weights if return_attention else None}
    return logits


def _check_state(cfg: TransformerConfig, state) -> None:
    if cfg.norm == "batch" and state is None:
        raise ValueError("a BatchNorm model needs its running statistics: pass "
                         "state=init_state(params, cfg) (and keep the returned aux['state'])")


# ---------------------------------------------------------------- seq2seq


def init_seq2seq(key: Array, cfg: TransformerConfig) -> dict:
    """Encoder-decoder parameters: source/target embeddings, encoder, decoder, output head."""
    k_se, k_te, k_enc, k_dec, k_head = jax.random.split(key, 5)
    params = {
        "src_embed": _init_embeddings(k_se, cfg, cfg.src_vocab_size or cfg.vocab_size),
        "tgt_embed": _init_embeddings(k_te, cfg, cfg.vocab_size),
        "encoder": init_encoder(k_enc, cfg),
        "decoder": init_decoder(k_dec, cfg),
    }
    if not cfg.tie_embeddings:
        params["head"] = layers.init_dense(k_head, cfg.d_model, cfg.vocab_size, use_bias=cfg.use_bias,
                                           std=_init_std(cfg))
    return params


def seq2seq_encode(params: dict, src: Array, *, cfg: TransformerConfig, state: dict | None = None,
                   train: bool = False, key: Array | None = None,
                   return_weights: bool = False) -> tuple[Array, dict, Array | None]:
    """Encode source tokens [B, S] -> memory [B, S, D], encoder state, weights [L, B, N, S, S] or None."""
    _check_tokens("src", src, cfg.src_vocab_size or cfg.vocab_size)
    k_emb, k_enc = blocks.split_keys(key, 2)
    valid = _valid(src, cfg)
    x = _embed(params["src_embed"], src, cfg, k_emb)
    return encoder(params["encoder"], x, cfg=cfg, mask=_key_mask(valid), valid=valid,
                   state=(state or {}).get("encoder"), train=train, key=k_enc,
                   return_weights=return_weights, **_relative_positions(cfg, src.shape[-1]))


def seq2seq_decode(params: dict, memory: Array | None, src: Array | None, tgt_in: Array, *,
                   cfg: TransformerConfig, state: dict | None = None, train: bool = False,
                   key: Array | None = None, return_weights: bool = False,
                   cache: dict | None = None) -> tuple:
    """Decode target inputs [B, T] against memory [B, S, D] -> logits [B, T, V], decoder state, weights.

    The source tokens [B, S] give the cross-attention padding mask.

    With a ``cache`` from ``init_seq2seq_cache`` (which already holds the projected
    memory and its padding mask: pass ``memory=src=None``), tgt_in are the target
    inputs at positions cache["index"]..cache["index"]+T-1, self-attention weights
    have S_max keys, and the updated cache is appended: (logits, state, weights, cache).
    """
    _check_tokens("tgt_in", tgt_in, cfg.vocab_size)
    k_emb, k_dec = blocks.split_keys(key, 2)
    T = tgt_in.shape[-1]
    valid = _valid(tgt_in, cfg)
    if cache is None:
        positions, cross_mask = None, _key_mask(_valid(src, cfg))
        rel = _relative_positions(cfg, T)
    else:
        S_max = cache["layers"][0]["key"].shape[-2]
        fits = _check_cache_room(cache, T, S_max)
        positions = cache["index"] + jnp.arange(T)
        # Causality over the cache is added inside the attention (it knows the index).
        cross_mask = _key_mask(cache["memory_valid"])
        rel = _relative_positions(cfg, positions, S_max)
    y = _embed(params["tgt_embed"], tgt_in, cfg, k_emb, positions)
    y, dec_state, weights, *layer_cache = decoder(
        params["decoder"], y, memory, cfg=cfg, cross_mask=cross_mask, is_causal=True,
        valid=valid, state=(state or {}).get("decoder"), train=train, key=k_dec,
        return_weights=return_weights, cache=None if cache is None else cache["layers"],
        cache_index=None if cache is None else cache["index"], **rel)
    logits = _head(params, params["tgt_embed"], y, cfg)
    if cache is None:
        return logits, dec_state, weights
    return layers.nan_unless(fits, logits), dec_state, weights, {**cache, "layers": layer_cache[0], "index": cache["index"] + T}


def seq2seq_apply(params: dict, src: Array, tgt_in: Array, *, cfg: TransformerConfig,
                  state: dict | None = None, train: bool = False, key: Array | None = None,
                  return_attention: bool = False):
    """Encoder-decoder forward pass: P(y_t | y_<t, x) logits [B, T, V] for source [B, S], target inputs [B, T].

    Attention weights (if requested): ``{"encoder": [L, B, N, S, S],
    "decoder_self": [L, B, N, T, T], "decoder_cross": [L, B, N, T, S]}``.
    """
    _check_state(cfg, state)
    k_enc, k_dec = blocks.split_keys(key, 2)
    memory, enc_state, enc_w = seq2seq_encode(params, src, cfg=cfg, state=state, train=train, key=k_enc,
                                              return_weights=return_attention)
    logits, dec_state, dec_w = seq2seq_decode(params, memory, src, tgt_in, cfg=cfg, state=state,
                                              train=train, key=k_dec, return_weights=return_attention)
    new_state = {"encoder": enc_state, "decoder": dec_state} if state else {}
    weights = ({"encoder": enc_w, "decoder_self": dec_w[0], "decoder_cross": dec_w[1]}
               if return_attention else None)
    return _finish(logits, new_state, weights, state is not None, return_attention)


# ----------------------------------------------------------- decoder-only LM


def init_lm(key: Array, cfg: TransformerConfig) -> dict:
    """Decoder-only LM parameters: embeddings, a causal self-attention stack, output head."""
    k_emb, k_dec, k_head = jax.random.split(key, 3)
    params = {"embed": _init_embeddings(k_emb, cfg, cfg.vocab_size), "decoder": init_encoder(k_dec, cfg)}
    if not cfg.tie_embeddings:
        params["head"] = layers.init_dense(k_head, cfg.d_model, cfg.vocab_size, use_bias=cfg.use_bias,
                                           std=_init_std(cfg))
    return params


def lm_apply(params: dict, tokens: Array, *, cfg: TransformerConfig, state: dict | None = None,
             train: bool = False, key: Array | None = None, return_attention: bool = False,
             cache: dict | None = None):
    """Decoder-only LM: next-token logits P(x_{t+1} | x_≤t) [B, T, V] for tokens [B, T].

    The decoder is the encoder layer stack under a causal mask (plus key padding
    from ``cfg.pad_id``). Attention weights (if requested): [L, B, N, T, T].

    With a ``cache`` from ``init_lm_cache``, tokens are positions
    cache["index"]..cache["index"]+T-1 of sequences whose earlier positions are
    cached (T = P to prefill a prompt, then T = 1 per generated token); the
    result is always ``(logits, aux)`` with the updated cache in ``aux["cache"]``
    (weights then have S_max keys).
    """
    _check_state(cfg, state)
    _check_tokens("tokens", tokens, cfg.vocab_size)
    k_emb, k_dec = blocks.split_keys(key, 2)
    T = tokens.shape[-1]
    valid = _valid(tokens, cfg)
    fits = None
    if cache is None:
        positions, rel = None, _relative_positions(cfg, T)
        mask = None if valid is None else _key_mask(valid)  # causality: is_causal below
    else:
        fits = _check_cache_room(cache, T, cache["valid"].shape[-1])
        index = cache["index"]
        positions = index + jnp.arange(T)
        rel = _relative_positions(cfg, positions, cache["valid"].shape[-1])
        new_valid = jnp.ones(tokens.shape, bool) if valid is None else valid
        cache = {**cache, "valid": jax.lax.dynamic_update_slice_in_dim(cache["valid"], new_valid, index, 1)}
        mask = _key_mask(cache["valid"])  # causality over the cache is added inside the attention
    x = _embed(params["embed"], tokens, cfg, k_emb, positions)
    x, dec_state, weights, *layer_cache = encoder(
        params["decoder"], x, cfg=cfg, mask=mask, is_causal=True, valid=valid,
        state=(state or {}).get("decoder"),
        train=train, key=k_dec, return_weights=return_attention,
        cache=None if cache is None else cache["layers"],
        cache_index=None if cache is None else cache["index"], **rel)
    logits = _head(params, params["embed"], x, cfg)
    if fits is not None:
        logits = layers.nan_unless(fits, logits)
    new_cache = None if cache is None else {**cache, "layers": layer_cache[0], "index": cache["index"] + T}
    return _finish(logits, {"decoder": dec_state} if state else {}, weights, state is not None,
                   return_attention, new_cache)


# ----------------------------------------------------------- key/value caches


def _empty_kv(cfg: TransformerConfig, attn_params: dict, batch_size: int, max_len: int, dtype) -> list:
    """L zero self-attention caches [B, K, S_max, H]; L, K, H read off the stacked key kernel [L, D, K, H]."""
    if cfg.positions == "learned" and max_len > cfg.max_len:
        # Past the table, position lookups would not fail inside jit: refuse here.
        raise ValueError(f"a cache of {max_len} positions exceeds max_len={cfg.max_len} of learned positions")
    L, _, K, H = attn_params["key"]["kernel"].shape
    return [attention.init_kv_cache((batch_size,), max_len, K, H, dtype) for _ in range(L)]


def init_lm_cache(params: dict, cfg: TransformerConfig, batch_size: int, max_len: int,
                  dtype=None) -> dict:
    """Empty key/value cache of the LM for ``batch_size`` sequences of up to ``max_len`` positions.

    ``{"layers": [{"key", "value"} [B, K, S_max, H]] * L, "valid": [B, S_max], "index": 0}``
    (L, K, H read off the params; ``dtype`` defaults to ``cfg.compute_dtype``); fill it with
    ``lm_apply(params, tokens, cfg=cfg, cache=cache)``.
    """
    return {"layers": _empty_kv(cfg, params["decoder"]["layers"]["self_attn"], batch_size, max_len,
                                dtype or cfg.compute_dtype),
            "valid": jnp.ones((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def init_seq2seq_cache(params: dict, memory: Array, src: Array, *, cfg: TransformerConfig,
                       max_len: int, dtype=None) -> dict:
    """Decoder cache for memory [B, S, D] of source [B, S], for up to ``max_len`` target positions.

    The cross-attention keys/values of every layer are projected here, once:
    ``cross_key``/``cross_value`` [B, K, S, H] per layer; self-attention ``key``/``value``
    [B, K, S_max, H] start empty (``dtype`` defaults to the memory's).
    """
    _check_tokens("src", src, cfg.src_vocab_size or cfg.vocab_size)
    dec = params["decoder"]["layers"]
    cross_key, cross_value = jax.vmap(attention.project_kv, in_axes=(0, None))(dec["cross_attn"], memory)
    layers_cache = _empty_kv(cfg, dec["self_attn"], memory.shape[0], max_len, dtype or memory.dtype)
    valid = _valid(src, cfg)
    layers_cache = [{**c, "cross_key": attention.heads_first(cross_key[i]),
                     "cross_value": attention.heads_first(cross_value[i])} for i, c in enumerate(layers_cache)]
    return {"layers": layers_cache,
            "memory_valid": jnp.ones(src.shape, bool) if valid is None else valid,
            "index": jnp.zeros((), jnp.int32)}


def reorder_cache(cache: dict, rows: Array) -> dict:
    """The cache of batch rows ``rows`` [B'] (e.g. repeat per beam, or follow the surviving beams).

    Every entry but the shared ``index`` carries the batch on axis 0.
    """
    return {name: value if name == "index" else jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), value)
            for name, value in cache.items()}


# ---------------------------------------------------------- encoder classifier


def init_classifier(key: Array, cfg: TransformerConfig) -> dict:
    """Encoder-only classifier parameters: embeddings, encoder, ``head`` [D, num_classes]."""
    if cfg.num_classes is None:
        raise ValueError("TransformerConfig.num_classes must be set for a classifier")
    k_emb, k_enc, k_head = jax.random.split(key, 3)
    return {"embed": _init_embeddings(k_emb, cfg, cfg.vocab_size), "encoder": init_encoder(k_enc, cfg),
            "head": layers.init_dense(k_head, cfg.d_model, cfg.num_classes, std=_init_std(cfg))}


def classifier_apply(params: dict, tokens: Array, *, cfg: TransformerConfig, state: dict | None = None,
                     train: bool = False, key: Array | None = None, return_attention: bool = False):
    """Encoder-only classifier: class logits [B, C] for tokens [B, T].

    Pools the encoder output by the mean over real tokens (``pooling="mean"``)
    or by the first position (``"cls"``), then a dense head.
    """
    _check_state(cfg, state)
    _check_tokens("tokens", tokens, cfg.vocab_size)
    k_emb, k_enc = blocks.split_keys(key, 2)
    valid = _valid(tokens, cfg)
    x = _embed(params["embed"], tokens, cfg, k_emb)
    x, enc_state, weights = encoder(params["encoder"], x, cfg=cfg, mask=_key_mask(valid), valid=valid,
                                    state=(state or {}).get("encoder"), train=train, key=k_enc,
                                    return_weights=return_attention,
                                    **_relative_positions(cfg, tokens.shape[-1]))
    if cfg.pooling == "cls":
        pooled = x[:, 0]
    else:
        w = jnp.ones(tokens.shape, x.dtype) if valid is None else valid.astype(x.dtype)
        pooled = (x * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
    logits = layers.dense(params["head"], pooled)
    return _finish(logits, {"encoder": enc_state} if state else {}, weights, state is not None,
                   return_attention)
