"""This machine's float32 matrix-multiply peak, the denominator of MFU.

    python -m benchmarks.peak

Times square float32 matmuls (n = 2048, 4096) with JAX (``jax.jit``) and PyTorch
(all cores) and prints one JSON line: the best rate of each library and ``peak_gflops``,
the higher of the two — the rate dense matmuls actually reach here, not a datasheet number.
"""

from __future__ import annotations

import json
import os
import time


def best_rate(fn, n: int, repeats: int = 10) -> float:
    """Best GFLOP/s of ``fn()`` (one n×n×n matmul that blocks) over ``repeats`` runs."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    out = {"jax_gflops": 0.0, "torch_gflops": 0.0}
    for n in (2048, 4096):
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        ja, ta = jnp.asarray(a), torch.from_numpy(a)
        mm = jax.jit(jnp.matmul)
        out["jax_gflops"] = max(out["jax_gflops"], best_rate(lambda: mm(ja, ja).block_until_ready(), n))
        out["torch_gflops"] = max(out["torch_gflops"], best_rate(lambda: torch.mm(ta, ta), n))
    out["peak_gflops"] = max(out["jax_gflops"], out["torch_gflops"])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
