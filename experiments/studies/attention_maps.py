"""Study — what the heads look at: attention maps and per-head statistics of trained models.

Claims (textbook, measured here on small models):

* cross-attention aligns the target with a few source tokens: its weights are more concentrated
  than attending uniformly over the source (Bahdanau et al. 2015 Fig. 3; Vaswani et al. 2017);
* some self-attention heads attend mostly to the previous token (Clark et al. 2019, "What Does
  BERT Look At?"; Olsson et al. 2022 "previous-token heads");
* higher layers attend farther than the first (Vig & Belinkov 2019, GPT-2 attention distance).

Two arms, each an ensemble of S seeds trained side by side (``common.train_arm``), a reduced budget
sized for the 2-core CPU (measured under load: ~1.2 s CPU per MT step, ~0.85 s per LM step, for 3
members; about 22-27 + 10-11 minutes of training alone, ~40 minutes with compilation, evaluation and
plots, inside the default ``--max-minutes 45``; a run cut short resumes where it stopped):

* ``mt``: a Multi30k de->en Transformer (3 + 3 layers, width 128, 4 heads, FFN 512, Pre-LN, dropout
  0.1, label smoothing 0.1, 2.9M parameters) with the subword tokenizers ``experiments.common.build_task``
  builds (sentencepiece unigram, 4000 pieces per language, trained on the whole training side; the
  ``multi30k`` preset has 6000), length-bucketed ``Seq2SeqBatches`` of up to 1024 token slots (~45
  pairs), the same batches for every member (members differ by initialisation and dropout),
  ``--mt-steps`` 2000 (~3 epochs; the preset trains a 10M-parameter model 1630 steps of 4096 slots);
* ``lm``: an English subword LM on the English side of the Multi30k training set (each caption as
  ``BOS`` + its pieces, with the ``mt`` model's English tokenizer, so a word it never saw is split into
  known pieces, or ``UNK``, and never crashes), GPT-2 blocks as the ``shakespeare`` preset (3 layers,
  width 128, 4 heads, learned positions, tied embeddings, dropout 0.1; 1.1M parameters), random
  windows of 64 pieces, batch 16, ``--lm-steps`` 1200 (~2.7 epochs); members draw their own windows.
  Trained first (the cheaper arm). Multi30k English rather than Tiny Shakespeare: modern English
  and the translation model's target tokenizer. Captions are descriptive present tense: of the test
  sentence, "street" occurs 1449 times in the training side, "animal" 51, "cross" 74, "because" 8,
  "tired" 9, "was" 13, and "didn't" never (it is split into pieces).

``--quick``: 2 layers, width 32, 2 heads, 20 steps each, the first 1000 pairs, 250 pieces, one
batch shape, 32 validation sentences, one sentence of each kind, no greedy translation.

Measured after training, on a validation sample (the Multi30k validation pairs; the LM on each
validation caption alone, ``BOS`` + pieces), for every member, layer and head, token-weighted over
the real (non-padding) query positions i:

* entropy ``H_i = -sum_j a_ij log a_ij`` (nats), next to the uniform baseline ``log n_i`` (``n_i``:
  the keys query i may attend: the real source tokens, or i + 1 under a causal mask);
* mean attended distance ``sum_j a_ij |i - j|`` (positions: source / target index; for
  cross-attention the offset from the diagonal ``i = j``);
* weight on the previous token ``a_{i,i-1}`` (self-attention, queries i >= 1);

and the same statistics of the same members at initialisation (before training: random weights
already attend non-uniformly, so "below uniform" alone would not show that training did it).

The decoder maps are teacher-forced on the reference translation: query i is the decoder input at
position i (``BOS`` first), which predicts target token i + 1. Head indices are arbitrary per seed
(any permutation of heads is the same model), so ``head_stats.png`` sorts the heads of every (layer,
seed) by the plotted value and averages rank r over seeds.

Verdicts (``common.verdict``, 2 standard errors over seeds):

1. MT cross-attention entropy (mean over layers, heads and queries) < uniform ``log S``, and < its
   entropy at initialisation;
2. the English LM has a previous-token head: ``0.5 <`` the largest mean previous-token weight of
   any head (averaged over queries i >= 1);
3. the LM attends farther in its last layer than in its first (mean distance over heads).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jformer
from experiments import common as exp_common
from experiments.config import ExperimentConfig, preset
from experiments.studies import common
from jformer import data, training

NAME = "attention_maps"
CLAIM = "what the heads look at: cross-attention is concentrated, some heads attend to the previous token"

MT_SENTENCES = ("Ein Hund rennt durch das Gras auf die Kamera zu.",
                "Ein Mann schläft in einem grünen Raum auf einem Sofa.")
LM_SENTENCES = ("The animal didn't cross the street because it was too tired",
                "The animal didn't cross the street because it was too wide")
KINDS = {"encoder": "MT encoder self-attention", "decoder_self": "MT decoder self-attention",
         "cross": "MT cross-attention (de -> en)", "lm": "English LM self-attention"}
SELF_KINDS = ("encoder", "decoder_self", "lm")
PREVIOUS_HEAD = 0.5  # a head "attends mostly to the previous token" above this mean weight
# Small models on a CPU: no rematerialisation (memory is plentiful, recomputation only costs time).
EXE = jformer.ExecConfig(remat=False)


# --------------------------------------------------------------- head statistics


def head_sums(weights: jax.Array, query_valid: jax.Array | None = None, key_valid: jax.Array | None = None,
              *, causal: bool = False) -> dict:
    """Per-head sums over the real query rows of attention ``weights`` [L, B, N, T, S].

    ``query_valid`` [B, T] / ``key_valid`` [B, S] (bool, True = a real token; None = all), ``causal``:
    query i may attend keys j <= i. Returns sums that add up over batches (``head_means`` divides):
    ``entropy`` [L, N] sum_i H_i (nats), ``distance`` [L, N] sum_i sum_j a_ij |i - j|, ``previous``
    [L, N] sum over rows i >= 1 with a real key i - 1 of a_{i,i-1}, ``uniform`` [] sum_i log n_i
    (n_i keys allowed), ``rows`` [] and ``previous_rows`` [] the numbers of rows counted.
    """
    L, B, N, T, S = weights.shape
    q_ok = jnp.ones((B, T), bool) if query_valid is None else query_valid.astype(bool)
    k_ok = jnp.ones((B, S), bool) if key_valid is None else key_valid.astype(bool)
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    allowed = k_ok[:, None, :] & ((j <= i) if causal else jnp.ones((T, S), bool))[None]     # [B, T, S]
    n_keys = allowed.sum(-1)
    rows = q_ok & (n_keys > 0)                                                                # [B, T]
    w = weights.astype(jnp.float32)
    plogp = jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0)
    entropy = -plogp.sum(-1)                                                                  # [L, B, N, T]
    distance = (w * jnp.abs(i - j).astype(jnp.float32)).sum(-1)
    prev_w = jnp.einsum("lbnts,ts->lbnt", w, (j == i - 1).astype(jnp.float32))
    key_before = jnp.pad(k_ok, ((0, 0), (1, max(0, T - 1 - S))))[:, :T]  # [B, T]: key i - 1 exists and is real
    prev_ok = rows & key_before
    r = rows.astype(jnp.float32)[None, :, None, :]
    p = prev_ok.astype(jnp.float32)[None, :, None, :]
    return {"entropy": (entropy * r).sum((1, 3)), "distance": (distance * r).sum((1, 3)),
            "previous": (prev_w * p).sum((1, 3)),
            "uniform": (jnp.log(jnp.maximum(n_keys, 1)).astype(jnp.float32) * rows).sum(),
            "rows": rows.sum().astype(jnp.float32), "previous_rows": prev_ok.sum().astype(jnp.float32)}


def head_means(sums: dict) -> dict:
    """Means from ``head_sums`` totals (leading axes kept): ``entropy``, ``distance``, ``previous``
    [..., L, N] and ``uniform_entropy`` [...] (the uniform baseline over the same rows)."""
    rows = jnp.maximum(sums["rows"], 1.0)[..., None, None]
    prev_rows = jnp.maximum(sums["previous_rows"], 1.0)[..., None, None]
    return {"entropy": sums["entropy"] / rows, "distance": sums["distance"] / rows,
            "previous": sums["previous"] / prev_rows,
            "uniform_entropy": sums["uniform"] / jnp.maximum(sums["rows"], 1.0)}


def head_stats(weights, query_valid=None, key_valid=None, *, causal: bool = False) -> dict:
    """``head_means(head_sums(...))`` of one batch of weights [L, B, N, T, S]."""
    return head_means(head_sums(weights, query_valid, key_valid, causal=causal))


def _add(a: dict | None, b: dict) -> dict:
    return b if a is None else jax.tree.map(jnp.add, a, b)


def _per_seed(means: dict) -> dict:
    """Member-stacked means ([S, L, N], [S]) as JSON lists [L, N, S] and [S]."""
    return {k: (np.moveaxis(np.asarray(v), 0, -1) if np.ndim(v) == 3 else np.asarray(v)).tolist()
            for k, v in means.items()}


# ------------------------------------------------------------------------ data


def token_labels(tok: data.SubwordTokenizer, ids) -> list[str]:
    """Readable piece strings of ``ids`` (``<s>`` for BOS, ``⁇`` for UNK, the word-start mark as a space)."""
    names = {data.PAD: "<pad>", data.BOS: "<s>", data.EOS: "</s>", data.UNK: "⁇"}
    return [names.get(int(i), tok.processor.id_to_piece(int(i)).replace("▁", " ").strip() or "▁") for i in ids]


def sentence_ids(tok: data.SubwordTokenizer, text: str) -> list[int]:
    """``text`` as the model's pieces (an unknown word becomes known pieces or UNK; never an error)."""
    return [int(i) for i in tok.encode(text)]


def fixed_pairs(pairs: list[tuple[list[int], list[int]]], width: int, batch_size: int) -> list[dict]:
    """Seq2seq batches of one shape ([batch_size, width]: one compilation), in order, padded with
    PAD rows; pairs whose source or target + 1 exceed ``width`` are left out."""
    kept = [(s, t) for s, t in pairs if 0 < len(s) <= width and len(t) + 1 <= width]
    out = []
    for k in range(0, len(kept), batch_size):
        src = np.full((batch_size, width), data.PAD, np.int32)
        tgt_in, tgt_out = src.copy(), src.copy()
        for r, (s, t) in enumerate(kept[k:k + batch_size]):
            src[r, :len(s)] = s
            tgt_in[r, :len(t) + 1] = [data.BOS, *t]
            tgt_out[r, :len(t) + 1] = [*t, data.EOS]
        out.append({"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out})
    return out


def shared_seq2seq_batches(batches: data.Seq2SeqBatches):
    """``step -> batch``: step-th batch of the iterator's epoch sequence (a pure function of the step,
    so a resumed arm sees the same batches); every member trains on it."""
    starts = [0]  # first step of each epoch

    def batch(step: int) -> dict:
        while starts[-1] <= step:
            starts.append(starts[-1] + batches.num_batches(len(starts) - 1))
        epoch = bisect.bisect_right(starts, step) - 1
        b = next(batches.restore({"epoch": epoch, "position": step - starts[epoch]}))
        return {k: b[k] for k in ("src", "tgt_in", "tgt_out")}

    return batch


def fit_width(lengths: list[int], multiple: int, cap: int) -> int:
    """The longest length rounded up to ``multiple``, at most ``cap``: one batch width for a whole
    sample (one compilation) without padding every row to the model's maximum."""
    return min(cap, -(-max(lengths, default=1) // multiple) * multiple)


def lm_stream(tok: data.SubwordTokenizer, sentences: list[str]) -> np.ndarray:
    """One token stream: ``BOS`` + pieces of each sentence, concatenated."""
    return np.asarray([i for ids in tok.encode_batch(sentences) for i in (data.BOS, *ids)], np.int32)


def lm_rows(tok: data.SubwordTokenizer, sentences: list[str], width: int, batch_size: int) -> list[np.ndarray]:
    """[batch_size, width] rows ``BOS`` + pieces, right-padded with PAD (the LM is causal, so a real
    query never sees the padding after it); longer sentences are cut to ``width``."""
    rows = [[data.BOS, *ids][:width] for ids in tok.encode_batch(sentences)]
    out = []
    for k in range(0, len(rows), batch_size):
        x = np.full((batch_size, width), data.PAD, np.int32)
        for r, ids in enumerate(rows[k:k + batch_size]):
            x[r, :len(ids)] = ids
        out.append(x)
    return out


# ---------------------------------------------------------------------- settings


def settings(quick: bool, args) -> dict:
    """The budget: ``pad_to`` rounds batch lengths (one shape per multiple: one compilation each),
    ``num_examples`` / ``val_sentences`` 0 mean all."""
    if quick:  # one sentence of each kind, one batch shape, a tiny model
        return {"mt_steps": 20, "lm_steps": 20, "num_examples": 1000, "vocab_size": 250, "max_tokens": 32,
                "pad_to": 32, "batch_tokens": 512, "lm_batch": 8, "lm_seq_len": 32, "val_sentences": 32,
                "d_model": 32, "num_heads": 2, "num_layers": 2, "d_ff": 64,
                "mt_sentences": MT_SENTENCES[:1], "lm_sentences": LM_SENTENCES[:1]}
    return {"mt_steps": args.mt_steps, "lm_steps": args.lm_steps, "num_examples": 0, "vocab_size": 4000,
            "max_tokens": 64, "pad_to": 16, "batch_tokens": 1024, "lm_batch": 16, "lm_seq_len": 64,
            "val_sentences": 0, "d_model": 128, "num_heads": 4, "num_layers": 3, "d_ff": 512,
            "mt_sentences": MT_SENTENCES, "lm_sentences": LM_SENTENCES}


def mt_config(s: dict) -> ExperimentConfig:
    """The ``multi30k`` preset shrunk to the budget: what ``build_task`` needs (tokenizers, data, model)."""
    base = preset("multi30k")
    model = base.model.replace(d_model=s["d_model"], num_heads=s["num_heads"], num_layers=s["num_layers"],
                               d_ff=s["d_ff"], max_len=s["max_tokens"] + 2)
    return dataclasses.replace(base, model=model, exe=EXE, steps=s["mt_steps"],
                               warmup_steps=min(150, s["mt_steps"] // 10), eval_every=max(1, s["mt_steps"] // 2),
                               vocab_size=s["vocab_size"], num_examples=s["num_examples"],
                               max_tokens=s["max_tokens"], batch_tokens=s["batch_tokens"])


def lm_model(s: dict, vocab_size: int) -> jformer.TransformerConfig:
    return preset("shakespeare").model.replace(
        vocab_size=vocab_size, d_model=s["d_model"], num_heads=s["num_heads"], num_layers=s["num_layers"],
        d_ff=s["d_ff"], max_len=max(s["lm_seq_len"], s["max_tokens"] + 1), dropout_rate=0.1)


# ------------------------------------------------------------------------- arms


def _nll_sums(logits: jax.Array, targets: jax.Array) -> dict:
    """Summed token NLL and count of the non-PAD ``targets`` [B, T] under ``logits`` [B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = (targets != data.PAD).astype(jnp.float32)
    return {"nll_sum": (nll * w).sum(), "weight": w.sum()}


def _loss(totals: dict) -> np.ndarray:
    return np.asarray(totals["nll_sum"] / np.maximum(totals["weight"], 1.0))


def _val_sums(forward, params, batches) -> dict:
    """``head_sums`` totals of every member over ``batches`` (``forward(params, batch)[1]``)."""
    totals = None
    for b in batches:
        totals = _add(totals, forward(params, b)[1])
    return totals


def initial_params(study: common.Study, init_params) -> dict:
    """The members' parameters at step 0, as ``ensemble.create`` draws them (member i: the first half
    of ``split(key_i)``): the untrained baseline of the head statistics. Init runs once: compiled for
    compilation speed (as ``experiments.common.init_state``; 5x less compile time on the CPU)."""
    init = jax.vmap(lambda key: init_params(jax.random.split(key)[0]))
    return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(study.keys())


def _map_rows(weights: jax.Array, k: int) -> jax.Array:
    """Rows 0..k-1 of weights [L, B, N, T, S] -> [k, L, N, T, S]."""
    return jnp.moveaxis(weights[:, :k], 1, 0)


def mt_arm(study: common.Study, arm: str, task: exp_common.Task, toks: dict, train_pairs: list, s: dict) -> dict:
    cfg = task.model
    batches = data.Seq2SeqBatches(data.encode_pairs(train_pairs, toks["de"], toks["en"]),
                                  batch_tokens=s["batch_tokens"], seed=0, max_len=s["max_tokens"],
                                  pad_to_multiple=s["pad_to"], fixed_shapes=True)
    val_ids = data.encode_pairs(task.val_pairs[:s["val_sentences"] or None], toks["de"], toks["en"])
    width = fit_width([max(len(a), len(b) + 1) for a, b in val_ids], s["pad_to"], s["max_tokens"])
    val = fixed_pairs(val_ids, width, 64)
    chosen = mt_pairs(task, s["mt_sentences"])
    chosen_ids = [(sentence_ids(toks["de"], de)[:width], sentence_ids(toks["en"], en)[:width - 1])
                  for de, en in chosen]  # cut to the model's width: a long sentence still gets its map
    shown = fixed_pairs(chosen_ids, width, 64)[0]
    k = len(chosen)

    @jax.jit
    def forward(params, b):
        """Every member on batch ``b``: loss sums, head sums, and the weights of rows 0..k-1."""
        def one(p):
            logits, aux = jformer.seq2seq_apply(p, b["src"], b["tgt_in"], cfg=cfg, exe=EXE, return_attention=True)
            a, src_ok, tgt_ok = aux["attention"], b["src"] != data.PAD, b["tgt_in"] != data.PAD
            sums = {"encoder": head_sums(a["encoder"], src_ok, src_ok),
                    "decoder_self": head_sums(a["decoder_self"], tgt_ok, tgt_ok, causal=True),
                    "cross": head_sums(a["decoder_cross"], tgt_ok, src_ok)}
            maps = {"encoder": _map_rows(a["encoder"], k), "decoder_self": _map_rows(a["decoder_self"], k),
                    "cross": _map_rows(a["decoder_cross"], k)}
            return _nll_sums(logits, b["tgt_out"]), sums, maps
        return jax.vmap(one)(params)

    def evaluate(ens):
        totals = None
        for b in val:
            totals = _add(totals, forward(ens.state.params, b)[0])
        return {"loss": _loss(totals)}

    def extra(ens):
        stats, init = ({kind: _per_seed(head_means(t)) for kind, t in _val_sums(forward, params, val).items()}
                       for params in (ens.state.params, initial_params(study, task.init_params)))
        weights = forward(ens.state.params, shown)[2]  # {kind: [S, k, L, N, T, S]}
        state0 = jformer.ensemble.member(ens, 0)
        maps = []
        for r, ((de, en), (src, tgt)) in enumerate(zip(chosen, chosen_ids)):
            tgt_in = [data.BOS, *tgt]
            n, t = len(src), len(tgt_in)
            a = {kind: np.asarray(w[0, r]) for kind, w in weights.items()}  # member 0
            hyp = None if study.quick else toks["en"].decode(exp_common.translate(task, state0, [src])[0])
            maps.append({"source": de, "reference": en, "translation": hyp,
                         "source_tokens": token_labels(toks["de"], src),
                         "target_tokens": token_labels(toks["en"], tgt_in),
                         "encoder": a["encoder"][..., :n, :n].round(4).tolist(),
                         "decoder_self": a["decoder_self"][..., :t, :t].round(4).tolist(),
                         "cross": a["cross"][..., :t, :n].round(4).tolist()})
        return {"head_stats": stats, "head_stats_init": init, "maps": maps, "train_examples": len(batches),
                "val_rows": int(sum((b["tgt_in"] != data.PAD).sum() for b in val))}

    steps = s["mt_steps"]
    return common.train_arm(
        study, arm, init_params=task.init_params, loss_fn=task.loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.0, b2=0.98, decay="kernels"), steps=steps,
        batch=shared_seq2seq_batches(batches), evaluate=evaluate, eval_every=max(1, steps // 2),
        batch_axis=None, extra=extra)


def mt_pairs(task: exp_common.Task, sentences) -> list[tuple[str, str]]:
    """The validation pairs of German ``sentences`` (the first validation pair if none is found)."""
    found = [next(p for p in task.val_pairs if p[0] == de) for de in sentences
             if any(p[0] == de for p in task.val_pairs)]
    return found or task.val_pairs[:1]


def lm_arm(study: common.Study, arm: str, tok: data.SubwordTokenizer, train_en: list[str], val_en: list[str],
           s: dict) -> dict:
    cfg = lm_model(s, tok.vocab_size)
    steps, seq_len = s["lm_steps"], s["lm_seq_len"]
    train = lm_stream(tok, train_en)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, exe=EXE, accuracy=False)
    sample = val_en[:s["val_sentences"] or None]
    width = fit_width([len(ids) + 1 for ids in tok.encode_batch(sample)], s["pad_to"], cfg.max_len)
    rows = lm_rows(tok, sample, width, 64)

    def init_params(key):
        return jformer.init_lm(key, cfg)
    shown = lm_rows(tok, list(s["lm_sentences"]), width, 64)[0]
    k = len(s["lm_sentences"])

    @jax.jit
    def forward(params, x):
        """Every member on rows ``x`` (BOS + caption): next-piece loss sums, head sums, rows 0..k-1's weights."""
        def one(p):
            logits, aux = jformer.lm_apply(p, x, cfg=cfg, exe=EXE, return_attention=True)
            ok = x != data.PAD
            targets = jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], data.PAD)], axis=1)
            return (_nll_sums(logits, targets), head_sums(aux["attention"], ok, ok, causal=True),
                    _map_rows(aux["attention"], k))
        return jax.vmap(one)(params)

    def evaluate(ens):
        totals = None
        for x in rows:
            totals = _add(totals, forward(ens.state.params, x)[0])
        return {"loss": _loss(totals)}

    def extra(ens):
        stats, init = (_per_seed(head_means(_val_sums(forward, params, rows)))
                       for params in (ens.state.params, initial_params(study, init_params)))
        weights = np.asarray(forward(ens.state.params, shown)[2][0])  # member 0: [k, L, N, T, T]
        maps = []
        for r, text in enumerate(s["lm_sentences"]):
            ids = [data.BOS, *sentence_ids(tok, text)][:width]
            n = len(ids)
            maps.append({"text": text, "tokens": token_labels(tok, ids),
                         "lm": weights[r][..., :n, :n].round(4).tolist()})
        return {"head_stats": {"lm": stats}, "head_stats_init": {"lm": init}, "maps": maps,
                "val_rows": int(sum((x != data.PAD).sum() for x in rows))}

    return common.train_arm(
        study, arm, init_params=init_params, loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.1), steps=steps,
        batch=common.member_lm_batches(train, S=study.S, batch_size=s["lm_batch"], seq_len=seq_len),
        evaluate=evaluate, eval_every=max(1, steps // 2), extra=extra)


# ------------------------------------------------------------------------ study


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--mt-steps", type=int, default=2000, help="Multi30k steps (batches of 1024 token slots)"),
        p.add_argument("--lm-steps", type=int, default=1200, help="English LM steps (batch 16 x 64)")))
    s = settings(study.quick, args)
    suffix = "-quick" if study.quick else ""  # a quick run never resumes into a full one
    cfg = mt_config(s)
    workdir = study.out / f"tokenizers{suffix}"
    task = exp_common.build_task(cfg, workdir)
    toks = {lang: data.SubwordTokenizer.load(workdir / f"spm_{lang}.model") for lang in ("de", "en")}
    root = data.default_data_dir() / "multi30k"
    train_pairs = data.read_parallel(root / "train.de", root / "train.en")[:s["num_examples"] or None]
    train_en, val_en = [t for _, t in train_pairs], [t for _, t in task.val_pairs]

    # The LM first: it is the cheaper arm, so a run cut by --max-minutes has at least it (a rerun resumes).
    arms = common.run_arms(study, [f"lm{suffix}", f"mt{suffix}"], lambda arm: (
        mt_arm(study, arm, task, toks, train_pairs, s) if arm.startswith("mt")
        else lm_arm(study, arm, toks["en"], train_en, val_en, s)))
    mt, lm = arms[f"mt{suffix}"], arms[f"lm{suffix}"]

    head = {**(mt["head_stats"] if mt else {}), **(lm["head_stats"] if lm else {})}
    head_init = {**(mt["head_stats_init"] if mt else {}), **(lm["head_stats_init"] if lm else {})}
    verdicts = make_verdicts(head, head_init)
    plot_maps(study.out, mt, lm)
    if head:
        plot_head_stats(study.out / "head_stats.png", head, head_init)
    notes = ("Head statistics are token-weighted means over the validation sample's real query positions; "
             "arrays in summary.json are [layers, heads, seeds]. Decoder maps are teacher-forced on the "
             "reference (row i: decoder input i, which predicts target token i + 1). Head indices are "
             "arbitrary per seed: compare ranks, not indices, across seeds.")
    return common.finish(
        study, settings={**s, "mt_model": task.model, "lm_model": lm_model(s, toks["en"].vocab_size),
                         "mt_batches": "shared by all members (length-bucketed, up to batch_tokens slots)",
                         "lm_data": "English side of the Multi30k training set, BOS + pieces per caption"},
        arms=arms, table=table(head, head_init, mt, lm), verdicts=verdicts, notes=notes, head_stats=head,
        head_stats_init=head_init)


def make_verdicts(head: dict, head_init: dict) -> list[dict]:
    verdicts = []
    if "cross" in head:
        c = np.mean(head["cross"]["entropy"], axis=(0, 1))
        metric = "entropy (nats, mean over layers, heads, queries)"
        verdicts.append(common.verdict(
            "MT cross-attention is more concentrated than uniform over the source (entropy < log S)",
            "cross-attention", c, "uniform", head["cross"]["uniform_entropy"], metric=metric))
        verdicts.append(common.verdict(
            "training concentrates the MT cross-attention (entropy trained < at initialisation)",
            "trained", c, "initialisation", np.mean(head_init["cross"]["entropy"], axis=(0, 1)), metric=metric))
    if "lm" in head:
        lm = head["lm"]
        best = np.max(np.asarray(lm["previous"]), axis=(0, 1))
        S = len(best)
        verdicts.append(common.verdict(
            f"the English LM has a previous-token head (some head's mean weight on token i-1 > {PREVIOUS_HEAD})",
            "threshold", [PREVIOUS_HEAD] * S, "best head", best, metric="weight on the previous token"))
        d = np.asarray(lm["distance"]).mean(1)  # [L, S]
        if len(d) > 1:
            verdicts.append(common.verdict(
                "the English LM attends farther in its last layer than its first (mean |i - j|)",
                "layer 1", d[0], f"layer {len(d)}", d[-1], metric="mean attended distance (tokens)"))
    return verdicts


def table(head: dict, head_init: dict, mt: dict | None, lm: dict | None) -> str:
    lines = ["| arm | steps | params / member | val loss (nats/token) | seconds |", "| --- | --- | --- | --- | --- |"]
    for name, r in (("Multi30k de->en", mt), ("English LM", lm)):
        if r:
            lines.append(f"| {name} | {r['steps']} | {r['params']:,} | {common.fmt(r['final']['loss'])} | "
                         f"{r['seconds']:.0f} |")
        else:
            lines.append(f"| {name} | not run | | | |")
    lines += ["", "Per layer, mean ± sd over seeds; 'lowest' is the most concentrated head of the layer, 'at "
              "init' the mean entropy of the same members before training, 'prev max' the head with most weight "
              "on token i-1.", "",
              "| attention | layer | entropy (mean of heads) | lowest head | at init | uniform log n | distance | "
              "prev max |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, label in KINDS.items():
        if kind not in head:
            continue
        h = {k: np.asarray(v) for k, v in head[kind].items()}
        h0 = np.asarray(head_init[kind]["entropy"])
        for layer in range(h["entropy"].shape[0]):
            prev = common.fmt(h["previous"][layer].max(0), 2) if kind in SELF_KINDS else "-"
            lines.append(f"| {label} | {layer + 1} | {common.fmt(h['entropy'][layer].mean(0), 2)} | "
                         f"{common.fmt(h['entropy'][layer].min(0), 2)} | {common.fmt(h0[layer].mean(0), 2)} | "
                         f"{common.fmt(h['uniform_entropy'], 2)} | "
                         f"{common.fmt(h['distance'][layer].mean(0), 2)} | {prev} |")
    if mt:
        lines += ["", "Member 0's greedy translations of the mapped sentences:", ""]
        lines += [f"- {m['source']} -> {m['translation'] or '(not decoded in --quick)'} "
                  f"(reference: {m['reference']})" for m in mt["maps"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------ plots


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_grid(path: pathlib.Path, weights, query_labels: list[str], key_labels: list[str], title: str) -> None:
    """Heatmaps of ``weights`` [L, N, T, S]: rows = layers, columns = heads, axes labelled with tokens."""
    plt = _plt()
    w = np.asarray(weights)
    L, N, T, S = w.shape
    cell = 0.6 + 0.16 * max(T, S)
    fig, axes = plt.subplots(L, N, figsize=(cell * N + 1.0, cell * L + 0.6), squeeze=False)
    for layer in range(L):
        for head in range(N):
            ax = axes[layer, head]
            ax.imshow(w[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            # tick labels on the outer axes only (matplotlib's ticks are what make a grid slow to draw)
            if layer == L - 1:
                ax.set_xticks(range(S), key_labels, rotation=90, fontsize=6)
            else:
                ax.set_xticks([])
            if head == 0:
                ax.set_yticks(range(T), query_labels, fontsize=6)
            else:
                ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head + 1}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=8)
    fig.suptitle(f"{title}\n(weights: colour 0 to 1; rows queries, columns keys)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_maps(out: pathlib.Path, mt: dict | None, lm: dict | None) -> list[pathlib.Path]:
    paths = []
    for k, m in enumerate(mt["maps"] if mt else []):
        src, tgt = m["source_tokens"], m["target_tokens"]
        for kind, q, key, what in (("encoder", src, src, "encoder self-attention"),
                                   ("decoder_self", tgt, tgt, "decoder self-attention (teacher-forced)"),
                                   ("cross", tgt, src, "cross-attention: rows English input, columns German")):
            paths.append(out / f"mt_{kind}_{k}.png")
            plot_grid(paths[-1], m[kind], q, key, f"Multi30k member 0, {what}\n{m['source']} / {m['reference']}")
    for k, m in enumerate(lm["maps"] if lm else []):
        paths.append(out / f"lm_{k}.png")
        plot_grid(paths[-1], m["lm"], m["tokens"], m["tokens"], f"English LM member 0\n{m['text']}")
    return paths


def plot_head_stats(path: pathlib.Path, head: dict, head_init: dict) -> None:
    """Entropy, distance and previous-token weight per layer (rows) for each attention kind (columns):
    heads ranked within each (layer, seed) by the value, mean ± sd over seeds per rank."""
    plt = _plt()
    kinds = [k for k in KINDS if k in head]
    metrics = (("entropy", "entropy (nats)"), ("distance", "mean |i - j|"), ("previous", "weight on i-1"))
    fig, axes = plt.subplots(3, len(kinds), figsize=(3.6 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        h = {k: np.asarray(v) for k, v in head[kind].items()}
        L, N, S = h["entropy"].shape
        layers = np.arange(1, L + 1)
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row, col]
            if metric == "previous" and kind not in SELF_KINDS:
                ax.axis("off")
                continue
            ranked = np.sort(h[metric], axis=1)  # [L, N, S]: rank r within each (layer, seed)
            for r in range(N):
                sd = ranked[:, r].std(1, ddof=1) if S > 1 else np.zeros(L)
                ax.errorbar(layers, ranked[:, r].mean(1), yerr=sd, marker="o", ms=3, capsize=2, alpha=0.8,
                            label=f"rank {r + 1}")
            if metric == "entropy":
                ax.axhline(np.mean(h["uniform_entropy"]), color="k", ls="--", lw=1, label="uniform")
                ax.plot(layers, np.asarray(head_init[kind]["entropy"]).mean((1, 2)), color="gray", ls=":",
                        marker="x", label="at init (mean)")
            ax.set_xticks(layers)
            ax.set(xlabel="layer", ylabel=label)
            if row == 0:
                ax.set_title(KINDS[kind], fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=6)
    fig.suptitle("Per-head attention statistics (heads ranked per layer and seed; mean ± sd over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
