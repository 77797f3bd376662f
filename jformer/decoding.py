"""Autoregressive decoding.

Shape legend: B batch, S source length, T target length (``max_len``), D width, V vocabulary.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jformer.models import TransformerConfig, seq2seq_decode, seq2seq_encode

Array = jax.Array


@partial(jax.jit, static_argnames=("cfg", "bos_id", "eos_id", "max_len"))
def greedy_decode_seq2seq(params: dict, src: Array, *, cfg: TransformerConfig, bos_id: int,
                          eos_id: int, max_len: int, state: dict | None = None) -> Array:
    """Greedy encoder-decoder decoding: source ids [B, S] -> output ids [B, max_len].

    The source is encoded once (memory [B, S, D]). Step t runs the decoder on the
    whole fixed-length input buffer ``[BOS, y_0, ..., y_{max_len-2}]`` [B, T]
    (not yet decoded positions hold padding; the causal mask hides them) and
    takes ``y_t = argmax logits[:, t]`` — no KV cache, so each step costs a
    full T-position decoder pass. An emitted EOS is kept; every later position
    is ``cfg.pad_id`` (or ``eos_id`` if the config has no pad id).

    Jitted, with ``cfg``, ``bos_id``, ``eos_id`` and ``max_len`` static. ``state``
    is the BatchNorm running statistics, if the model has any.
    """
    fill = eos_id if cfg.pad_id is None else cfg.pad_id
    memory, _, _ = seq2seq_encode(params, src, cfg=cfg, state=state)
    B = src.shape[0]
    bos = jnp.full((B, 1), bos_id, jnp.int32)

    def step(t, carry):
        out, done = carry  # [B, T] ids, [B] EOS already emitted
        tgt_in = jnp.concatenate([bos, out[:, :-1]], axis=1)
        logits, _, _ = seq2seq_decode(params, memory, src, tgt_in, cfg=cfg, state=state)
        next_id = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
        next_id = jnp.where(done, fill, next_id)
        out = jax.lax.dynamic_update_slice_in_dim(out, next_id[:, None], t, axis=1)
        return out, done | (next_id == eos_id)

    out = jnp.full((B, max_len), fill, jnp.int32)
    out, _ = jax.lax.fori_loop(0, max_len, step, (out, jnp.zeros((B,), bool)))
    return out
