"""Measure one peer on one workload, in this process; prints one JSON line.

    python -m benchmarks.run --peer jformer --workload lm-small [--steps 20]

``benchmarks.suite`` runs this once per (peer, workload, round) in a fresh
process, so no library's threads, caches or allocator state leak into another's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import traceback

from benchmarks.harness import PEERS, median_time, minor_faults, peak_rss_mb, rss_mb, timed
from benchmarks.workloads import WORKLOADS, make_batch


def measure(peer: str, workload: str, steps: int, warmup: int) -> dict:
    w = WORKLOADS[workload]
    module, variant = PEERS[peer]
    mod = importlib.import_module(f"benchmarks.peers.{module}")
    base_mb = rss_mb()
    bench = mod.build(w, make_batch(w), variant)
    if bench.num_params != w.num_params:
        raise AssertionError(f"{peer} built {bench.num_params:,} parameters, the {workload} architecture "
                             f"has {w.num_params:,}")
    out = {"peer": peer, "workload": workload, "params": bench.num_params}
    if w.kind in ("lm", "s2s", "long"):
        out["compile_s"], loss = timed(bench.train_step)  # first step: tracing + compilation + run
        out["loss_first"] = float(loss)
        repeats = steps if w.kind != "long" else max(3, steps // 5)
        for _ in range(warmup):
            bench.train_step()
        faults = minor_faults()
        times = [timed(bench.train_step)[0] for _ in range(repeats)]
        # Pages the kernel had to map (and zero) during the timed steps: high when the
        # allocator hands freed buffers back to the OS and takes fresh ones every step.
        out["page_faults_per_step"] = (minor_faults() - faults) / repeats
        out["step_s"] = statistics.median(times)
        out["step_times"] = times
        out["loss_last"] = float(bench.train_step())
        out["forward_s"] = median_time(bench.forward, max(3, repeats // 2))[0]
        if w.kind != "long":
            out["tokens_per_s"] = w.tokens_per_step / out["step_s"]
            out["train_flops"] = w.train_flops()
    else:  # decode
        import numpy as np
        tokens = {}
        for name in ("cached", "full"):
            fn = getattr(bench, f"generate_{name}")
            if fn is None:
                continue
            out[f"{name}_compile_s"], _ = timed(fn)
            out[f"{name}_s"], tokens[name] = median_time(fn, 3)
            out[f"{name}_tokens_per_s"] = w.batch * w.new_tokens / out[f"{name}_s"]
        if len(tokens) == 2:
            out["cached_equals_full"] = float(np.mean(np.asarray(tokens["cached"]) == np.asarray(tokens["full"])))
    out["peak_mb"] = peak_rss_mb() - base_mb
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, choices=sorted(PEERS))
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=20, help="timed train steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="address-space cap: a run that needs more fails instead of swapping the machine")
    args = ap.parse_args(argv)
    if args.memory_limit_gb:
        import resource
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(args.peer, args.workload, args.steps, args.warmup)
    except Exception as e:  # reported as a row of the table, not a crash of the suite
        traceback.print_exc()
        result = {"peer": args.peer, "workload": args.workload, "error": f"{type(e).__name__}: {e}"[:300]}
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
