"""Study — which normalisation: LayerNorm, BatchNorm, RMSNorm or none, Post-LN and Pre-LN.

Claim (Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers"): in NLP
Transformers BatchNorm is worse than LayerNorm (their Table 1: about a BLEU point lower on
IWSLT14 de-en), and the reason is in its batch statistics: over training batches the batch mean
and variance of a BatchNorm's input fluctuate strongly around the running statistics (their
Figure 2: the average distance ``‖μ_B − μ‖ / D`` and ``‖σ²_B − σ²‖ / D`` between batch and
running statistics, per layer, is far larger for IWSLT14 than for CIFAR-10), so the model trained
on batch statistics meets different statistics at inference.

Arms (one vmapped ensemble of S seeds each), on two tasks:

* norm in {layer, batch, rms} x position in {post, pre}, and ``none`` (no normalisation; then
  Post-LN and Pre-LN are the same network, so it is one arm);
* (a) the Tiny Shakespeare character LM (nanoGPT's blocks: GELU, learned positions, tied
  embeddings, GPT-2 init; width 64, 3 layers, 4 heads, context 64, batch 16, ``--steps`` 800):
  validation loss (BatchNorm: with its running statistics, i.e. in eval mode), test loss once;
* (b) a padded, variable-length seq2seq task: ``data.synthetic_pairs("reverse")`` with source
  lengths 2..16, every batch padded to the longest possible length (so about 45% of the source
  positions are padding, which jformer's BatchNorm leaves out of its statistics via ``valid``);
  encoder-decoder, 2 + 2 layers, width 64, batch 32, ``--s2s-steps`` 800: validation loss and
  token accuracy.

BatchNorm measurements, on every trained BatchNorm member:

* fluctuation: the batch statistics of every BatchNorm site (per layer and sublayer) on 50
  training batches, read as the state a ``batch_norm_momentum=0`` copy of the model returns
  (momentum 0: the new "running" statistics are exactly the batch's), against the member's
  running statistics: PowerNorm's distances ``‖μ_B − μ‖₂ / D`` and ``‖σ²_B − σ²‖₂ / D``, and the
  scale-free ``mean_d |σ²_B,d / σ²_d − 1|``, each the mean over batches;
* the eval-mode gap: validation loss normalised with batch statistics (``train=True``, no
  dropout) minus with running statistics (``train=False``), on batches of the training batch size.

"none" is ``TransformerConfig(norm="none")``: every norm is the identity (no parameters), placed
as in Pre-LN (the residual stream then carries x + sum of sublayer outputs, unnormalised).

Note on BatchNorm in a causal LM: in training mode the batch statistics at position t include
positions after t of the same sequence (a small leak of the future, 1/(B·T) of the mean); the
reported validation losses use running statistics, which have no such leak.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import jformer
from experiments.config import preset
from experiments.studies import common
from jformer import data, ensemble, models, training

NAME = "norms"
CLAIM = "LayerNorm beats BatchNorm in Transformers, whose batch statistics fluctuate strongly across batches"
ARMS = (("layer", "post"), ("layer", "pre"), ("batch", "post"), ("batch", "pre"), ("rms", "post"),
        ("rms", "pre"), ("none", "pre"))
QUICK_ARMS = {"lm": (("layer", "post"), ("batch", "post")), "s2s": (("batch", "post"),)}  # --quick: code paths only
STAT_BATCHES = 50         # training batches over which BatchNorm statistics are compared
SITE_ORDER = ("self_attn_norm", "cross_attn_norm", "ffn_norm")

# the seq2seq task
TASK, MIN_LEN, MAX_LEN, SYMBOLS = "reverse", 2, 16, 16


def arm_name(task: str, norm: str, position: str) -> str:
    return f"{task}-none" if norm == "none" else f"{task}-{norm}-{position}"


def configure(base: jformer.TransformerConfig, norm: str, position: str) -> jformer.TransformerConfig:
    """``base`` with the arm's norm (``"none"`` has no position: it is run Pre-LN, i.e. with the
    residual stream kept as in the Pre-LN arms, minus the norms)."""
    return base.replace(norm=norm, norm_position="pre" if norm == "none" else position)


def state_fn(cfg: jformer.TransformerConfig):
    return (lambda p: jformer.init_state(p, cfg)) if cfg.norm == "batch" else None


def evaluator(eval_step, batches: list):
    """``ens -> {"loss": [S] mean token NLL, "accuracy": [S] if the loss reports it}`` over ``batches``
    (shared by every member) with ``eval_step = ensemble.make_eval_step(loss_fn)``: one compiled
    step serves validation and test."""
    def evaluate(ens):
        s = common.evaluate_batches(eval_step, ens, batches)
        return {"loss": s["nll"], **({"accuracy": s["accuracy"]} if "accuracy" in s else {})}
    return evaluate


def batch_stat_loss(loss_fn):
    """``loss_fn`` that always normalises with batch statistics (``train=True``), without dropout:
    evaluated by ``make_eval_step`` it gives the loss a BatchNorm model has with batch statistics."""
    def loss(params, model_state, batch, key=None, train=False, **kw):
        return loss_fn(params, model_state, batch, None, train=True, **kw)
    return loss


# ------------------------------------------------ BatchNorm statistics


def bn_sites(state: dict) -> dict:
    """``{site: {"mean", "var"}}`` of a BatchNorm state tree (leading member axis kept): stacked
    layers are split into one site per layer, named ``"<stack> <layer> <sublayer>"`` (1-based),
    in order encoder, decoder; within a layer self-attention, cross-attention, FFN; final norm last."""
    out = {}
    for stack in sorted(state, key=lambda s: ("encoder", "decoder").index(s) if s in ("encoder", "decoder") else 9):
        tree = state[stack]
        layers = tree.get("layers", {})
        if layers:
            num = next(iter(layers.values()))["mean"].shape[-2]
            for layer in range(num):
                for sub in SITE_ORDER:
                    if sub in layers:
                        out[f"{stack} {layer + 1} {sub[:-5]}"] = {k: v[..., layer, :] for k, v in layers[sub].items()}
        if "final_norm" in tree:
            out[f"{stack} final"] = tree["final_norm"]
    return out


def bn_fluctuation(ens: ensemble.Ensemble, cfg: jformer.TransformerConfig, batch_state, batches: list,
                   trace_channels: int = 4) -> dict:
    """Batch vs running statistics of every BatchNorm site, per member, over ``batches``.

    ``batch_state(params, model_state, batch, cfg) -> new model state`` runs the model in
    training mode; with ``cfg.batch_norm_momentum = 0`` that state holds the batch's own
    statistics. ``batches``: [S, B, ...] member batches. Returns per site [S] lists (mean over
    batches) of ``mean_distance`` ‖μ_B − μ‖₂/D, ``var_distance`` ‖σ²_B − σ²‖₂/D and
    ``var_relative`` mean_d |σ²_B/σ² − 1|, and a ``trace`` of member 0's batch variance of the
    first channels at the last site, with its running variance.
    """
    cfg0 = cfg.replace(batch_norm_momentum=0.0)
    stats = jax.jit(jax.vmap(lambda p, s, b: batch_state(p, s, b, cfg0)))
    running = bn_sites(ens.state.model_state)
    names = list(running)
    acc = {k: {n: [] for n in names} for k in ("mean_distance", "var_distance", "var_relative")}
    last, trace = names[-1], []
    for b in batches:
        now = bn_sites(stats(ens.state.params, ens.state.model_state, b))
        for n in names:
            mu_b, var_b = np.asarray(now[n]["mean"]), np.asarray(now[n]["var"])
            mu, var = np.asarray(running[n]["mean"]), np.asarray(running[n]["var"])
            D = mu.shape[-1]
            acc["mean_distance"][n].append(np.linalg.norm(mu_b - mu, axis=-1) / D)
            acc["var_distance"][n].append(np.linalg.norm(var_b - var, axis=-1) / D)
            acc["var_relative"][n].append(np.abs(var_b / var - 1).mean(-1))
        trace.append(np.asarray(now[last]["var"])[0, :trace_channels].tolist())
    out = {k: {n: np.mean(v, axis=0).tolist() for n, v in per.items()} for k, per in acc.items()}
    out["sites"] = names
    out["trace"] = {"site": last, "batch_var": trace,
                    "running_var": np.asarray(running[last]["var"])[0, :trace_channels].tolist()}
    return out


def lm_batch_state(params, model_state, batch, cfg):
    return models.lm_apply(params, batch["inputs"], cfg=cfg, state=model_state, train=True)[1]["state"]


def s2s_batch_state(params, model_state, batch, cfg):
    return models.seq2seq_apply(params, batch["src"], batch["tgt_in"], cfg=cfg, state=model_state,
                                train=True)[1]["state"]


# ------------------------------------------------------ (a) Shakespeare


def lm_settings(quick: bool, steps: int) -> dict:
    if quick:
        return {"d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": 64, "seq_len": 32, "batch_size": 8,
                "steps": steps, "eval_batches": 2, "stat_batches": 5}
    return {"d_model": 64, "num_heads": 4, "num_layers": 3, "d_ff": 256, "seq_len": 64, "batch_size": 16,
            "steps": steps, "eval_batches": None, "stat_batches": STAT_BATCHES}


def lm_arm(study: common.Study, norm: str, position: str, st: dict) -> dict:
    tok, train, val, test = common.shakespeare()
    base = preset("shakespeare").model.replace(
        vocab_size=tok.vocab_size, d_model=st["d_model"], num_heads=st["num_heads"], num_layers=st["num_layers"],
        d_ff=st["d_ff"], max_len=st["seq_len"], use_bias=True)
    cfg = configure(base, norm, position)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False)
    T, B, steps = st["seq_len"], st["batch_size"], st["steps"]
    val_b, test_b = (list(data.lm_eval_batches(x, B, T))[:st["eval_batches"]] for x in (val, test))
    eval_step = ensemble.make_eval_step(loss_fn)
    evaluate = evaluator(eval_step, val_b)
    batch = common.member_lm_batches(train, S=study.S, batch_size=B, seq_len=T)

    def extra(ens):
        out = {"test": np.asarray(evaluator(eval_step, test_b)(ens)["loss"]).tolist()}
        if cfg.norm == "batch":
            with_batch = evaluator(ensemble.make_eval_step(batch_stat_loss(loss_fn)), val_b)(ens)["loss"]
            out["gap"] = {"batch_stats": np.asarray(with_batch).tolist(),
                          "running_stats": np.asarray(evaluate(ens)["loss"]).tolist()}
            out["fluctuation"] = bn_fluctuation(ens, cfg, lm_batch_state,
                                                [batch(10**6 + i) for i in range(st["stat_batches"])])
        return out

    return common.train_arm(
        study, arm_name("lm", norm, position), init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.1), steps=steps, batch=batch, evaluate=evaluate,
        eval_every=max(steps // 4, 1), init_state=state_fn(cfg), extra=extra)


# ---------------------------------------------------- (b) padded seq2seq


def pad_pairs(pairs, src_len: int, tgt_len: int) -> dict:
    """Pairs -> ``{"src" [n, src_len], "tgt_in" [n, tgt_len] (BOS + target), "tgt_out" (target + EOS)}``,
    right-padded with PAD to these fixed lengths (one shape for every batch: one compile)."""
    n = len(pairs)
    out = {k: np.full((n, length), data.PAD, np.int32)
           for k, length in (("src", src_len), ("tgt_in", tgt_len), ("tgt_out", tgt_len))}
    for i, (src, tgt) in enumerate(pairs):
        out["src"][i, :len(src)] = src
        out["tgt_in"][i, :len(tgt) + 1] = [data.BOS, *tgt]
        out["tgt_out"][i, :len(tgt) + 1] = [*tgt, data.EOS]
    return out


def member_pair_batches(table: dict, *, S: int, batch_size: int, seed: int = 0):
    """``step -> [S, B, ...]`` batches: member i draws B rows of ``table`` with ``rng([seed + i, step])``."""
    n = len(table["src"])

    def batch(step: int) -> dict:
        rows = [np.random.default_rng([seed + i, step]).integers(0, n, batch_size) for i in range(S)]
        return {k: np.stack([v[r] for r in rows]) for k, v in table.items()}

    return batch


def pair_batches(table: dict, batch_size: int) -> list[dict]:
    """``table`` in consecutive batches of ``batch_size`` rows (a partial last one dropped)."""
    n = len(table["src"]) // batch_size * batch_size
    return [{k: v[i:i + batch_size] for k, v in table.items()} for i in range(0, n, batch_size)]


def s2s_settings(quick: bool, steps: int) -> dict:
    if quick:
        return {"d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": 64, "batch_size": 16, "steps": steps,
                "train_examples": 2000, "eval_examples": 64, "stat_batches": 5}
    return {"d_model": 64, "num_heads": 4, "num_layers": 2, "d_ff": 256, "batch_size": 32, "steps": steps,
            "train_examples": 20000, "eval_examples": 1024, "stat_batches": STAT_BATCHES}


@functools.cache
def s2s_data(train_examples: int, eval_examples: int) -> tuple[dict, dict, dict]:
    """(train, val, test) padded tables of the reverse task; the three draw with different seeds."""
    def table(n, seed):
        return pad_pairs(data.synthetic_pairs(TASK, n, seed=seed, min_len=MIN_LEN, max_len=MAX_LEN,
                                              num_symbols=SYMBOLS), MAX_LEN, MAX_LEN + 1)
    return table(train_examples, 1), table(eval_examples, 2), table(eval_examples, 3)


def s2s_arm(study: common.Study, norm: str, position: str, st: dict) -> dict:
    train, val, test = s2s_data(st["train_examples"], st["eval_examples"])
    base = jformer.TransformerConfig(vocab_size=data.synthetic_vocab_size(TASK, SYMBOLS), d_model=st["d_model"],
                                     num_heads=st["num_heads"], num_layers=st["num_layers"], d_ff=st["d_ff"],
                                     dropout_rate=0.0, max_len=MAX_LEN + 1, src_max_len=MAX_LEN, pad_id=data.PAD)
    cfg = configure(base, norm, position)
    loss_fn = functools.partial(training.seq2seq_loss, cfg=cfg)
    B, steps = st["batch_size"], st["steps"]
    eval_step = ensemble.make_eval_step(loss_fn)
    evaluate = evaluator(eval_step, pair_batches(val, B))
    batch = member_pair_batches(train, S=study.S, batch_size=B)

    def extra(ens):
        out = {"test": np.asarray(evaluator(eval_step, pair_batches(test, B))(ens)["loss"]).tolist()}
        if cfg.norm == "batch":
            with_batch = evaluator(ensemble.make_eval_step(batch_stat_loss(loss_fn)), pair_batches(val, B))(ens)
            out["gap"] = {"batch_stats": np.asarray(with_batch["loss"]).tolist(),
                          "running_stats": np.asarray(evaluate(ens)["loss"]).tolist()}
            out["fluctuation"] = bn_fluctuation(ens, cfg, s2s_batch_state,
                                                [batch(10**6 + i) for i in range(st["stat_batches"])])
        return out

    return common.train_arm(
        study, arm_name("s2s", norm, position), init_params=lambda k: jformer.init_seq2seq(k, cfg),
        loss_fn=loss_fn, optimizer=common.adamw(steps, weight_decay=0.0, b2=0.98), steps=steps, batch=batch,
        evaluate=evaluate, eval_every=max(steps // 4, 1), init_state=state_fn(cfg), extra=extra)


def padding_fraction(table: dict) -> dict:
    return {k: float(np.mean(table[k] == data.PAD)) for k in ("src", "tgt_in")}


# ------------------------------------------------------------------ the study


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--steps", type=int, default=800, help="character-LM steps per arm"),
        p.add_argument("--s2s-steps", type=int, default=800, help="seq2seq (reverse) steps per arm")))
    task_arms = QUICK_ARMS if study.quick else {"lm": ARMS, "s2s": ARMS}
    arms = [a for a in ARMS if any(a in v for v in task_arms.values())]
    lm_st = lm_settings(study.quick, 20 if study.quick else args.steps)
    s2s_st = s2s_settings(study.quick, 20 if study.quick else args.s2s_steps)
    by_name = {arm_name(t, n, p): (n, p) for t in ("lm", "s2s") for n, p in arms}
    lm = common.run_arms(study, [arm_name("lm", n, p) for n, p in task_arms["lm"]],
                         lambda a: lm_arm(study, *by_name[a], lm_st))
    s2s = common.run_arms(study, [arm_name("s2s", n, p) for n, p in task_arms["s2s"]],
                          lambda a: s2s_arm(study, *by_name[a], s2s_st))
    results = {**lm, **s2s}

    rows = ["| norm | position | LM val loss | LM test loss | seq2seq val loss | seq2seq token accuracy | "
            "BatchNorm gap LM (batch − running stats) | gap seq2seq |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r, f):
        return f(r) if r else "not run"

    for n, p in arms:
        a, b = lm.get(arm_name("lm", n, p)), s2s.get(arm_name("s2s", n, p))
        gap = (lambda r: common.fmt(np.subtract(r["gap"]["batch_stats"], r["gap"]["running_stats"]))
               if "gap" in r else "—")
        rows.append(f"| {n} | {p if n != 'none' else '—'} | {cell(a, lambda r: common.fmt(r['final']['loss']))} | "
                    f"{cell(a, lambda r: common.fmt(r['test']))} | {cell(b, lambda r: common.fmt(r['final']['loss']))} | "
                    f"{cell(b, lambda r: common.fmt(r['final']['accuracy']))} | {cell(a, gap)} | {cell(b, gap)} |")
    fluct = fluctuation_table(results)
    table = "\n".join(rows) + ("\n\n" + fluct if fluct else "")

    verdicts = norm_verdicts(lm, s2s, arms)
    plots(study, arms, lm, s2s)
    train_tab = s2s_data(s2s_st["train_examples"], s2s_st["eval_examples"])[0]
    settings = {"arms": {t: [list(a) for a in v] for t, v in task_arms.items()}, "lm": lm_st,
                "s2s": {**s2s_st, "task": TASK, "min_len": MIN_LEN, "max_len": MAX_LEN, "num_symbols": SYMBOLS,
                        "padding_fraction": padding_fraction(train_tab)},
                "none": "TransformerConfig(norm='none'): identity, Pre-LN placement",
                "anchor": "Shen et al. 2020 (PowerNorm), Table 1 and Figure 2"}
    return common.finish(
        study, settings=settings,
        arms=results, table=table, verdicts=verdicts,
        notes="BatchNorm validation losses use running statistics (eval mode). Fluctuation: mean over "
              f"{lm_st['stat_batches']} training batches of the distance between batch and running statistics, "
              "averaged over sites (per-site values in summary.json and bn_fluctuation.png).")


def norm_verdicts(lm: dict, s2s: dict, arms) -> list[dict]:
    verdicts = []
    for task, res, label in (("lm", lm, "LM"), ("s2s", s2s, "seq2seq")):
        def get(n, p):
            return res.get(arm_name(task, n, p))

        for p in ("post", "pre"):
            a, b = get("layer", p), get("batch", p)
            if a and b:
                verdicts.append(common.verdict(f"{label}: LayerNorm beats BatchNorm ({p}-norm; val loss)",
                                               f"layer-{p}", a["final"]["loss"], f"batch-{p}", b["final"]["loss"],
                                               metric="val loss"))
        for p in ("post", "pre"):
            b = get("batch", p)
            if b and "gap" in b:
                verdicts.append(common.verdict(
                    f"{label}: BatchNorm ({p}-norm) is worse with its running statistics than with batch statistics",
                    "batch stats", b["gap"]["batch_stats"], "running stats", b["gap"]["running_stats"],
                    metric="val loss"))
        a, b = get("layer", "pre"), get("none", "pre")
        if a and b:
            verdicts.append(common.verdict(f"{label}: normalisation helps (Pre-LN LayerNorm beats no norm)",
                                           "layer-pre", a["final"]["loss"], "none", b["final"]["loss"], metric="val loss"))
    return verdicts


def fluctuation_table(results: dict) -> str:
    rows = ["| BatchNorm arm | ‖μ_B − μ‖/D (mean over sites) | ‖σ²_B − σ²‖/D | mean \\|σ²_B/σ² − 1\\| | "
            "worst site (σ² relative) |", "| --- | --- | --- | --- | --- |"]
    any_row = False
    for name, r in results.items():
        if not r or "fluctuation" not in r:
            continue
        f = r["fluctuation"]
        per_site = {k: np.mean([f[k][s] for s in f["sites"]], axis=0) for k in ("mean_distance", "var_distance",
                                                                                 "var_relative")}
        worst = max(f["sites"], key=lambda s: np.mean(f["var_relative"][s]))
        rows.append(f"| {name} | {common.fmt(per_site['mean_distance'], 4)} | {common.fmt(per_site['var_distance'], 4)} | "
                    f"{common.fmt(per_site['var_relative'])} | {worst}: {common.fmt(f['var_relative'][worst])} |")
        any_row = True
    return "\n".join(rows) if any_row else ""


def plots(study, arms, lm, s2s):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # validation loss per arm, both tasks
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (task, res, title) in zip(axes, (("lm", lm, "Character LM"), ("s2s", s2s, "Seq2seq (reverse, padded)"))):
        names = [arm_name(task, n, p) for n, p in arms if res.get(arm_name(task, n, p))]
        vals = [res[n]["final"]["loss"] for n in names]
        ax.bar(range(len(names)), [np.mean(v) for v in vals],
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], capsize=3)
        for i, v in enumerate(vals):
            ax.plot([i] * len(v), v, "k.", ms=4)
        ax.set_xticks(range(len(names)), [n.split("-", 1)[1] for n in names], rotation=30)
        ax.set(title=f"{title}: validation loss", ylabel="val loss (nats/token)")
        if vals:
            lo, hi = min(map(min, vals)), max(map(max, vals))
            ax.set_ylim(max(0.0, lo - 0.2 * (hi - lo + 1e-3)), hi + 0.2 * (hi - lo + 1e-3))
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(study.out / "val_loss.png", dpi=120)
    plt.close(fig)

    # BatchNorm fluctuation per site
    bn = [(task, res, p) for task, res in (("lm", lm), ("s2s", s2s)) for p in ("post", "pre")
          if res.get(arm_name(task, "batch", p)) and "fluctuation" in res[arm_name(task, "batch", p)]]
    if bn:
        fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
        for row, task in enumerate(("lm", "s2s")):
            for col, key in enumerate(("mean_distance", "var_relative")):
                ax = axes[row][col]
                for t, res, p in bn:
                    if t != task:
                        continue
                    f = res[arm_name(t, "batch", p)]["fluctuation"]
                    ys = [f[key][s] for s in f["sites"]]
                    ax.errorbar(range(len(ys)), [np.mean(y) for y in ys],
                                yerr=[np.std(y, ddof=1) if len(y) > 1 else 0 for y in ys],
                                marker="o", capsize=3, label=f"BatchNorm {p}-norm")
                    ax.set_xticks(range(len(ys)), f["sites"], rotation=60, fontsize=7)
                ax.set(title=f"{'Character LM' if task == 'lm' else 'Seq2seq'}: "
                             f"{'‖μ_B − μ‖₂ / D' if key == 'mean_distance' else 'mean |σ²_B / σ² − 1|'}",
                       ylabel="batch vs running (mean over batches)")
                ax.grid(alpha=0.3)
                if ax.has_data():
                    ax.legend(fontsize=8)
        fig.suptitle("BatchNorm: batch statistics vs running statistics over training batches")
        fig.tight_layout()
        fig.savefig(study.out / "bn_fluctuation.png", dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(bn), figsize=(4 * len(bn), 3.5), squeeze=False)
        for ax, (t, res, p) in zip(axes[0], bn):
            tr = res[arm_name(t, "batch", p)]["fluctuation"]["trace"]
            batch_var = np.asarray(tr["batch_var"])
            for c in range(batch_var.shape[1]):
                line, = ax.plot(batch_var[:, c], lw=1)
                ax.axhline(tr["running_var"][c], color=line.get_color(), ls="--", lw=1)
            ax.set(title=f"{t} batch-{p}: {tr['site']}", xlabel="training batch", ylabel="σ² per channel")
            ax.set_yscale("log")
        fig.suptitle("Batch variance (solid) vs running variance (dashed), member 0, first channels", fontsize=9)
        fig.tight_layout()
        fig.savefig(study.out / "bn_trace.png", dpi=120)
        plt.close(fig)

    # validation curves
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (task, res, title) in zip(axes, (("lm", lm, "Character LM"), ("s2s", s2s, "Seq2seq"))):
        for n, p in arms:
            r = res.get(arm_name(task, n, p))
            if r:
                steps = [c["step"] for c in r["curves"]]
                ax.plot(steps, [np.mean(c["loss"]) for c in r["curves"]], marker="o",
                        label=arm_name(task, n, p).split("-", 1)[1])
        ax.set(title=f"{title}: validation loss (mean over seeds)", xlabel="step", ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study.out / "curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
