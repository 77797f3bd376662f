"""Per-device memory of a ~1B-parameter LM train step, compiled ahead of time for 8 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.memory

Nothing runs and nothing is allocated: the train step is lowered with abstract
(shape, dtype, sharding) inputs and compiled, and ``memory_analysis()`` reports
what XLA planned per device. Prints a markdown table (DP vs FSDP vs TP vs FSDP x TP).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

import jformer
from jformer import parallel, training

# GPT-style LM of ~0.94B parameters: 16 layers of width 2048 (16 heads, F 8192), V 32000, untied head.
BILLION = jformer.TransformerConfig(vocab_size=32000, d_model=2048, num_heads=16, num_layers=16, d_ff=8192,
                                    activation="gelu", norm_position="pre", positions="learned", max_len=512,
                                    dropout_rate=0.0, use_bias=False, pad_id=None)
REMAT = jformer.ExecConfig(remat=True)
MESHES = ("data=8", "fsdp=8", "model=8", "fsdp=4,model=2")
GIB = 2.0 ** 30


def compile_step(cfg: jformer.TransformerConfig, mesh, batch_size: int, seq_len: int):
    """AOT-compiled sharded train step of ``cfg`` on ``mesh`` (AdamW), and the abstract state."""
    tx, lr = training.make_optimizer("adamw", learning_rate=1e-4, warmup_steps=10, total_steps=100,
                                     weight_decay=0.1, clip_norm=1.0)

    def create():
        params = jformer.init_lm(jax.random.key(0), cfg)
        return training.TrainState.create(params, tx, jax.random.key(1))

    abstract = jax.eval_shape(create)
    shardings = parallel.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=parallel.batch_sharding(mesh))
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, exe=REMAT)
    step = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings, learning_rate=lr)
    return step.lower(state, {"inputs": tokens, "targets": tokens}).compile(), state, shardings


def memory_table(cfg: jformer.TransformerConfig = BILLION, meshes=MESHES, batch_size: int = 8,
                 seq_len: int = 512) -> list[dict]:
    """One row per mesh: per-device GiB of params, optimizer state, and XLA's plan."""
    rows = []
    for spec in meshes:
        mesh = parallel.make_mesh(spec)
        t0 = time.perf_counter()
        compiled, state, shardings = compile_step(cfg, mesh, batch_size, seq_len)
        mem = parallel.memory_per_device(compiled)
        rows.append({
            "mesh": parallel.describe(mesh),
            "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
            "params_gib": parallel.sharded_bytes(state.params, shardings.params) / GIB,
            "opt_state_gib": parallel.sharded_bytes(state.opt_state, shardings.opt_state) / GIB,
            "arguments_gib": mem["argument"] / GIB,
            "temp_gib": mem["temp"] / GIB,
            "total_gib": mem["total"] / GIB,
            "compile_seconds": time.perf_counter() - t0,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| mesh | params / device (GiB) | Adam state / device (GiB) | XLA arguments (GiB) "
             "| XLA temporaries (GiB) | XLA total (GiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mesh']} | {r['params_gib']:.2f} | {r['opt_state_gib']:.2f} | {r['arguments_gib']:.2f} "
                     f"| {r['temp_gib']:.2f} | {r['total_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    rows = memory_table(batch_size=args.batch_size, seq_len=args.seq_len)
    print(f"{rows[0]['parameters'] / 1e9:.2f}B parameters, batch {args.batch_size} x {args.seq_len}, "
          f"AdamW, fp32, {jax.device_count()} devices\n")
    print(markdown(rows))
    for r in rows:
        print(f"{r['mesh']}: compiled in {r['compile_seconds']:.1f} s")


if __name__ == "__main__":
    main()
