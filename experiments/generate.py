"""Generate from a trained run: text from a language model, translations from a seq2seq model.

    python -m experiments.generate --workdir runs/shakespeare --prompt "ROMEO:" --max-new-tokens 300
    python -m experiments.generate --workdir runs/multi30k "Ein Hund läuft im Schnee."   (or sentences on stdin)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

from experiments import common, evaluate
from jformer import decoding


def generate_text(task, state, prompt: list[int], args) -> list[int]:
    """Sample ``args.max_new_tokens`` tokens after ``prompt``, past the model's context if need be.

    The KV cache holds at most ``max_len`` positions, so longer texts are made in
    chunks: each chunk conditions on the last half-window of tokens (a sliding
    window, as nanoGPT crops its context) and fills the other half.
    """
    window = task.model.max_len
    tokens, key = list(prompt), jax.random.key(args.seed)
    while len(tokens) - len(prompt) < args.max_new_tokens:
        context = tokens[-(window // 2):]
        n = min(window - len(context), args.max_new_tokens - (len(tokens) - len(prompt)))
        key, sub = jax.random.split(key)
        out = decoding.generate_lm(
            state.params, np.asarray([context], np.int32), cfg=task.model, exe=task.cfg.exe, max_new_tokens=n,
            key=None if args.temperature == 0 else sub, temperature=args.temperature or 1.0,
            top_k=args.top_k, top_p=args.top_p, state=state.model_state or None)
        tokens += np.asarray(out)[0, len(context):].tolist()
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=pathlib.Path)
    ap.add_argument("sources", nargs="*", help="sentences to translate (seq2seq runs); default: stdin")
    ap.add_argument("--prompt", default="\n", help="LM prompt")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--beam-size", type=int, default=4, help="seq2seq: 1 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = common.load_config(args.workdir)
    task = common.build_task(cfg, args.workdir)
    state, _, _ = evaluate.pick_checkpoint(args.workdir, task, "best")  # params and BatchNorm statistics only

    if cfg.kind == "lm":
        print(task.decode(generate_text(task, state, task.encode(args.prompt), args)))
        return 0
    sources = args.sources or [line.strip() for line in sys.stdin if line.strip()]
    for src, ids in zip(sources, common.translate(task, state, [task.encode(s) for s in sources],
                                                  beam_size=args.beam_size)):
        print(f"{src}\n  -> {task.decode(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
