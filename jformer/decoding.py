"""Autoregressive decoding with a key/value cache: greedy, sampling and beam search.

Shape legend: B batch, S source length, P prompt length, V vocabulary, k beam size.

Every decoder is one jitted function (``cfg`` and the search hyper-parameters are
static). The source is encoded once and projected into the cross-attention
cache (seq2seq), or the prompt is run through the LM in one call (prefill); then
a ``lax.while_loop`` feeds one token per step through the cached model
(``models.seq2seq_decode`` / ``models.lm_apply`` with ``cache=``) and stops as
soon as every sequence is finished. A sequence is finished once it emits
``eos_id``; the EOS is kept and every later position holds ``cfg.pad_id``
(``eos_id`` if the config has no pad id).

Ids are checked before the jitted call: a source, prompt, ``bos_id`` or ``eos_id``
outside the vocabulary raises a ValueError naming it. Called inside a caller's own
``jit`` (ids traced, so not checkable), an out-of-range id makes NaN logits, and a
row whose logits are NaN emits -1 from then on: never a plausible token.

Two loops serve both model families, through a step function
``step(tokens [B', 1], cache) -> (next-token logits [B', V], cache)``:
``_sample_loop`` (greedy = argmax, or sampling) and ``_beam_loop``.

Beam search ranks hypotheses Y by the GNMT length-normalised log-likelihood
(Wu et al., 2016) ``s(Y) = log P(Y | X) / lp(Y)``, ``lp(Y) = ((5 + |Y|) / 6)^α``,
with |Y| the number of generated tokens including EOS.
"""

from __future__ import annotations

import functools
import inspect
from functools import partial

import jax
import jax.numpy as jnp

from jformer import positional
from jformer.attention import project_kv
from jformer.blocks import unstack_layers
from jformer.cache import heads_first, init_kv_cache
from jformer.config import ExecConfig, TransformerConfig
from jformer.layers import check_ids
from jformer.models import check_state, check_tokens, lm_apply, real_tokens, seq2seq_decode, seq2seq_encode

Array = jax.Array


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^α; α = 0 gives plain log-likelihood."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ------------------------------------------------------------------ validation


def _check_search(*, beam_size: int = 1, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _check_length(cfg: TransformerConfig, name: str, value: int, positions: int) -> None:
    """``positions``: how many target positions get embedded (and cached)."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg.positions == "learned":
        positional.check_table_length(f"decoding ({name}={value})", positions, cfg.max_len)


def _check_ids(args: dict) -> None:
    """Token ids of a decoder call (bound arguments by name) inside the vocabulary, where concrete."""
    cfg = args["cfg"]
    if "src" in args:
        check_ids("src", args["src"], cfg.source_vocab_size)
    if "prompt" in args:
        check_ids("prompt", args["prompt"], cfg.vocab_size)
    for name in ("bos_id", "eos_id"):
        value = args.get(name)
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size})")


def _jit_checked(*static_argnames: str):
    """``jax.jit`` with ``static_argnames``, after ``_check_ids`` on the concrete arguments."""
    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            _check_ids(signature.bind(*args, **kwargs).arguments)
            return jitted(*args, **kwargs)

        return call

    return wrap


# ---------------------------------------------------------------- caches


def _empty_kv(cfg: TransformerConfig, attn_params: dict, batch_size: int, max_len: int, dtype) -> list:
    """L zero self-attention caches [B, K, S_max, H]; L, K, H read off the stacked key kernel [L, D, K, H]."""
    if cfg.positions == "learned":
        positional.check_table_length("a cache", max_len, cfg.max_len)
    L, _, K, H = attn_params["key"]["kernel"].shape
    return [init_kv_cache((batch_size,), max_len, K, H, dtype) for _ in range(L)]


def init_lm_cache(params: dict, cfg: TransformerConfig, batch_size: int, max_len: int,
                  dtype="float32") -> dict:
    """Empty key/value cache of the LM for ``batch_size`` sequences of up to ``max_len`` positions.

    ``{"layers": [{"key", "value"} [B, K, S_max, H]] * L, "valid": [B, S_max], "index": 0}``
    (L, K, H read off the params; ``dtype`` of the keys/values, ``ExecConfig.compute_dtype``); fill it with
    ``lm_apply(params, tokens, cfg=cfg, cache=cache)``.
    """
    return {"layers": _empty_kv(cfg, params["decoder"]["layers"]["self_attn"], batch_size, max_len,
                                dtype),
            "valid": jnp.ones((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def init_seq2seq_cache(params: dict, memory: Array, src: Array, *, cfg: TransformerConfig,
                       max_len: int, dtype=None, src_mask: Array | None = None) -> dict:
    """Decoder cache for memory [B, S, D] of source [B, S], for up to ``max_len`` target positions.

    The cross-attention keys/values of every layer are projected here, once:
    ``cross_key``/``cross_value`` [B, K, S, H] per layer; self-attention ``key``/``value``
    [B, K, S_max, H] start empty (``dtype`` defaults to the memory's). The source padding
    (``src_mask`` [B, S], True = real, or ``cfg.pad_id``) masks the cross-attention keys.
    """
    check_tokens("src", src, cfg.source_vocab_size)
    dec = params["decoder"]["layers"]
    cross_key, cross_value = jax.vmap(project_kv, in_axes=(0, None))(dec["cross_attn"], memory)
    layers_cache = _empty_kv(cfg, dec["self_attn"], memory.shape[0], max_len, dtype or memory.dtype)
    valid = real_tokens(src, cfg, src_mask, "src_mask")
    layers_cache = [{**c, "cross_key": heads_first(cross_key[i]),
                     "cross_value": heads_first(cross_value[i])} for i, c in enumerate(layers_cache)]
    return {"layers": layers_cache, "valid": jnp.ones((memory.shape[0], max_len), bool),
            "memory_valid": jnp.ones(src.shape, bool) if valid is None else valid,
            "index": jnp.zeros((), jnp.int32)}


def reorder_cache(cache: dict, rows: Array) -> dict:
    """The cache of batch rows ``rows`` [B'] (e.g. repeat per beam, or follow the surviving beams).

    Every entry but the shared ``index`` carries the batch on axis 0.
    """
    return {name: value if name == "index" else jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), value)
            for name, value in cache.items()}


# ---------------------------------------------------------------- loops


_BAD_TOKEN = -1  # emitted by a row whose logits are NaN (an out-of-range id inside a caller's jit)


def _fill(cfg: TransformerConfig, eos_id: int | None) -> int:
    if cfg.pad_id is not None:
        return cfg.pad_id
    return 0 if eos_id is None else eos_id


# ------------------------------------------------- model-specific starts


def _seq2seq_start(params, src, cfg, exe, state, bos_id, max_len):
    """Encode once; cache sized for the max_len decoder inputs BOS, y_0 .. y_{max_len-2}."""
    exe = exe or ExecConfig()
    check_state(cfg, state)
    _check_length(cfg, "max_len", max_len, max_len)
    memory, _ = seq2seq_encode(params, src, cfg=cfg, exe=exe, state=state)
    cache = init_seq2seq_cache(params, memory, src, cfg=cfg, max_len=max_len)
    params = unstack_layers(params)  # once, not at every token (see blocks.stack)

    def step(tokens, cache):
        logits, aux = seq2seq_decode(params, None, None, tokens, cfg=cfg, exe=exe, state=state, cache=cache)
        return logits[:, -1], aux["cache"]

    return step, cache, jnp.full((src.shape[0],), bos_id, jnp.int32)


def _lm_start(params, prompt, cfg, exe, state, max_new_tokens):
    """Prefill all but the last prompt token in one call; the loop's first step feeds the last.

    The cache holds the P + max_new_tokens - 1 positions that are ever fed back
    (the final token is emitted, never embedded).
    """
    exe = exe or ExecConfig()
    check_state(cfg, state)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer token ids [B, P] with P >= 1, got shape "
                         f"{tuple(prompt.shape)} dtype {prompt.dtype}")
    B, P = prompt.shape
    _check_length(cfg, "max_new_tokens", max_new_tokens, P + max_new_tokens - 1)
    cache = init_lm_cache(params, cfg, B, P + max_new_tokens - 1, exe.compute_dtype)
    params = unstack_layers(params)  # once, not at every token (see blocks.stack)
    if P > 1:
        cache = lm_apply(params, prompt[:, :-1], cfg=cfg, exe=exe, state=state, cache=cache)[1]["cache"]

    def step(tokens, cache):
        logits, aux = lm_apply(params, tokens, cfg=cfg, exe=exe, state=state, cache=cache)
        return logits[:, -1], aux["cache"]

    return step, cache, prompt[:, -1].astype(jnp.int32)


# ---------------------------------------------------------------- token choice


def next_token(logits: Array, key: Array | None, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> Array:
    """Choose next tokens [B] from logits [B, V]: argmax if ``key`` is None or temperature is 0,
    else sample ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    and then to the nucleus: the smallest most-likely set whose probability reaches ``top_p``.
    """
    logits = logits.astype(jnp.float32)
    if key is None or temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, -1) - probs  # of the strictly more likely tokens
        # The most likely token always stays (mass_before = 0 < top_p).
        cut = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------- loops


def _sample_loop(step, cache, first, *, num_steps, eos_id, fill, choose, key):
    """Greedy / sampling: ``num_steps`` tokens [B] per row, stopping when all rows emitted EOS."""
    B = first.shape[0]

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < num_steps) & ~jnp.all(done)

    def body(carry):
        t, last, out, done, cache = carry
        logits, cache = step(last[:, None], cache)
        token = choose(logits, None if key is None else jax.random.fold_in(key, t))
        token = jnp.where(jnp.isnan(logits).any(-1), _BAD_TOKEN, token)  # fed back, it stays NaN
        token = jnp.where(done, fill, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], t, 1)
        if eos_id is not None:
            done = done | (token == eos_id)
        return t + 1, token, out, done, cache

    init = (jnp.zeros((), jnp.int32), first, jnp.full((B, num_steps), fill, jnp.int32),
            jnp.zeros((B,), bool), cache)
    return jax.lax.while_loop(cond, body, init)[2]


def _beam_loop(step, cache, first, *, num_steps, beam_size, alpha, eos_id, fill):
    """Beam search over k = beam_size slots per row (the model runs on B·k rows).

    A slot holds an alive or a finished hypothesis. Each step, the candidates of a
    row are every alive slot extended by every token (score = log P / lp at the new
    length) and every finished slot as it is (its final score); the k best fill the
    slots, and the caches follow their source slots. A row stops once its best
    finished score beats what any alive slot could still reach,
    log P / lp(|Y|) for some |Y| <= num_steps (log P only falls as Y grows).

    Returns tokens [B, num_steps] and scores [B] of each row's best hypothesis.
    """
    B, k = first.shape[0], beam_size
    lp = partial(length_penalty, alpha=alpha)
    slots = jnp.arange(B)[:, None] * k

    def row_done(c):
        best_finished = jnp.max(jnp.where(c["finished"], c["score"], -jnp.inf), 1)
        reachable = jnp.maximum(c["logp"] / lp(c["t"]), c["logp"] / lp(num_steps))
        return best_finished >= jnp.max(jnp.where(c["finished"], -jnp.inf, reachable), 1)

    def body(c):
        t = c["t"]
        logits, cache = step(c["last"][:, None], c["cache"])
        V = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(B, k, V)
        grown = jnp.where(c["finished"][..., None], -jnp.inf, c["logp"][..., None] + log_probs)
        grown = grown.reshape(B, k * V)
        kept = jnp.where(c["finished"], c["score"], -jnp.inf)
        score, pick = jax.lax.top_k(jnp.concatenate([grown / lp(t + 1), kept], 1), k)
        is_kept = pick >= k * V
        source = jnp.where(is_kept, pick - k * V, pick // V)
        token = jnp.where(is_kept, fill, pick % V).astype(jnp.int32)
        logp = jnp.where(is_kept, jnp.take_along_axis(c["logp"], source, 1),
                         jnp.take_along_axis(grown, jnp.minimum(pick, k * V - 1), 1))
        tokens = jnp.take_along_axis(c["tokens"], source[..., None], 1)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[..., None], t, 2)
        finished = is_kept if eos_id is None else is_kept | (token == eos_id)
        bad = c["bad"] | jnp.isnan(logits).any(-1).reshape(B, k).any(1)
        return {"t": t + 1, "last": token.reshape(-1), "tokens": tokens, "logp": logp, "score": score,
                "finished": finished, "cache": reorder_cache(cache, (slots + source).reshape(-1)),
                "bad": bad}

    # Slot 0 starts the search; the copies in slots 1..k-1 start at log P = -inf so
    # that the first step does not pick the same hypothesis k times.
    init = {"t": jnp.zeros((), jnp.int32), "last": jnp.repeat(first, k),
            "tokens": jnp.full((B, k, num_steps), fill, jnp.int32),
            "logp": jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1)),
            "score": jnp.full((B, k), -jnp.inf), "finished": jnp.zeros((B, k), bool),
            "cache": reorder_cache(cache, jnp.repeat(jnp.arange(B), k)), "bad": jnp.zeros((B,), bool)}
    c = jax.lax.while_loop(lambda c: (c["t"] < num_steps) & ~jnp.all(row_done(c)), body, init)
    best = jnp.argmax(c["score"], 1)
    tokens = jnp.take_along_axis(c["tokens"], best[:, None, None], 1)[:, 0]
    score = jnp.take_along_axis(c["score"], best[:, None], 1)[:, 0]
    # A row that met NaN logits has no meaningful hypothesis: say so in both outputs.
    return jnp.where(c["bad"][:, None], _BAD_TOKEN, tokens), jnp.where(c["bad"], jnp.nan, score)


# ------------------------------------------------------------------- seq2seq


@_jit_checked("cfg", "exe", "bos_id", "eos_id", "max_len")
def greedy_decode_seq2seq(params: dict, src: Array, *, cfg: TransformerConfig, bos_id: int,
                          eos_id: int | None, max_len: int, state: dict | None = None,
                          exe: ExecConfig | None = None) -> Array:
    """Greedy encoder-decoder decoding: source ids [B, S] -> output ids [B, max_len].

    ``y_t = argmax P(y | y_<t, x)``, one cached decoder step per token.
    ``eos_id=None`` never stops early. ``state`` is the BatchNorm running statistics,
    if the model has any; ``exe`` how the model runs (every decoder takes both).
    """
    step, cache, first = _seq2seq_start(params, src, cfg, exe, state, bos_id, max_len)
    return _sample_loop(step, cache, first, num_steps=max_len, eos_id=eos_id, fill=_fill(cfg, eos_id),
                        choose=next_token, key=None)


@_jit_checked("cfg", "exe", "bos_id", "eos_id", "max_len", "temperature", "top_k", "top_p")
def sample_seq2seq(params: dict, src: Array, key: Array | None, *, cfg: TransformerConfig, bos_id: int,
                   eos_id: int | None, max_len: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, state: dict | None = None,
                   exe: ExecConfig | None = None) -> Array:
    """Ancestral sampling: source ids [B, S] -> output ids [B, max_len].

    Token t is drawn from ``softmax(logits / temperature)`` restricted to the
    ``top_k`` most likely tokens, then to the ``top_p`` nucleus (``next_token``),
    with PRNG key ``fold_in(key, t)``. temperature 0 or key None is greedy.
    """
    _check_search(temperature=temperature, top_k=top_k, top_p=top_p)
    step, cache, first = _seq2seq_start(params, src, cfg, exe, state, bos_id, max_len)
    choose = partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample_loop(step, cache, first, num_steps=max_len, eos_id=eos_id, fill=_fill(cfg, eos_id),
                        choose=choose, key=key)


@_jit_checked("cfg", "exe", "bos_id", "eos_id", "max_len", "beam_size", "alpha")
def beam_search_seq2seq(params: dict, src: Array, *, cfg: TransformerConfig, bos_id: int, eos_id: int | None,
                        max_len: int, beam_size: int = 4, alpha: float = 0.6,
                        state: dict | None = None,
                        exe: ExecConfig | None = None) -> tuple[Array, Array]:
    """Beam search (GNMT length penalty, defaults k = 4, α = 0.6 as in Wu et al., 2016).

    Source ids [B, S] -> best output ids [B, max_len] and their scores
    ``log P(Y | X) / lp(Y)`` [B]. The model runs on B·k rows; hypotheses that
    emit EOS are kept (and compete) while the other beams continue.
    """
    _check_search(beam_size=beam_size)
    step, cache, first = _seq2seq_start(params, src, cfg, exe, state, bos_id, max_len)
    return _beam_loop(step, cache, first, num_steps=max_len, beam_size=beam_size, alpha=alpha,
                      eos_id=eos_id, fill=_fill(cfg, eos_id))


# --------------------------------------------------------------- decoder-only LM


@_jit_checked("cfg", "exe", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
def generate_lm(params: dict, prompt: Array, *, cfg: TransformerConfig, max_new_tokens: int,
                key: Array | None = None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, eos_id: int | None = None,
                state: dict | None = None,
                exe: ExecConfig | None = None) -> Array:
    """Continue prompts [B, P] by ``max_new_tokens`` tokens -> [B, P + max_new_tokens].

    Greedy when ``key`` is None (or temperature is 0), else sampling as in
    ``sample_seq2seq``. All prompts share the length P; pad tokens inside a
    prompt are masked as keys (as in ``lm_apply``) but still occupy positions.
    Without ``eos_id`` every row gets exactly ``max_new_tokens`` tokens.
    """
    _check_search(temperature=temperature, top_k=top_k, top_p=top_p)
    step, cache, first = _lm_start(params, prompt, cfg, exe, state, max_new_tokens)
    choose = partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    new = _sample_loop(step, cache, first, num_steps=max_new_tokens, eos_id=eos_id,
                       fill=_fill(cfg, eos_id), choose=choose, key=key)
    return jnp.concatenate([prompt.astype(jnp.int32), new], 1)


@_jit_checked("cfg", "exe", "max_new_tokens", "beam_size", "alpha", "eos_id")
def beam_search_lm(params: dict, prompt: Array, *, cfg: TransformerConfig, max_new_tokens: int,
                   beam_size: int = 4, alpha: float = 0.6, eos_id: int | None = None,
                   state: dict | None = None,
                   exe: ExecConfig | None = None) -> tuple[Array, Array]:
    """Beam search continuation of prompts [B, P] -> [B, P + max_new_tokens] and scores [B].

    The score is ``log P(continuation | prompt) / lp(continuation)``; see
    ``beam_search_seq2seq``. The prompt is prefilled once, then its cache is
    copied to the k beams.
    """
    _check_search(beam_size=beam_size)
    step, cache, first = _lm_start(params, prompt, cfg, exe, state, max_new_tokens)
    new, scores = _beam_loop(step, cache, first, num_steps=max_new_tokens, beam_size=beam_size,
                             alpha=alpha, eos_id=eos_id, fill=_fill(cfg, eos_id))
    return jnp.concatenate([prompt.astype(jnp.int32), new], 1), scores
