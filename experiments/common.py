"""What train / evaluate / generate share: a run directory, its data, model and checkpoints.

A run directory holds ``config.json``, the tokenizers, ``checkpoints/``,
``metrics.jsonl``, TensorBoard event files and PNG plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable

import jax
import numpy as np

import jformer
from jformer import data, decoding, parallel, training
from jformer.checkpoint import Checkpointer
from experiments.config import ExperimentConfig


@dataclass
class Task:
    """A configured experiment: its model config, data and model functions."""

    cfg: ExperimentConfig
    model: jformer.TransformerConfig          # with the vocabulary sizes filled in
    train_batches: object                     # iterator with state() / restore(state)
    val_batches: Callable[[], Iterable[dict]]  # a fresh deterministic pass over validation data
    loss_fn: Callable                         # training.lm_loss / seq2seq_loss with cfg bound
    init_params: Callable                     # key -> params
    encode: Callable[[str], list[int]]        # text -> source / prompt ids
    decode: Callable[[list[int]], str]        # target ids -> text
    test_pairs: list[tuple[str, str]] | None = None  # raw (source, reference) text, multi30k
    val_pairs: list[tuple[str, str]] | None = None   # the same for the validation set, multi30k
    val_tokens: np.ndarray | None = None              # the validation stream, LM tasks


# Batches of a few fixed shapes (lengths rounded to 16, rows padded to the batch size):
# each distinct shape is one XLA compilation of the train step.
FIXED_SHAPES = {"pad_to_multiple": 16, "fixed_shapes": True}


def _eval_pass(batches, limit: int):
    return (b for i, b in enumerate(batches) if not limit or i < limit)


def build_task(cfg: ExperimentConfig, workdir: pathlib.Path) -> Task:
    """Load (or create and save, on first use) the tokenizers and data of ``cfg.task``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.task == "shakespeare":
        text = data.read_text(data.default_data_dir() / "tinyshakespeare" / "input.txt")
        tok_path = workdir / "tokenizer.json"
        if not tok_path.exists():
            data.CharTokenizer.fit(text).save(tok_path)
        tok = data.CharTokenizer.load(tok_path)
        tokens = np.asarray(tok.encode(text), np.int32)
        train_tokens, val_tokens = data.train_val_split(tokens, 0.1)
        model = cfg.model.replace(vocab_size=tok.vocab_size, max_len=max(cfg.model.max_len, cfg.seq_len))
        return Task(
            cfg=cfg, model=model,
            train_batches=data.LMBatches(train_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                         seed=cfg.seed),
            val_batches=lambda: _eval_pass(data.lm_eval_batches(val_tokens, 64, cfg.seq_len), cfg.eval_batches),
            loss_fn=functools.partial(training.lm_loss, cfg=model, exe=cfg.exe, label_smoothing=cfg.label_smoothing),
            init_params=lambda key: jformer.init_lm(key, model),
            encode=tok.encode, decode=tok.decode, val_tokens=val_tokens)

    if cfg.task == "multi30k":
        root = data.default_data_dir() / "multi30k"
        train_pairs = data.read_parallel(root / "train.de", root / "train.en")
        train_pairs = train_pairs[:cfg.num_examples] if cfg.num_examples else train_pairs
        val_pairs = data.read_parallel(root / "val.de", root / "val.en")
        test_pairs = data.read_parallel(root / "test_2016_flickr.de", root / "test_2016_flickr.en")
        toks = {}
        for side, lang in ((0, "de"), (1, "en")):
            prefix = workdir / f"spm_{lang}"
            if not pathlib.Path(f"{prefix}.model").exists():
                data.SubwordTokenizer.train([p[side] for p in train_pairs], cfg.vocab_size, prefix)
            toks[lang] = data.SubwordTokenizer.load(f"{prefix}.model")

        def encode_pairs(pairs):
            return [(toks["de"].encode(s), toks["en"].encode(t)) for s, t in pairs]

        model = cfg.model.replace(src_vocab_size=toks["de"].vocab_size, vocab_size=toks["en"].vocab_size,
                                  max_len=max(cfg.model.max_len, cfg.max_tokens + 2))
        size = {"batch_tokens": cfg.batch_tokens} if cfg.batch_tokens else {"batch_size": cfg.batch_size}
        size.update(FIXED_SHAPES)
        val = encode_pairs(val_pairs)
        return Task(
            cfg=cfg, model=model,
            train_batches=data.Seq2SeqBatches(encode_pairs(train_pairs), seed=cfg.seed, max_len=cfg.max_tokens,
                                              **size),
            val_batches=lambda: _eval_pass(
                data.Seq2SeqBatches(val, seed=0, shuffle=False, max_len=cfg.max_tokens, **size).epoch_batches(),
                cfg.eval_batches),
            loss_fn=functools.partial(training.seq2seq_loss, cfg=model, exe=cfg.exe,
                                      label_smoothing=cfg.label_smoothing),
            init_params=lambda key: jformer.init_seq2seq(key, model),
            encode=toks["de"].encode, decode=toks["en"].decode, test_pairs=test_pairs, val_pairs=val_pairs)

    # Generated tasks: no files, no tokenizer.
    def pairs(seed, n):
        return data.synthetic_pairs(cfg.task, n, seed=seed, min_len=cfg.min_len, max_len=cfg.max_len,
                                    num_symbols=cfg.num_symbols)

    model = cfg.model.replace(vocab_size=data.synthetic_vocab_size(cfg.task, cfg.num_symbols))
    val = pairs(cfg.seed + 1, 1000)
    return Task(
        cfg=cfg, model=model,
        train_batches=data.Seq2SeqBatches(pairs(cfg.seed, cfg.num_examples), batch_size=cfg.batch_size,
                                          seed=cfg.seed, **FIXED_SHAPES),
        val_batches=lambda: _eval_pass(
            data.Seq2SeqBatches(val, batch_size=cfg.batch_size, seed=0, shuffle=False,
                                **FIXED_SHAPES).epoch_batches(),
            cfg.eval_batches),
        loss_fn=functools.partial(training.seq2seq_loss, cfg=model, exe=cfg.exe,
                                      label_smoothing=cfg.label_smoothing),
        init_params=lambda key: jformer.init_seq2seq(key, model),
        encode=lambda text: [int(t) for t in text.split()], decode=lambda ids: " ".join(map(str, ids)))


def load_config(workdir: pathlib.Path) -> ExperimentConfig:
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a run directory made by experiments.train?")
    return ExperimentConfig.from_json(path.read_text())


def make_optimizer(cfg: ExperimentConfig, model: jformer.TransformerConfig):
    """(optax transformation, learning-rate schedule) as the experiment config says."""
    return training.make_optimizer(
        cfg.optimizer, learning_rate=cfg.learning_rate, min_learning_rate=cfg.min_learning_rate,
        warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, d_model=model.d_model,
        weight_decay=cfg.weight_decay, decay=cfg.weight_decay_rule, b2=cfg.beta2, eps=cfg.adam_eps,
        clip_norm=cfg.clip_norm,
        accumulate_steps=cfg.accumulate_steps)


def init_state(task: Task, tx, mesh=None) -> training.TrainState:
    """A fresh train state (params, optimizer, BatchNorm statistics, step 0, PRNG key).

    With a ``mesh`` every array is created directly in its shards
    (``jformer.parallel`` rules); without, on the default device.
    """
    def create():
        k_init, k_train = jax.random.split(jax.random.key(task.cfg.seed))
        params = task.init_params(k_init)
        return training.TrainState.create(params, tx, k_train,
                                          model_state=jformer.init_state(params, task.model))

    # Init runs once: compile it for compilation speed, not execution speed.
    options = {"compiler_options": {"xla_backend_optimization_level": 0}}
    if mesh is None:
        return jax.jit(create, **options)()
    return parallel.init_sharded(create, mesh, **options)[0]


def tokenizer_files(run: pathlib.Path) -> list[pathlib.Path]:
    """The tokenizer files a run directory holds: sentencepiece ``spm_*`` or ``tokenizer.json``."""
    return [*run.glob("spm_*"), *run.glob("tokenizer.json")]


def copy_tokenizers(source: pathlib.Path, workdir: pathlib.Path) -> None:
    """Give ``workdir`` the tokenizers of run ``source`` (a warm start must see the same ids)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for path in tokenizer_files(source):
        if not (workdir / path.name).exists():
            shutil.copy(path, workdir / path.name)


def warm_start(task: Task, state: training.TrainState, source: pathlib.Path,
               mesh=None) -> training.TrainState:
    """``state`` with the params and BatchNorm statistics of run ``source``'s best checkpoint.

    The optimizer, step, schedule and data order stay fresh: this is a new run
    (fine-tuning, or a second learning-rate cycle) that starts from trained weights.
    """
    source_cfg = load_config(source)
    if source_cfg.model != task.cfg.model:
        raise ValueError(f"init_from={source}: its model config differs from this run's:\n"
                         f"  {source_cfg.model}\n  {task.cfg.model}")
    # The source's optimizer state has its own structure: restore into a template built like it.
    source_tx, _ = make_optimizer(source_cfg, task.model)
    template = init_state(task, source_tx, mesh)
    restored = restore(source, template, best=True) or restore(source, template)
    if restored is None:
        raise FileNotFoundError(f"init_from={source}: no checkpoint in {source / 'checkpoints'}")
    return state.replace(params=restored[0].params, model_state=restored[0].model_state)


def restore(workdir: pathlib.Path, template: training.TrainState, *, best: bool = False):
    """The run's best or latest good checkpoint: (state, data_state, step), or None if there is none."""
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.restore_best(template) if best else ckpt.restore(template)
    finally:
        ckpt.close()


def evaluate_loss(task: Task, eval_step, state, put=None, batches=None) -> dict:
    """Validation loss (unsmoothed cross-entropy, nats/token), perplexity and accuracy over
    ``batches`` (default ``task.val_batches()``), token-weighted exactly across batches.
    ``put`` places a host batch on the devices (``parallel.shard_batch``), if given."""
    totals = None
    for batch in task.val_batches() if batches is None else batches:
        m = jax.device_get(eval_step(state, put(batch) if put else batch))
        totals = m if totals is None else {k: totals[k] + m[k] for k in totals}
    summary = training.eval_summary(totals)
    return {"val_loss": float(summary["nll"]), "val_perplexity": float(summary["perplexity"]),
            "val_accuracy": float(summary["accuracy"])}


def write_json(path: pathlib.Path, obj) -> None:
    data.write_text_atomic(path, json.dumps(obj, indent=2, default=lambda o: dataclasses.asdict(o)))


def strip_special(ids) -> list[int]:
    """Output ids up to (not including) the first EOS, without padding."""
    out = []
    for i in map(int, ids):
        if i == data.EOS:
            break
        if i not in (data.PAD, data.BOS):
            out.append(i)
    return out


def translate(task: Task, state, sources: list[list[int]], *, beam_size: int = 1, max_len: int | None = None,
              batch_size: int = 128) -> list[list[int]]:
    """Decode source id lists with greedy search (``beam_size`` 1) or beam search (length
    penalty ``task.cfg.length_penalty``); returns one target id list per source, in order,
    up to its first EOS. Outputs are at most ``max_len`` tokens (default: the longest source
    plus 16, within the model's ``max_len``)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not sources:
        return []
    model = task.model
    max_len = max_len or min(model.max_len, max(len(s) for s in sources) + 16)
    model_state = state.model_state or None
    outputs = []
    # One source shape for every chunk (rows and width padded), so the decoder compiles once.
    width = -(-max(len(s) for s in sources) // 16) * 16
    batch_size = min(batch_size, len(sources))
    for i in range(0, len(sources), batch_size):
        chunk = sources[i:i + batch_size]
        src = np.full((batch_size, width), data.PAD, np.int32)
        for j, s in enumerate(chunk):
            src[j, :len(s)] = s
        kwargs = dict(cfg=model, exe=task.cfg.exe, bos_id=data.BOS, eos_id=data.EOS, max_len=max_len,
                      state=model_state)
        if beam_size == 1:
            ids = decoding.greedy_decode_seq2seq(state.params, src, **kwargs)
        else:
            ids, _ = decoding.beam_search_seq2seq(state.params, src, beam_size=beam_size,
                                                  alpha=task.cfg.length_penalty, **kwargs)
        outputs += [strip_special(row) for row in np.asarray(ids)[:len(chunk)]]
    return outputs


# ---------------------------------------------------------------- BLEU

def sacrebleu_score(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (0-100) of detokenized, cased ``hypotheses`` against one reference
    each, with sacreBLEU's defaults (13a tokenization, exp smoothing), and the signature
    string that says so (report it with the score: it is what makes scores comparable)."""
    from sacrebleu.metrics import BLEU

    _check_parallel(hypotheses, references)
    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, [references]).score
    return score, str(bleu.get_signature())


@functools.cache
def _spacy_english():
    import spacy

    # spacy.blank needs no model download: the rule-based tokenizer is all the tutorial used.
    return spacy.blank("en")


def tutorial_tokens(text: str) -> list[str]:
    """``text`` as the PyTorch translation tutorial scores it: spaCy's English tokenizer, then
    each token lowercased (torchtext's ``Field(tokenize="spacy", lower=True)`` order).
    Whitespace tokens (spaCy's for runs of spaces) are dropped: they are not words."""
    return [t.text.lower() for t in _spacy_english().tokenizer(text.strip()) if not t.is_space]


def token_bleu(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """torchtext's ``bleu_score`` (0-1) of token-list ``candidates``, each against its list of
    token-list ``references``: corpus-level clipped n-gram precisions for n = 1..4, uniform
    weights, geometric mean, brevity penalty exp(1 - r/c) when c < r (r: per candidate the
    closest reference length), no smoothing (0 if any n has no match).

    Computed by sacrebleu with its tokenizer and smoothing off on space-joined tokens, which
    is the same formula (tested against torchtext's documented example). One difference, at
    equally close references of different lengths only: sacrebleu takes the shorter,
    torchtext the first listed.
    """
    from sacrebleu.metrics import BLEU

    _check_parallel(candidates, references)
    for tokens in [*candidates, *(ref for refs in references for ref in refs)]:
        bad = [t for t in tokens if not t or t != "".join(t.split())]
        if bad:  # joined by spaces and split again, such a token would count as another number of tokens
            raise ValueError(f"tokens must be non-empty and hold no whitespace, got {bad[:3]}")
    n_refs = max((len(refs) for refs in references), default=1)
    # sacrebleu takes reference streams (the k-th reference of every sentence); None marks
    # a sentence with fewer references.
    streams = [[" ".join(refs[k]) if k < len(refs) else None for refs in references] for k in range(n_refs)]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score([" ".join(c) for c in candidates], streams).score / 100.0


def tutorial_bleu(hypotheses: list[str], references: list[str]) -> float:
    """The PyTorch translation tutorial's test BLEU (0-1): ``token_bleu`` of the lowercased
    spaCy tokens (``tutorial_tokens``) of detokenized ``hypotheses`` against one reference each."""
    _check_parallel(hypotheses, references)
    return token_bleu([tutorial_tokens(h) for h in hypotheses], [[tutorial_tokens(r)] for r in references])


def _check_parallel(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
