"""What a peer provides (``Bench``), the peer registry, and the timing primitives.

A peer module ``benchmarks/peers/<module>.py`` defines
``build(workload, batch, variant) -> Bench``: it builds the workload's network
(see ``benchmarks.workloads``) in its library, on the numpy ``batch`` from
``make_batch``, and returns closures that each run to completion (block) before
returning. ``benchmarks.run`` times them in a process of their own.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable

# peer name -> (module in benchmarks.peers, variant passed to its build)
PEERS = {
    "jformer": ("jformer_peer", None),
    "flax-nnx": ("flax_nnx", None),
    "flax-linen": ("flax_linen", None),
    "equinox": ("equinox_peer", None),
    "torch-eager": ("torch_peer", "eager"),
    "torch-compile": ("torch_peer", "compile"),
    # long: jformer's materialising reference attention (the memory-efficient path is "jformer")
    "jformer-reference": ("jformer_peer", "reference"),
    # lm / s2s: jformer with ExecConfig(fast_dense=False), i.e. plain x @ W + b autodiff,
    # to measure the CPU dense fast path that is on by default on the CPU
    "jformer-plain-dense": ("jformer_peer", "plain-dense"),
}

# Which peers run which workload kind.
KIND_PEERS = {
    "lm": ["jformer", "jformer-plain-dense", "flax-nnx", "flax-linen", "equinox", "torch-eager", "torch-compile"],
    "s2s": ["jformer", "jformer-plain-dense", "flax-nnx", "flax-linen", "equinox", "torch-eager",
            "torch-compile"],
    "decode": ["jformer", "flax-linen", "torch-eager"],
    "long": ["jformer", "jformer-reference", "torch-eager"],
}


@dataclasses.dataclass
class Bench:
    """Closures over one built model; every call blocks until its results are computed.

    * ``train_step() -> loss``: one AdamW step on the fixed batch (forward, backward,
      update). For ``long``: forward + backward of the attention layer (gradients of
      sum(output) w.r.t. input and parameters), returning sum(output).
    * ``forward() -> loss``: the forward pass only (loss, or sum(output) for ``long``).
    * decode: ``generate_cached()`` / ``generate_full()`` -> int tokens [B, new_tokens],
      greedy with a key/value cache / re-running the full forward per token (None if
      the library has no such path).
    """

    num_params: int
    train_step: Callable[[], float] | None = None
    forward: Callable[[], float] | None = None
    generate_cached: Callable[[], object] | None = None
    generate_full: Callable[[], object] | None = None


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up (compiling) call.

    ``fn`` must block until its work is done (e.g. ``jax.block_until_ready``).
    Returns (seconds, last output).
    """
    out = fn()
    times = []
    for _ in range(repeats):
        t, out = timed(fn)
        times.append(t)
    return statistics.median(times), out


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def minor_faults() -> int:
    """Minor page faults of this process so far (pages first touched after the kernel mapped them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
