"""Attention core, four ways: jformer's vmap over heads and blockwise path, a hand einsum, jax.nn.

    python -m benchmarks.attention [--batch 16 --length 256 --width 256 --heads 8]

Times the forward and forward+backward of the attention core (Q, K, V already
projected to [B, T, N, H]) under ``jax.jit``, medians of repeated runs, and
prints a markdown table with ratios to the vmap path.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.harness import median_time
from jformer.attention import attend
from tests.references import einsum_attention


PATHS = {
    "jformer vmap": lambda q, k, v: attend(q, k, v, is_causal=True)[0],
    "jformer blockwise": lambda q, k, v: attend(q, k, v, is_causal=True, implementation="blockwise")[0],
    "einsum": lambda q, k, v: einsum_attention(q, k, v, is_causal=True),
    "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    B, T, N = args.batch, args.length, args.heads
    H = args.width // N
    q, k, v = jax.random.normal(jax.random.key(0), (3, B, T, N, H), jnp.float32)

    rows = []
    for name, path in PATHS.items():
        fwd = jax.jit(path)
        bwd = jax.jit(jax.grad(lambda q, k, v, p=path: p(q, k, v).sum(), argnums=(0, 1, 2)))
        rows.append((name, median_time(lambda: fwd(q, k, v), args.repeats)[0],
                     median_time(lambda: bwd(q, k, v), args.repeats)[0]))
    base_f, base_b = rows[0][1], rows[0][2]
    print(f"attention core, B={B} T={T} N={N} H={H}, causal, float32, jit, {jax.devices()[0].platform}")
    print("| path | forward (ms) | fwd+bwd (ms) | forward / vmap | fwd+bwd / vmap |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, f, b in rows:
        print(f"| {name} | {f * 1e3:.1f} | {b * 1e3:.1f} | {f / base_f:.2f} | {b / base_b:.2f} |")


if __name__ == "__main__":
    main()
