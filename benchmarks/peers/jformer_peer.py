"""jformer on the benchmark workloads: its public API, used as the README shows.

Config switches that express the workload's architecture (learned positions, no
√D scaling, untied head, Pre-/Post-LN); everything else is jformer's default path.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jformer as jf
from benchmarks.harness import Bench
from benchmarks.workloads import Workload
from jformer import training
from jformer.decoding import generate_lm


def config(w: Workload) -> jf.TransformerConfig:
    """The workload's architecture as a ``TransformerConfig``."""
    s2s = w.kind == "s2s"
    return jf.TransformerConfig(
        vocab_size=w.vocab, d_model=w.d_model, num_heads=w.heads, num_layers=w.layers,
        num_decoder_layers=w.decoder_layers or None, d_ff=w.d_ff, activation=w.activation,
        dropout_rate=0.0, norm_position=w.norm_position, final_norm=True, positions="learned",
        max_len=w.length, scale_embeddings=False, tie_embeddings=False,
        pad_id=0 if s2s else None)  # the LM batches have no padding: no key-padding mask to build


def execution(w: Workload, variant: str | None = None) -> jf.ExecConfig:
    """How jformer runs the workload: blockwise attention for training, defaults otherwise;
    ``variant="plain-dense"`` turns the CPU dense fast path off."""
    return jf.ExecConfig(attention_impl=None if w.kind == "decode" else "blockwise",
                         fast_dense=False if variant == "plain-dense" else None)


def _count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_by_full_forward(params, prompt, *, cfg, max_new_tokens):
    """prompt [B, 1] -> [B, 1 + max_new_tokens], running ``lm_apply`` on the whole buffer per token.

    The buffer's first ``max_new_tokens`` positions are fed at every step and the
    logits read at the current one (causality makes the later positions irrelevant).
    """
    buf = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32)], 1)

    def step(t, buf):
        logits = jf.lm_apply(params, buf[:, :-1], cfg=cfg)[0][:, t]
        return buf.at[:, t + 1].set(jnp.argmax(logits, -1).astype(jnp.int32))

    return jax.lax.fori_loop(0, max_new_tokens, step, buf)


def _long(w: Workload, batch, variant) -> Bench:
    """One causal self-attention layer; ``variant="reference"`` materialises the [N, T, T] weights."""
    impl = None if variant == "reference" else "blockwise"
    params = jf.init_multi_head_attention(jax.random.key(0), w.d_model, w.heads)
    x = jnp.asarray(batch["x"])

    def total(params, x):
        return jf.multi_head_attention(params, x, is_causal=True, implementation=impl)[0].sum()

    fwd = jax.jit(total)
    grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    return Bench(num_params=_count(params),
                 train_step=lambda: float(jax.block_until_ready(grad(params, x))[0]),
                 forward=lambda: float(fwd(params, x)))


def build(w: Workload, batch: dict[str, np.ndarray], variant: str | None) -> Bench:
    if w.kind == "long":
        return _long(w, batch, variant)
    cfg, exe = config(w), execution(w, variant)
    if w.kind == "decode":
        params = jf.init_lm(jax.random.key(0), cfg)
        prompt = jnp.asarray(batch["prompt"])
        run = partial(jax.jit, static_argnames=("cfg", "exe", "max_new_tokens"))(generate_lm)
        return Bench(
            num_params=_count(params),
            generate_cached=lambda: np.asarray(run(params, prompt, cfg=cfg, exe=exe,
                                                   max_new_tokens=w.new_tokens))[:, 1:],
            generate_full=lambda: np.asarray(greedy_by_full_forward(params, prompt, cfg=cfg,
                                                                     max_new_tokens=w.new_tokens))[:, 1:])
    init, loss = (jf.init_lm, training.lm_loss) if w.kind == "lm" else (jf.init_seq2seq, training.seq2seq_loss)
    params = init(jax.random.key(0), cfg)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    loss_fn = partial(loss, cfg=cfg, exe=exe)
    train_step = training.make_train_step(loss_fn, tx)
    eval_step = training.make_eval_step(loss_fn)
    data = {k: jnp.asarray(v) for k, v in batch.items()}
    state = training.TrainState.create(params, tx, jax.random.key(1))

    def step():
        nonlocal state
        state, metrics = train_step(state, data)
        jax.block_until_ready(state)
        return float(metrics["loss"])

    def forward():
        sums = eval_step(state, data)
        return float(sums["loss_sum"] / sums["weight"])

    return Bench(num_params=_count(params), train_step=step, forward=forward)
