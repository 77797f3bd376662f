"""Compile time of a jformer train step against depth: scanned vs unrolled layer stacks.

    python -m benchmarks.compile_depth [--layers 2 6 12 24]

The ``lm-small`` architecture with L layers; the jitted train step (AdamW) is
lowered and compiled ahead of time (nothing runs), for ``scan_layers=True`` (one
``lax.scan`` over stacked parameters) and ``False`` (a Python loop: XLA sees L
copies). Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import optax

import jformer as jf
from benchmarks.peers.jformer_peer import config, execution
from benchmarks.workloads import WORKLOADS, make_batch
from jformer import training


def compile_seconds(cfg: jf.TransformerConfig, exe: jf.ExecConfig, batch: dict) -> float:
    """Wall seconds to trace, lower and compile the train step for ``cfg`` (abstract inputs only)."""
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    state = jax.eval_shape(lambda: training.TrainState.create(jf.init_lm(jax.random.key(0), cfg), tx,
                                                              jax.random.key(1)))
    step = training.make_train_step(partial(training.lm_loss, cfg=cfg, exe=exe), tx)
    t0 = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 12, 24])
    args = ap.parse_args(argv)
    w = WORKLOADS["lm-small"]
    batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in make_batch(w).items()}
    for scan in (True, False):
        for layers in args.layers:
            cfg, exe = config(w).replace(num_layers=layers), execution(w).replace(scan_layers=scan)
            print(json.dumps({"kind": "compile-depth", "layers": layers, "scan_layers": scan,
                              "compile_s": compile_seconds(cfg, exe, batch)}), flush=True)


if __name__ == "__main__":
    main()
