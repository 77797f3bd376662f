"""Greedy LM decoding with the key/value cache vs re-running the full forward pass per token.

    python -m benchmarks.decoding [--batch 8 --tokens 256 --width 256 --heads 8 --layers 4 --vocab 256]

Both are one jitted loop producing the same tokens (checked): ``generate_lm``
feeds one token per step through the cache; the baseline runs ``lm_apply`` on
the whole fixed-length buffer [B, 1 + tokens] at every step and reads the logits
at the current position (causality makes the not-yet-decoded positions
irrelevant). Times are medians of repeated runs after compilation.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jformer as jf
from benchmarks.attention import median_time
from jformer.decoding import generate_lm


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_by_full_forward(params, prompt, *, cfg, max_new_tokens):
    """prompt [B, 1] -> [B, 1 + max_new_tokens]; a full lm_apply per generated token."""
    buf = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32)], 1)

    def step(t, buf):
        logits = jf.lm_apply(params, buf, cfg=cfg)[:, t]
        return buf.at[:, t + 1].set(jnp.argmax(logits, -1).astype(jnp.int32))

    return jax.lax.fori_loop(0, max_new_tokens, step, buf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    # pad_id=None: a random model may emit token 0, which must not be masked as padding.
    cfg = jf.TransformerConfig(vocab_size=args.vocab, d_model=args.width, num_heads=args.heads,
                               num_layers=args.layers, d_ff=4 * args.width, dropout_rate=0.0,
                               max_len=args.tokens + 1, pad_id=None)
    params = jf.init_lm(jax.random.key(0), cfg)
    prompt = jax.random.randint(jax.random.key(1), (args.batch, 1), 0, args.vocab, jnp.int32)

    cached_s, cached = median_time(lambda: generate_lm(params, prompt, cfg=cfg, max_new_tokens=args.tokens),
                                   args.repeats)
    full_s, full = median_time(lambda: greedy_by_full_forward(params, prompt, cfg=cfg,
                                                              max_new_tokens=args.tokens), args.repeats)
    same = np.mean(np.asarray(cached) == np.asarray(full))
    print(f"device {jax.devices()[0].device_kind}; batch {args.batch}, {args.tokens} tokens, d_model "
          f"{args.width}, {args.heads} heads, {args.layers} layers, vocab {args.vocab}")
    print("| decoding | time (s) | tokens/s | speedup |\n| --- | --- | --- | --- |")
    for name, s in (("full forward per token", full_s), ("KV cache", cached_s)):
        print(f"| {name} | {s:.3f} | {args.batch * args.tokens / s:,.0f} | {full_s / s:.1f}x |")
    print(f"identical tokens: {same:.1%}")


if __name__ == "__main__":
    main()
