"""A train step's matrix multiplies, XLA:CPU against PyTorch, on the same shapes.

    python -m benchmarks.dots [--workload lm-small] [--repeats 20]

For one layer of a workload it times every matmul the train step runs — per weight
(QKV, attention output, feed-forward in and out) the forward ``y = x W``, the input
gradient ``dx = dy Wᵀ`` and the weight gradient ``dW = xᵀ dy``, and the attention
core's batched ``q kᵀ`` and ``p v`` — as one jitted ``jnp.einsum`` (the dot XLA
runs inside a step) against ``torch.einsum`` (oneDNN/MKL, all cores) on identical
float32 operands. It prints a markdown table of GFLOP/s and the JAX/PyTorch time
ratio; each row also records how far the two products differ.

This is the profile evidence behind the suite's train-step ratios: the JAX libraries
run these same dots, so their speed on CPU is bounded by how fast XLA runs them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.harness import median_time
from benchmarks.workloads import WORKLOADS, Workload


def cases(w: Workload) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """(name, einsum spec, lhs shape, rhs shape) of one layer's matmuls in a train step."""
    M, D, F = w.batch * w.length, w.d_model, w.d_ff
    BN, T, H = w.batch * w.heads, w.length, w.d_model // w.heads
    out = []
    for name, n_in, n_out in (("qkv", D, 3 * D), ("attn out", D, D), ("ffn in", D, F), ("ffn out", F, D)):
        out += [(f"{name} forward  x W", "mi,io->mo", (M, n_in), (n_in, n_out)),
                (f"{name} input grad  dy Wᵀ", "mo,io->mi", (M, n_out), (n_in, n_out)),
                (f"{name} weight grad  xᵀ dy", "mi,mo->io", (M, n_in), (M, n_out))]
    out += [("attention  q kᵀ", "bth,bsh->bts", (BN, T, H), (BN, T, H)),
            ("attention  p v", "bts,bsh->bth", (BN, T, T), (BN, T, H))]
    return out


def flops(spec: str, a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """2 × the product of every distinct index's size (each multiply-add once)."""
    sizes = dict(zip(spec.split("->")[0].replace(",", ""), (*a, *b)))
    return 2.0 * float(np.prod(list(sizes.values())))


def measure(w: Workload, repeats: int) -> list[dict]:
    """One row per matmul: seconds and GFLOP/s in JAX and PyTorch, and their largest difference."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    rows = []
    for name, spec, sa, sb in cases(w):
        a, b = rng.standard_normal(sa, dtype=np.float32), rng.standard_normal(sb, dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        fn = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
        t_jax, y_jax = median_time(lambda: fn(ja, jb).block_until_ready(), repeats)
        with torch.no_grad():
            t_torch, y_torch = median_time(lambda: torch.einsum(spec, ta, tb), repeats)
        f = flops(spec, sa, sb)
        rows.append({"matmul": name, "shapes": f"{sa} · {sb}", "jax_s": t_jax, "torch_s": t_torch,
                     "jax_gflops": f / t_jax / 1e9, "torch_gflops": f / t_torch / 1e9,
                     "max_abs_diff": float(np.abs(np.asarray(y_jax) - y_torch.numpy()).max())})
    return rows


def markdown(rows: list[dict], w: Workload) -> str:
    total = {k: sum(r[k] for r in rows) for k in ("jax_s", "torch_s")}
    lines = [f"One {w.name} layer's train-step matmuls, float32, median of runs "
             f"({os.cpu_count()} cores). Ratio = JAX time / PyTorch time.", "",
             "| matmul | shapes | JAX GFLOP/s | PyTorch GFLOP/s | ratio |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['matmul']} | {r['shapes']} | {r['jax_gflops']:.0f} | {r['torch_gflops']:.0f} | "
              f"{r['jax_s'] / r['torch_s']:.2f} |" for r in rows]
    lines.append(f"| **all, one layer** | | {total['jax_s'] * 1e3:.1f} ms | {total['torch_s'] * 1e3:.1f} ms | "
                 f"**{total['jax_s'] / total['torch_s']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="lm-small", choices=[k for k, v in WORKLOADS.items() if v.kind == "lm"])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    w = WORKLOADS[args.workload]
    print(markdown(measure(w, args.repeats), w), end="")


if __name__ == "__main__":
    main()
