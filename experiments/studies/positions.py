"""Study — positions: self-attention alone is permutation-equivariant, so order must be injected.

Claim: without a positional signal an encoder sees its input as a bag of tokens (permuting the
input permutes the output), so a task that depends on order cannot be learnt; how the order is
injected then decides what happens past the training length.

Anchors: Vaswani et al. 2017, Table 3(E): learned positions 25.7 vs sinusoidal 25.8 BLEU
(newstest2013 dev), "nearly identical results". Press et al. 2022 (ALiBi), Figure 1:
sinusoidal positions degrade sharply past the training length, ALiBi does not. Haviv et al.
2022: a causal LM without positions still learns order (the causal mask leaks it).

Arms: ``positions`` in {none, sinusoidal, learned, rope, alibi}, S seeds each (one vmapped
ensemble per arm):

* (a) reversal (``data.synthetic_pairs("reverse")``, lengths 4-12 over 16 symbols),
  encoder-decoder (2 + 2 layers, width 64): exact-sequence and token accuracy of greedy decoding
  on 1000 held-out pairs, and teacher-forced token accuracy. Without positions the encoder
  output is a multiset, so reversal must fail (near chance: 1/16 per token).
* (b) Tiny Shakespeare character LM, nanoGPT's CPU model (4 layers, width 128, context 64,
  batch 12; embeddings scaled by √D in every arm, as the paper does, so the sinusoidal signal
  (amplitude 1) does not swamp GPT-2-initialised token embeddings) trained at context 64 and
  evaluated at 64, 128, 256, 512 (1x-8x): validation loss per evaluation length on the same
  16384 characters (every position of each window, and the positions past 64 alone). Learned
  positions have no row past 64: recorded as "n/a (table has 64 rows)". For the causal LM without
  positions: its loss against a unigram model and the positioned arms, and an order probe (the
  loss of the last prediction of 64-character windows whose first 63 characters are shuffled:
  a bag-of-characters model would not notice).

Run: ``python -m experiments.studies.positions [--quick] [--seeds S] [--steps N]
[--reversal-steps N] [--max-minutes M] [--out DIR]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jformer
from experiments.config import preset
from experiments.studies import common
from jformer import data, ensemble, positional, training

NAME = "positions"
CLAIM = "self-attention is permutation-equivariant: order must be injected (and how decides length extrapolation)"
KINDS = ("none", "sinusoidal", "learned", "rope", "alibi")
TRAIN_LEN = 64
EVAL_FACTORS = (1, 2, 4, 8)
TASK, MIN_LEN, MAX_LEN, SYMBOLS = "reverse", 4, 12, 16


# ------------------------------------------------------------- (a) reversal


def reversal_cfg(kind: str, quick: bool) -> jformer.TransformerConfig:
    return jformer.TransformerConfig(
        vocab_size=data.synthetic_vocab_size(TASK, SYMBOLS), d_model=32 if quick else 64, num_heads=4,
        num_layers=1 if quick else 2, d_ff=64 if quick else 256, dropout_rate=0.0, norm_position="pre",
        positions=kind, max_len=MAX_LEN + 1, pad_id=data.PAD)


def reversal_arm(study: common.Study, kind: str, *, steps: int, quick: bool) -> dict:
    cfg = reversal_cfg(kind, quick)
    loss_fn = functools.partial(training.seq2seq_loss, cfg=cfg)
    eval_step = ensemble.make_eval_step(loss_fn)
    task = {"min_len": MIN_LEN, "max_len": MAX_LEN, "num_symbols": SYMBOLS}
    held_out = common.synthetic_batch(TASK, 128 if quick else 1000, seed=10**9, **task)

    def evaluate(ens):
        s = training.eval_summary(eval_step(ens, held_out))
        return {"loss": s["nll"], "teacher_forced_accuracy": s["accuracy"]}

    def extra(ens):
        return {"greedy": common.greedy_accuracy(ens, cfg, held_out)}

    return common.train_arm(
        study, f"reverse-{kind}", init_params=lambda k: jformer.init_seq2seq(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.0, decay="kernels"), steps=steps,
        batch=common.member_seq2seq_batches(TASK, S=study.S, batch_size=64, **task),
        evaluate=evaluate, eval_every=max(steps // 4, 1), hparams={"lr": [3e-3] * study.S}, extra=extra)


# ------------------------------------------------------- (b) Shakespeare LM


def lm_cfg(kind: str, quick: bool, vocab_size: int) -> jformer.TransformerConfig:
    base = preset("shakespeare").model
    if quick:
        base = base.replace(num_layers=1, d_model=32, d_ff=64)
    return base.replace(vocab_size=vocab_size, positions=kind, max_len=TRAIN_LEN, scale_embeddings=True)


def table_note(cfg: jformer.TransformerConfig, length: int) -> str | None:
    """Why ``length`` positions cannot be evaluated (the model's own guard), or None if they can."""
    if cfg.positions != "learned":
        return None  # sinusoidal / rope / alibi / none: no table, no parameter depends on max_len
    try:
        positional.check_table_length("an evaluation window", length, cfg.max_len)
    except ValueError:
        return f"n/a (table has {cfg.max_len} rows)"
    return None


@functools.partial(jax.jit, static_argnames="cfg")
def _nll_sums(params, inputs, targets, cfg):
    """[S, T]: each member's (params stacked on [S]) NLL summed over the batch at each position."""
    def one(p):
        logits, _ = jformer.lm_apply(p, inputs, cfg=cfg)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(0)
    return jax.vmap(one)(params)


def per_position_nll(ens: ensemble.Ensemble, cfg: jformer.TransformerConfig, tokens: np.ndarray, length: int,
                     tokens_per_batch: int, max_batches: int | None = None) -> np.ndarray:
    """[S, length]: each member's mean NLL at each position of contiguous windows of ``tokens``
    (whole batches of ``tokens_per_batch // length`` windows only, so one compiled shape per length;
    the same characters are scored at every length).

    Sinusoidal, RoPE, ALiBi and no positions have no table: no parameter depends on ``max_len``, so
    the trained parameters run unchanged under a config whose ``max_len`` is ``length``."""
    eval_cfg = cfg if cfg.positions == "learned" else cfg.replace(max_len=max(length, cfg.max_len))
    batch_size = max(1, tokens_per_batch // length)
    total, count = 0.0, 0
    for i, b in enumerate(data.lm_eval_batches(tokens, batch_size, length)):
        if len(b["inputs"]) < batch_size or i == max_batches:
            break
        total = total + np.asarray(_nll_sums(ens.state.params, b["inputs"], b["targets"], eval_cfg))
        count += batch_size
    return total / count


def order_probe(ens: ensemble.Ensemble, cfg: jformer.TransformerConfig, tokens: np.ndarray, windows: int,
                batch_size: int) -> dict:
    """Loss of the last prediction of ``windows`` contiguous windows of ``cfg.max_len`` characters,
    intact and with all but their last input character shuffled (the last character and the target
    kept): ``{"intact": [S], "shuffled": [S]}``. A model blind to order scores both the same."""
    T = cfg.max_len
    batch_size = min(batch_size, windows)
    windows = windows // batch_size * batch_size  # whole batches only: one compiled shape
    starts = np.arange(windows) * T
    inputs = tokens[starts[:, None] + np.arange(T)].astype(np.int32)
    targets = tokens[starts[:, None] + np.arange(1, T + 1)].astype(np.int32)  # only the last column counts
    rng = np.random.default_rng(0)
    shuffled = inputs.copy()
    for row in shuffled:
        row[:-1] = row[:-1][rng.permutation(T - 1)]
    out = {}
    for name, x in (("intact", inputs), ("shuffled", shuffled)):
        total = sum(np.asarray(_nll_sums(ens.state.params, x[i:i + batch_size], targets[i:i + batch_size], cfg))[:, -1]
                    for i in range(0, windows, batch_size))
        out[name] = (total / windows).tolist()
    return out


def unigram_loss(train: np.ndarray, scored: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/char) on ``scored`` of the add-one-smoothed character frequencies of ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[scored].mean())


def lm_settings(quick: bool) -> dict:
    factors = (1, 2) if quick else EVAL_FACTORS
    return {"scored_chars": 2048 if quick else 16384, "probe_windows": 64 if quick else 512,
            "tokens_per_batch": 2048 if quick else 4096, "val_batches": 1 if quick else 8,
            "test_chars": 2048 if quick else None, "lengths": [TRAIN_LEN * f for f in factors]}


def lm_arm(study: common.Study, kind: str, *, steps: int, quick: bool) -> dict:
    tok, train, val, test = common.shakespeare()
    cfg = lm_cfg(kind, quick, tok.vocab_size)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False)
    settings = lm_settings(quick)
    per_batch = settings["tokens_per_batch"]
    scored = val[: settings["scored_chars"] + 1]

    def evaluate(ens):  # the curves: the first val batches at the training length
        nll = per_position_nll(ens, cfg, val, TRAIN_LEN, per_batch, settings["val_batches"])
        return {"loss": nll.mean(1)}

    def extra(ens):
        lengths = {}
        for length in settings["lengths"]:
            note = table_note(cfg, length)
            if note:
                lengths[str(length)] = {"loss": None, "beyond": None, "note": note}
                continue
            nll = per_position_nll(ens, cfg, scored, length, per_batch)  # [S, L]
            lengths[str(length)] = {
                "loss": nll.mean(1).tolist(),
                "beyond": nll[:, TRAIN_LEN:].mean(1).tolist() if length > TRAIN_LEN else None,
                "by_position": nll.reshape(nll.shape[0], -1, 16).mean(-1).T.tolist()}  # [L/16][S]
        test_tokens = test if settings["test_chars"] is None else test[: settings["test_chars"] + 1]
        test_loss = per_position_nll(ens, cfg, test_tokens, TRAIN_LEN, per_batch).mean(1)
        return {"lengths": lengths, "test": test_loss.tolist(),
                "order_probe": order_probe(ens, cfg, val, settings["probe_windows"], per_batch // TRAIN_LEN)}

    return common.train_arm(
        study, f"lm-{kind}", init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.1), steps=steps,
        batch=common.member_lm_batches(train, S=study.S, batch_size=12, seq_len=TRAIN_LEN),
        evaluate=evaluate, eval_every=max(steps // 4, 1), extra=extra)


# -------------------------------------------------------------- verdicts


def reversal_verdicts(rev: dict) -> list[dict]:
    """Every positioned arm against ``none`` on the exact-sequence error of greedy decoding."""
    out = []
    if not rev.get("reverse-none"):
        return out
    none_err = 1 - np.asarray(rev["reverse-none"]["greedy"]["exact"])
    for kind in KINDS[1:]:
        arm = rev.get(f"reverse-{kind}")
        if arm:
            out.append(common.verdict(
                f"reversal: without positions the model fails ({kind} has a lower exact-sequence error than none)",
                kind, 1 - np.asarray(arm["greedy"]["exact"]), "none", none_err, metric="greedy exact-sequence error"))
    return out


def lm_loss_at(lm: dict, kind: str, length: int) -> list | None:
    arm = lm.get(f"lm-{kind}")
    return None if not arm else arm["lengths"][str(length)]["loss"]


def lm_verdicts(lm: dict, unigram: float, longest: int = TRAIN_LEN * EVAL_FACTORS[-1]) -> list[dict]:
    """The LM claims on the finished arms of ``lm`` (``{"lm-<kind>": result or None}``): extrapolation to
    ``longest`` (ALiBi vs sinusoidal), the anchor (learned vs sinusoidal), and the causal LM without
    positions (order probe, unigram, best positioned arm)."""
    out, f = [], f"{longest // TRAIN_LEN}x"
    sin1, sinL, ali1, aliL = (lm_loss_at(lm, k, n) for k, n in (("sinusoidal", TRAIN_LEN), ("sinusoidal", longest),
                                                                 ("alibi", TRAIN_LEN), ("alibi", longest)))
    if aliL and sinL:
        out.append(common.verdict(f"past the training length ALiBi beats sinusoidal (val loss at {longest} = {f})",
                                  "alibi", aliL, "sinusoidal", sinL, metric=f"val loss @{longest}"))
    if sin1 and sinL:
        out.append(common.verdict(f"sinusoidal degrades past its training length (loss at {TRAIN_LEN} < at {longest})",
                                  f"@{TRAIN_LEN}", sin1, f"@{longest}", sinL, metric="sinusoidal val loss"))
    if ali1 and aliL:
        out.append(common.verdict(f"ALiBi does not degrade: more context helps (loss at {longest} < at {TRAIN_LEN})",
                                  f"@{longest}", aliL, f"@{TRAIN_LEN}", ali1, metric="alibi val loss"))
    learned = lm_loss_at(lm, "learned", TRAIN_LEN)
    if learned and sin1:
        out.append(common.verdict(
            "anchor, Vaswani Table 3(E): learned and sinusoidal are on par (tested: learned < sinusoidal; "
            "'inconclusive' agrees with the paper)", "learned", learned, "sinusoidal", sin1,
            metric=f"val loss @{TRAIN_LEN}"))
    none = lm.get("lm-none")
    if none:
        probe = none["order_probe"]
        out.append(common.verdict(
            "Haviv et al.: the causal LM without positions still uses order (last-character loss, intact "
            "context < shuffled context)", "intact", probe["intact"], "shuffled", probe["shuffled"],
            metric="none: last-position loss"))
        none1 = none["lengths"][str(TRAIN_LEN)]["loss"]
        out.append(common.verdict("the causal LM without positions beats a unigram model (unigram: one value, "
                                  "repeated per seed)", "none", none1, "unigram", [unigram] * len(none1),
                                  metric=f"val loss @{TRAIN_LEN}"))
        best = min((k for k in KINDS[1:] if lm_loss_at(lm, k, TRAIN_LEN)),
                   key=lambda k: np.mean(lm_loss_at(lm, k, TRAIN_LEN)), default=None)
        if best:
            out.append(common.verdict(f"positions still help the causal LM ({best}, the best positioned arm, < none)",
                                      best, lm_loss_at(lm, best, TRAIN_LEN), "none", none1,
                                      metric=f"val loss @{TRAIN_LEN}"))
    return out


# ------------------------------------------------------------------ the study


def study_kinds(quick: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(reversal arms, LM arms). --quick keeps the arms its code paths need: none vs sinusoidal
    (reversal), learned (a table that ends) vs ALiBi (LM); every arm compiles its own programs."""
    return (("none", "sinusoidal"), ("learned", "alibi")) if quick else (KINDS, KINDS)


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--steps", type=int, default=1500, help="LM steps per arm (nanoGPT: 2000)"),
        p.add_argument("--reversal-steps", type=int, default=600, help="reversal steps per arm")))
    lm_steps, rev_steps = (20, 30) if study.quick else (args.steps, args.reversal_steps)
    rev_kinds, lm_kinds = study_kinds(study.quick)
    rev = common.run_arms(study, [f"reverse-{k}" for k in rev_kinds],
                          lambda arm: reversal_arm(study, arm[8:], steps=rev_steps, quick=study.quick))
    lm = common.run_arms(study, [f"lm-{k}" for k in lm_kinds],
                         lambda arm: lm_arm(study, arm[3:], steps=lm_steps, quick=study.quick))
    tok, train, val, _ = common.shakespeare()
    settings = lm_settings(study.quick)
    lengths = settings["lengths"]
    unigram = unigram_loss(train, val[1: settings["scored_chars"] + 1], tok.vocab_size)

    rows = ["### (a) Reversal (greedy decoding, held-out pairs)", "",
            "| positions | exact-sequence accuracy | token accuracy | teacher-forced token accuracy | params |",
            "| --- | --- | --- | --- | --- |"]
    for k in rev_kinds:
        a = rev[f"reverse-{k}"]
        rows.append(f"| {k} | {common.fmt(a['greedy']['exact']) if a else 'not run'} | "
                    f"{common.fmt(a['greedy']['token']) if a else ''} | "
                    f"{common.fmt(a['final']['teacher_forced_accuracy']) if a else ''} | {a['params'] if a else ''} |")
    rows += ["", f"Chance: 1/{SYMBOLS} = {1 / SYMBOLS:.3f} per token (a uniform guess among the symbols).", "",
             f"### (b) Character LM trained at context {TRAIN_LEN}: validation loss (nats/char) by evaluation length",
             "", "| positions | " + " | ".join(f"@{n} ({n // TRAIN_LEN}x)" for n in lengths)
             + f" | positions > {TRAIN_LEN} @{lengths[-1]} | test @{TRAIN_LEN} | "
               "last-char loss: intact | shuffled context |",
             "| --- " * (len(lengths) + 5) + "|"]
    for k in lm_kinds:
        a = lm[f"lm-{k}"]
        if not a:
            rows.append(f"| {k} | not run |")
            continue
        cells = [common.fmt(a["lengths"][str(n)]["loss"]) if a["lengths"][str(n)]["loss"] else
                 a["lengths"][str(n)]["note"] for n in lengths]
        last = a["lengths"][str(lengths[-1])]
        cells.append(common.fmt(last["beyond"]) if last["beyond"] else last["note"])
        probe = a["order_probe"]
        cells += [common.fmt(a["test"]), common.fmt(probe["intact"]), common.fmt(probe["shuffled"])]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    rows += ["", f"Unigram (character frequencies of the training split) on the same characters: {unigram:.3f}. "
             f"Every column scores the same {settings['scored_chars']} validation characters; "
             f"'last-char loss' is the order probe on {settings['probe_windows']} windows."]

    verdicts = reversal_verdicts(rev) + lm_verdicts(lm, unigram, longest=lengths[-1])
    plots(study, rev, lm, lengths)
    return common.finish(study, settings={
        "reversal_kinds": rev_kinds, "lm_kinds": lm_kinds, "lm_steps": lm_steps, "reversal_steps": rev_steps,
        "train_len": TRAIN_LEN,
        "reversal": {"task": TASK, "min_len": MIN_LEN, "max_len": MAX_LEN, "symbols": SYMBOLS, "batch": 64},
        "lm": {**settings, "batch": 12, "scale_embeddings": True},
        "anchor": "Vaswani et al. 2017 Table 3(E); Press et al. 2022 (ALiBi); Haviv et al. 2022"},
        arms={**rev, **lm}, table="\n".join(rows), verdicts=verdicts, unigram_loss=unigram)


def plots(study, rev: dict, lm: dict, lengths: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [arm for arm, result in rev.items() if result]
    if done:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.arange(len(done))
        for j, (metric, label) in enumerate((("exact", "exact sequence"), ("token", "token"))):
            vals = [rev[arm]["greedy"][metric] for arm in done]
            ax.bar(x + (j - 0.5) * 0.38, [np.mean(v) for v in vals], 0.38, label=label,
                   yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], capsize=3)
        ax.axhline(1 / SYMBOLS, color="gray", ls="--", lw=1, label=f"chance 1/{SYMBOLS} (token)")
        ax.set_xticks(x, [arm.removeprefix("reverse-") for arm in done])
        ax.set(title="Reversal: greedy accuracy, held-out pairs", ylabel="accuracy (mean ± sd over seeds)",
               ylim=(0, 1.05))
        ax.legend()
        fig.tight_layout()
        fig.savefig(study.out / "reversal_accuracy.png", dpi=120)
        plt.close(fig)
    series, by_position = {}, {}
    for arm, a in lm.items():
        if not a:
            continue
        kind = arm.removeprefix("lm-")
        xs = [n for n in lengths if a["lengths"][str(n)]["loss"]]
        label = kind if len(xs) == len(lengths) else f"{kind} (table: {TRAIN_LEN} rows)"
        series[label] = (xs, [a["lengths"][str(n)]["loss"] for n in xs])
        if a["lengths"][str(lengths[-1])]["loss"]:
            by_position[kind] = (list(range(8, lengths[-1], 16)), a["lengths"][str(lengths[-1])]["by_position"])
    if series:
        common.plot(study.out / "lm_length.png", f"Char LM trained at {TRAIN_LEN}: loss vs evaluation length",
                    "evaluation length (characters)", "val loss (nats/char)", series, logx=True)
    if by_position:
        common.plot(study.out / "lm_by_position.png",
                    f"Loss by position in {lengths[-1]}-character windows (trained at {TRAIN_LEN})",
                    "position (bins of 16)", "val loss (nats/char)", by_position)


if __name__ == "__main__":
    main()
