"""Evaluate a trained run: validation loss and perplexity; BLEU (Multi30k) or accuracy (generated tasks).

    python -m experiments.evaluate --workdir DIR [--checkpoint best|latest] [--beam-size 4]

Multi30k: detokenized sacreBLEU on test2016 (flickr) with greedy and beam
search. Generated tasks: greedy token and exact-sequence accuracy on held-out
examples. Results are printed and written to ``DIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from experiments import common
from jformer import data, training


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=pathlib.Path)
    ap.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    ap.add_argument("--beam-size", type=int, default=None, help="default: the run's config (4)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N test examples only")
    args = ap.parse_args(argv)

    cfg = common.load_config(args.workdir)
    task = common.build_task(cfg, args.workdir)
    tx, _ = common.make_optimizer(cfg, task.model)
    template = common.init_state(task, tx)
    restored = common.restore(args.workdir, template, best=args.checkpoint == "best")
    if restored is None and args.checkpoint == "best":
        restored = common.restore(args.workdir, template)
    if restored is None:
        raise SystemExit(f"no checkpoint in {args.workdir / 'checkpoints'}")
    state, _, step = restored
    results = {"step": int(step), "checkpoint": args.checkpoint,
               **common.evaluate_loss(task, training.make_eval_step(task.loss_fn), state)}

    beam = args.beam_size or cfg.beam_size
    if task.test_pairs is not None:  # Multi30k: BLEU on test2016
        import sacrebleu

        pairs = task.test_pairs[:args.limit] if args.limit else task.test_pairs
        sources = [task.encode(src) for src, _ in pairs]
        refs = [ref for _, ref in pairs]
        for name, size in (("greedy", 1), (f"beam{beam}", beam)):
            t0 = time.perf_counter()
            hyps = [task.decode(ids) for ids in common.translate(task, state, sources, beam_size=size)]
            results[f"bleu_{name}"] = sacrebleu.corpus_bleu(hyps, [refs]).score
            results[f"decode_seconds_{name}"] = time.perf_counter() - t0
        for (src, ref), hyp in list(zip(pairs, hyps))[:3]:
            print(f"  {src}\n    -> {hyp}\n    (reference: {ref})")
    elif cfg.kind == "seq2seq":  # generated tasks: held-out greedy accuracy
        pairs = data.synthetic_pairs(cfg.task, args.limit or 1000, seed=cfg.seed + 1, min_len=cfg.min_len,
                                     max_len=cfg.max_len, num_symbols=cfg.num_symbols)
        preds = common.translate(task, state, [s for s, _ in pairs])
        hits = [sum(p == t for p, t in zip(pred, tgt)) for pred, (_, tgt) in zip(preds, pairs)]
        results["greedy_token_accuracy"] = float(np.sum(hits) / sum(len(t) for _, t in pairs))
        results["greedy_exact_accuracy"] = float(np.mean([pred == tgt for pred, (_, tgt) in zip(preds, pairs)]))
    common.write_json(args.workdir / "eval.json", results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
