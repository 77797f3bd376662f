"""Quickstart: train a small encoder-decoder Transformer to reverse sequences, on CPU.

Source: random symbols, length ``--min-len``..``--max-len``, right-padded.
Target: the reversed source followed by EOS; the decoder is teacher-forced with
the BOS-shifted target. Held-out sequences (a separate RNG stream) are decoded
greedily and scored by token accuracy (padding excluded, EOS included) and
exact-sequence accuracy. Exits with status 1 if the token accuracy is below
``--min-accuracy``.

    python -m experiments.quickstart                # default run (~1-2 min on 2 CPU cores)
    python -m experiments.quickstart --steps 400    # the CI setting (~25 s)

Shape legend: B batch, S source length, T target length (S + 1), V vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jformer
from jformer.data import BOS, EOS, NUM_SPECIAL, PAD, synthetic_pairs, synthetic_vocab_size
from jformer.decoding import greedy_decode_seq2seq
from jformer.training import cross_entropy

TASK = "reverse"  # jformer.data's generated task; its symbols are ids NUM_SPECIAL .. vocab_size - 1


def make_batch(rng: np.random.Generator, batch_size: int, min_len: int, max_len: int,
               num_symbols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random reversal examples: src [B, S], tgt_in [B, T], tgt_out [B, T] with S = max_len, T = S + 1.

    The pairs come from ``jformer.data.synthetic_pairs("reverse", ...)``, seeded from ``rng``;
    tgt_out = reversed(src) + EOS, then PAD; tgt_in = BOS + reversed(src), then PAD.
    """
    pairs = synthetic_pairs(TASK, batch_size, seed=int(rng.integers(2**63)), min_len=min_len,
                            max_len=max_len, num_symbols=num_symbols)
    src = np.full((batch_size, max_len), PAD, np.int32)
    tgt_in = np.full((batch_size, max_len + 1), PAD, np.int32)
    tgt_out = np.full((batch_size, max_len + 1), PAD, np.int32)
    for b, (s, t) in enumerate(pairs):
        src[b, :len(s)] = s
        tgt_in[b, :len(t) + 1] = [BOS, *t]
        tgt_out[b, :len(t) + 1] = [*t, EOS]
    return src, tgt_in, tgt_out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.99,
                   help="exit with status 1 if held-out greedy token accuracy is below this")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder depth")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--num-symbols", type=int, default=16)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--eval-size", type=int, default=1000, help="held-out sequences")
    p.add_argument("--examples", type=int, default=4, help="decoded examples to print")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = jformer.TransformerConfig(
        vocab_size=synthetic_vocab_size(TASK, args.num_symbols), d_model=args.d_model, num_heads=args.heads,
        num_layers=args.layers, d_ff=4 * args.d_model, dropout_rate=0.0, norm_position="pre",
        max_len=args.max_len + 1, pad_id=PAD)
    # Init runs once: compile it for speed of compilation, not of execution.
    init = jax.jit(jformer.init_seq2seq, static_argnums=1,
                   compiler_options={"xla_backend_optimization_level": 0})
    params = init(jax.random.key(args.seed), cfg)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"encoder-decoder Transformer: {n_params:,} parameters, d_model={cfg.d_model}, "
          f"layers={cfg.num_layers}, heads={cfg.num_heads}, vocab={cfg.vocab_size}")

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=min(args.warmup, args.steps // 2), decay_steps=args.steps,
        end_value=args.lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = jax.jit(tx.init)(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, src, tgt_in, tgt_out):
        def loss_fn(p):
            logits, _ = jformer.seq2seq_apply(p, src, tgt_in, cfg=cfg)
            loss, _ = cross_entropy(logits, tgt_out, weights=tgt_out != PAD,
                                    label_smoothing=args.label_smoothing)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = partial(make_batch, min_len=args.min_len, max_len=args.max_len, num_symbols=args.num_symbols)
    train_rng = np.random.default_rng([args.seed, 0])
    with tqdm(range(args.steps), desc="train", mininterval=1.0) as bar:
        for step in bar:
            params, opt_state, loss = train_step(params, opt_state, *batch(train_rng, args.batch_size))
            if step % 50 == 0 or step == args.steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    print(f"final training loss {float(loss):.4f}")

    # Held-out evaluation: a distinct RNG stream, greedy decoding.
    src, _, tgt_out = batch(np.random.default_rng([args.seed, 1]), args.eval_size)
    pred = np.asarray(greedy_decode_seq2seq(params, jnp.asarray(src), cfg=cfg, bos_id=BOS,
                                            eos_id=EOS, max_len=tgt_out.shape[1]))
    weights = tgt_out != PAD
    hit = pred == tgt_out
    token_acc = float((hit & weights).sum() / weights.sum())
    exact_acc = float((hit | ~weights).all(axis=1).mean())

    def show(ids):
        return " ".join({BOS: "<s>", EOS: "</s>"}.get(int(i), str(int(i) - NUM_SPECIAL))
                        for i in ids if i != PAD)

    for i in range(min(args.examples, len(src))):
        print(f"  {show(src[i])}  ->  {show(pred[i])}   (target: {show(tgt_out[i])})")
    print(f"held-out greedy token accuracy {token_acc:.4f}, exact-sequence accuracy {exact_acc:.4f} "
          f"({len(src)} sequences)")
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if token_acc < args.min_accuracy:
        print(f"FAILED: token accuracy {token_acc:.4f} < --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
