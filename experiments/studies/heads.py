"""Study 1 — why several heads: N heads of width D/N against one head of the same total width.

Claim (Vaswani et al. 2017, Table 3(A), h·d_k fixed, newstest2013 dev BLEU: h=1 24.9, h=4 25.5,
h=8 25.8, h=16 25.8, h=32 25.4): several heads in parallel sub-spaces beat one head of the
same width, and too many tiny heads hurt again.

Arms: N in {1, 2, 4, 8, 16, 32} at width 128 (head width 128 ... 4), S seeds each (one
vmapped ensemble per N):

* (a) the Tiny Shakespeare character LM in nanoGPT's CPU configuration (4 layers, context 64,
  batch 12; ``--steps``, default 2000 as nanoGPT): validation loss per N, test loss once;
* (b) a synthetic task that needs two look-ups at one position ("two-key sum": after 8
  key/value pairs, two query keys; the target is the sum mod 10 of their values), decoder-only,
  accuracy of the answer token per N;
* (c) head pruning at test time (Michel et al. 2019, "Are Sixteen Heads Really Better than
  One?"): in the trained N = 8 Shakespeare model, each head alone is removed (its slice of the
  output projection zeroed) and the validation loss increase is measured.

Multi30k is not run here: one Multi30k model takes ~25 minutes on the 2 cores, so six arms x
three seeds would not fit the study's budget.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import jformer
from experiments.config import preset
from experiments.studies import common
from jformer import ensemble, training

NAME = "heads"
CLAIM = "several heads beat one head of the same total width; too many tiny heads hurt again"
HEADS = (1, 2, 4, 8, 16, 32)
PRUNE_HEADS = 8


# --------------------------------------------------------- (a) Shakespeare


def lm_arm(study: common.Study, heads: int, *, steps: int, quick: bool) -> dict:
    tok, train, val, test = common.shakespeare()
    base = preset("shakespeare").model
    if quick:
        base = base.replace(num_layers=1, d_model=32, d_ff=64)
    cfg = base.replace(vocab_size=tok.vocab_size, num_heads=heads)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False)
    seq_len, batch_size = cfg.max_len, 12
    evaluate = common.lm_evaluator(loss_fn, val, seq_len=seq_len, max_batches=2 if quick else None)

    def extra(ens):
        scores = {"test": common.lm_evaluator(loss_fn, test, seq_len=seq_len,
                                              max_batches=2 if quick else None)(ens)["loss"].tolist()}
        if heads == PRUNE_HEADS or (quick and heads == max(study_heads(quick))):
            scores["pruning"] = prune_each_head(ens, evaluate, cfg)
        return scores

    return common.train_arm(
        study, f"lm-h{heads}", init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.1), steps=steps,
        batch=common.member_lm_batches(train, S=study.S, batch_size=batch_size, seq_len=seq_len),
        evaluate=evaluate, eval_every=max(steps // 4, 1), extra=extra)


def prune_each_head(ens: ensemble.Ensemble, evaluate, cfg: jformer.TransformerConfig) -> dict:
    """Validation loss increase [L][N] -> [S] when head n of layer l alone is removed.

    Removing a head = zeroing its rows of the output projection ``out.kernel`` [L, N, H, D]:
    the concatenation then carries nothing from that head, as Michel et al.'s head mask ξ_h = 0.
    """
    base = np.asarray(evaluate(ens)["loss"])
    drops = []
    for layer in range(cfg.num_layers):
        row = []
        for head in range(cfg.num_heads):
            kernel = ens.state.params["decoder"]["layers"]["self_attn"]["out"]["kernel"]
            pruned = jax.tree.map(lambda x: x, ens.state.params)
            pruned["decoder"]["layers"]["self_attn"]["out"]["kernel"] = kernel.at[:, layer, head].set(0.0)
            loss = np.asarray(evaluate(ens.replace(state=ens.state.replace(params=pruned)))["loss"])
            row.append((loss - base).tolist())
        drops.append(row)
    return {"base": base.tolist(), "increase": drops}


# ------------------------------------------------- (b) two-key sum (synthetic)

PAIRS, KEYS, VALUES = 8, 16, 10
# ids: 0..9 values, 10..25 keys, 26 separator, 27 "not scored" (the loss skips targets == pad_id)
SEP = VALUES + KEYS
VOCAB = SEP + 1
PAD = VOCAB


def two_key_batch(seed: int, step: int, batch_size: int) -> dict:
    """``[B, T]`` LM rows ``k1 v1 ... k8 v8 SEP a b`` -> target at the last position
    ``(v_a + v_b) mod 10``; only that position is scored (every other target is ``PAD``)."""
    rng = np.random.default_rng([seed, step])
    keys = np.argsort(rng.random((batch_size, KEYS)), axis=1)[:, :PAIRS] + VALUES
    values = rng.integers(0, VALUES, (batch_size, PAIRS))
    ask = np.argsort(rng.random((batch_size, PAIRS)), axis=1)[:, :2]
    rows = np.arange(batch_size)[:, None]
    seq = np.concatenate([np.stack([keys, values], -1).reshape(batch_size, -1), np.full((batch_size, 1), SEP),
                          keys[rows, ask]], axis=1)
    answer = values[rows, ask].sum(1) % VALUES
    targets = np.full(seq.shape, PAD, np.int32)
    targets[:, -1] = answer
    return {"inputs": seq.astype(np.int32), "targets": targets}



def synthetic_arm(study: common.Study, heads: int, *, steps: int, quick: bool) -> dict:
    cfg = jformer.TransformerConfig(vocab_size=VOCAB + 1, d_model=32 if quick else 64, num_heads=heads,
                                    num_layers=2, d_ff=128 if quick else 256, dropout_rate=0.0, max_len=2 * PAIRS + 3,
                                    norm_position="pre", pad_id=PAD)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg)
    eval_step = ensemble.make_eval_step(loss_fn)
    held_out = [two_key_batch(10_000 + i, 0, 256) for i in range(1 if quick else 8)]

    def evaluate(ens):
        s = common.evaluate_batches(eval_step, ens, held_out)
        return {"accuracy": s["accuracy"], "loss": s["nll"]}

    def batch(step):
        parts = [two_key_batch(seed, step, 64) for seed in study.seeds]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    return common.train_arm(
        study, f"sum-h{heads}", init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.0, decay="kernels"), steps=steps, batch=batch,
        evaluate=evaluate, eval_every=max(steps // 4, 1), hparams={"lr": [3e-3] * study.S})


# ------------------------------------------------------------------ the study


def study_heads(quick: bool) -> tuple[int, ...]:
    return (1, 4) if quick else HEADS


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--steps", type=int, default=2000, help="LM steps per arm (nanoGPT: 2000)"),
        p.add_argument("--synthetic-steps", type=int, default=3000, help="two-key-sum steps per arm")))
    lm_steps, sum_steps = (20, 20) if study.quick else (args.steps, args.synthetic_steps)
    heads = study_heads(study.quick)
    lm = common.run_arms(study, [f"lm-h{h}" for h in heads],
                         lambda arm: lm_arm(study, int(arm[4:]), steps=lm_steps, quick=study.quick))
    synthetic = common.run_arms(study, [f"sum-h{h}" for h in heads],
                                lambda arm: synthetic_arm(study, int(arm[5:]), steps=sum_steps, quick=study.quick))
    arms = {**lm, **synthetic}

    rows = ["| heads N | head width | LM val loss | LM test loss | two-key-sum accuracy | params (LM) |",
            "| --- | --- | --- | --- | --- | --- |"]
    width = 32 if study.quick else 128
    for h in heads:
        a, b = lm[f"lm-h{h}"], synthetic[f"sum-h{h}"]
        rows.append(f"| {h} | {width // h} | {common.fmt(a['final']['loss']) if a else 'not run'} | "
                    f"{common.fmt(a['test']) if a else 'not run'} | "
                    f"{common.fmt(b['final']['accuracy']) if b else 'not run'} | {a['params'] if a else ''} |")

    verdicts = []
    done = [h for h in heads if lm[f"lm-h{h}"]]
    if 1 in done and len(done) > 1:
        best = min(done[1:], key=lambda h: np.mean(lm[f"lm-h{h}"]["final"]["loss"]))
        verdicts.append(common.verdict(f"LM: {best} heads beat 1 head (validation loss, lower is better)",
                                       f"N={best}", lm[f"lm-h{best}"]["final"]["loss"],
                                       "N=1", lm["lm-h1"]["final"]["loss"], metric="val loss"))
        if max(done) > best:
            verdicts.append(common.verdict(f"LM: {max(done)} tiny heads are worse than {best}",
                                           f"N={best}", lm[f"lm-h{best}"]["final"]["loss"],
                                           f"N={max(done)}", lm[f"lm-h{max(done)}"]["final"]["loss"],
                                           metric="val loss"))
    sdone = [h for h in heads if synthetic[f"sum-h{h}"]]
    if 1 in sdone and len(sdone) > 1:
        best = max(sdone[1:], key=lambda h: np.mean(synthetic[f"sum-h{h}"]["final"]["accuracy"]))
        verdicts.append(common.verdict(f"two-key sum: {best} heads beat 1 head (error rate, lower is better)",
                                       f"N={best}", 1 - np.asarray(synthetic[f"sum-h{best}"]["final"]["accuracy"]),
                                       "N=1", 1 - np.asarray(synthetic["sum-h1"]["final"]["accuracy"]),
                                       metric="error rate"))

    plots(study, heads, lm, synthetic)
    return common.finish(study, settings={"heads": heads, "lm_steps": lm_steps, "synthetic_steps": sum_steps,
                                          "anchor": "Vaswani et al. 2017 Table 3(A)"},
                         arms=arms, table="\n".join(rows), verdicts=verdicts)


def plots(study, heads, lm, synthetic):
    series = {}
    done = [h for h in heads if lm[f"lm-h{h}"]]
    if done:
        series["Shakespeare val loss"] = (done, [lm[f"lm-h{h}"]["final"]["loss"] for h in done])
        common.plot(study.out / "lm_loss.png", "Character LM: validation loss vs heads (width fixed)",
                    "heads N", "val loss (nats/char)", series, logx=True)
    sdone = [h for h in heads if synthetic[f"sum-h{h}"]]
    if sdone:
        common.plot(study.out / "two_key_sum.png", "Two-key sum: accuracy vs heads (width fixed)", "heads N",
                    "answer accuracy", {"accuracy": (sdone, [synthetic[f"sum-h{h}"]["final"]["accuracy"] for h in sdone])},
                    logx=True)
    pruned = next((lm[a] for a in lm if lm[a] and "pruning" in lm[a]), None)
    if pruned:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        inc = np.asarray(pruned["pruning"]["increase"]).mean(-1)  # [L, N], mean over seeds
        fig, ax = plt.subplots(figsize=(6, 3.5))
        im = ax.imshow(inc, cmap="viridis")
        ax.set(title="Val-loss increase when one head is removed (mean over seeds)", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(study.out / "pruning.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
