"""Evaluate a trained run: validation loss and perplexity; BLEU (Multi30k) or accuracy (generated tasks).

    python -m experiments.evaluate --workdir DIR [--checkpoint best|latest] [--splits val,test] [--beam-size 4]

The checkpoint is the best by validation loss (the one the Checkpointer keeps),
never one chosen by a test score; ``eval.json`` says which step and why.

Multi30k: every split (default validation and test2016 flickr) is decoded with
greedy search and with beam search. Each hypothesis set is saved, detokenized,
one line per source sentence, as ``DIR/hypotheses/{split}-{greedy|beam4}.en``
and scored twice: cased detokenized sacreBLEU (0-100, with its signature), and
the PyTorch tutorial's metric (``tutorial_bleu``, 0-1: lowercased spaCy English
tokens, torchtext's ``bleu_score``). Language models: the validation loss at
each ``--contexts`` length (contiguous windows, every character scored once, so
runs trained with different contexts compare at the same one), and nanoGPT's
estimator (the mean loss of ``--nanogpt-batches`` random batches of 12 windows,
seeded). Generated tasks: greedy token and
exact-sequence accuracy on held-out examples. Every number, with the decoding
time of each setting, is printed and written to ``DIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

import jformer
from experiments import common
from jformer import data, training
from jformer.checkpoint import Checkpointer

TUTORIAL_BLEU = ("torchtext bleu_score (corpus BLEU-4, clipped n-gram precisions n=1..4, uniform weights, "
                 "brevity penalty, no smoothing) on spaCy English tokens (spacy.blank('en')), lowercased; "
                 "0-1 scale")


def pick_checkpoint(workdir: pathlib.Path, task, which: str):
    """(state, step, reason): the ``best`` checkpoint by validation loss (falling back to the
    latest, with the reason, if no checkpoint recorded one) or the ``latest``.

    Only the parameters and BatchNorm statistics are read (``Checkpointer.restore_params``,
    checksums verified): the state has no optimizer state and no PRNG key, it only evaluates."""
    params, model_state = jax.eval_shape(lambda: _init_params_and_state(task))  # templates: shapes only
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        restored, reason = None, ""
        if which == "best":
            restored = ckpt.restore_params(params, model_state, best=True)
            if restored is not None:
                step = restored[2]
                val = (ckpt.metrics(step) or {}).get("val_loss")
                reason = (f"the lowest validation loss (val_loss {val:.4f} at step {step}) among the kept "
                          "checkpoints; test scores play no part in the choice")
            else:
                reason = "latest checkpoint: no checkpoint recorded a validation loss"
        if restored is None:
            restored = ckpt.restore_params(params, model_state)
            if restored is not None and which == "latest":
                reason = "the latest checkpoint, as asked (--checkpoint latest)"
    finally:
        ckpt.close()
    if restored is None:
        raise SystemExit(f"no checkpoint in {workdir / 'checkpoints'}")
    params, model_state, step = restored
    state = training.TrainState(step=np.int32(step), params=params, opt_state=None, model_state=model_state,
                                key=None)
    return state, int(step), reason


def _init_params_and_state(task):
    params = task.init_params(jax.random.key(0))
    return params, jformer.init_state(params, task.model)


def score_translations(task, state, split: str, pairs: list[tuple[str, str]], settings: dict[str, int],
                       workdir: pathlib.Path) -> dict:
    """Decode the sources of ``pairs`` with each ``settings`` (name -> beam size; 1 is greedy),
    write the hypotheses to ``workdir/hypotheses/{split}-{name}.en``, and return per setting
    the sacreBLEU score and signature, the tutorial's BLEU and the decoding time."""
    sources = [task.encode(src) for src, _ in pairs]
    refs = [ref for _, ref in pairs]
    out = {}
    for name, size in settings.items():
        t0 = time.perf_counter()
        # One line per source: a newline inside a hypothesis would shift every later line.
        hyps = [" ".join(task.decode(ids).split()) for ids in common.translate(task, state, sources, beam_size=size)]
        seconds = time.perf_counter() - t0
        path = workdir / "hypotheses" / f"{split}-{name}.en"
        path.parent.mkdir(exist_ok=True)
        data.write_text_atomic(path, "".join(h + "\n" for h in hyps))
        bleu, signature = common.sacrebleu_score(hyps, refs)
        out[name] = {"beam_size": size, "sacrebleu": bleu, "sacrebleu_signature": signature,
                     "tutorial_bleu": common.tutorial_bleu(hyps, refs), "decode_seconds": seconds,
                     "sentences": len(hyps), "hypotheses": str(path.relative_to(workdir))}
        print(f"{split} {name}: sacreBLEU {bleu:.2f}, tutorial BLEU {out[name]['tutorial_bleu']:.4f}, "
              f"{seconds:.1f} s -> {path}")
    for (src, ref), hyp in list(zip(pairs, hyps))[:2]:
        print(f"  {src}\n    -> {hyp}\n    (reference: {ref})")
    return out


def lm_context_losses(task, state, context: int, nanogpt_batches: int, batch_size: int = 12,
                      seed: int = 1337) -> dict:
    """Validation loss (nats/token) of an LM at one context length, by two estimators.

    ``val_loss``: every position of the validation stream scored once, in contiguous
    windows of ``context`` tokens (``data.lm_eval_batches``). ``val_loss_nanogpt``:
    nanoGPT's ``estimate_loss``, the mean over ``nanogpt_batches`` batches of
    ``batch_size`` windows at uniform random offsets (numpy seed ``seed``), each
    batch's mean loss weighted equally.
    """
    eval_step = training.make_eval_step(task.loss_fn)

    def mean_loss(batches):
        return common.evaluate_loss(task, eval_step, state, batches=batches)["val_loss"]

    tokens = task.val_tokens
    rng = np.random.default_rng(seed)
    per_batch = []
    for _ in range(nanogpt_batches):
        starts = rng.integers(0, len(tokens) - context - 1, batch_size)
        window = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
        per_batch.append(mean_loss([{"inputs": window[:, :-1], "targets": window[:, 1:]}]))
    return {"val_loss": mean_loss(data.lm_eval_batches(tokens, 64, context)),
            "val_loss_nanogpt": float(np.mean(per_batch)),
            "val_loss_nanogpt_batch_sd": float(np.std(per_batch, ddof=1)) if len(per_batch) > 1 else None,
            "nanogpt_batches": nanogpt_batches, "nanogpt_seed": seed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=pathlib.Path)
    ap.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                    help="best: lowest validation loss (default); latest: the last saved")
    ap.add_argument("--beam-size", type=int, default=None, help="default: the run's config (4)")
    ap.add_argument("--splits", default="val,test", help="multi30k: comma-separated, of val and test")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N examples of each split only")
    ap.add_argument("--contexts", default="", help="LM: comma-separated context lengths to score the "
                                                   "validation split at (default: the run's seq_len)")
    ap.add_argument("--nanogpt-batches", type=int, default=20,
                    help="LM: random validation batches (12 windows each) of nanoGPT's estimate_loss")
    args = ap.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or set(splits) - {"val", "test"}:
        ap.error(f"--splits must list val and/or test, got {args.splits!r}")
    if args.beam_size is not None and args.beam_size < 1:
        ap.error(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.limit < 0:
        ap.error(f"--limit must be >= 0, got {args.limit}")

    cfg = common.load_config(args.workdir)
    task = common.build_task(cfg, args.workdir)
    state, step, reason = pick_checkpoint(args.workdir, task, args.checkpoint)
    results = {"task": cfg.task, "step": step, "checkpoint": args.checkpoint, "checkpoint_reason": reason,
               **common.evaluate_loss(task, training.make_eval_step(task.loss_fn), state)}
    results["val_loss_batches"] = cfg.eval_batches or "all"  # the run's eval_batches: 0 is the whole set
    if args.limit:
        results["limit"] = args.limit

    beam = args.beam_size or cfg.beam_size
    if task.test_pairs is not None:  # Multi30k: BLEU on validation and test2016
        settings = {"greedy": 1, **({f"beam{beam}": beam} if beam > 1 else {})}
        results.update(length_penalty=cfg.length_penalty, tutorial_bleu_definition=TUTORIAL_BLEU,
                       references={"val": "multi30k/val.en", "test": "multi30k/test_2016_flickr.en"},
                       decode_seconds_note="wall time of translate(), XLA compilation included")
        results["translation"] = {}
        for split in splits:
            pairs = task.val_pairs if split == "val" else task.test_pairs
            pairs = pairs[:args.limit] if args.limit else pairs
            results["translation"][split] = score_translations(task, state, split, pairs, settings, args.workdir)
    elif task.val_tokens is not None:  # LM: the same quantity at several contexts and estimators
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()] or [cfg.seq_len]
        too_long = [c for c in contexts if not 1 <= c <= task.model.max_len]
        if too_long:
            ap.error(f"--contexts {too_long} must be in [1, max_len={task.model.max_len}] of this model")
        results["lm"] = {str(c): lm_context_losses(task, state, c, args.nanogpt_batches) for c in contexts}
    elif cfg.kind == "seq2seq":  # generated tasks: held-out greedy accuracy
        pairs = data.synthetic_pairs(cfg.task, args.limit or 1000, seed=cfg.seed + 1, min_len=cfg.min_len,
                                     max_len=cfg.max_len, num_symbols=cfg.num_symbols)
        t0 = time.perf_counter()
        preds = common.translate(task, state, [s for s, _ in pairs])
        results["decode_seconds_greedy"] = time.perf_counter() - t0
        hits = [sum(p == t for p, t in zip(pred, tgt)) for pred, (_, tgt) in zip(preds, pairs)]
        results["greedy_token_accuracy"] = float(np.sum(hits) / sum(len(t) for _, t in pairs))
        results["greedy_exact_accuracy"] = float(np.mean([pred == tgt for pred, (_, tgt) in zip(preds, pairs)]))
    common.write_json(args.workdir / "eval.json", results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
