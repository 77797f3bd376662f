"""Experiment configurations: one frozen dataclass, named presets, ``key=value`` overrides.

    python -m experiments.train --task shakespeare --workdir runs/sh steps=4000 model.num_layers=6
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field

from jformer import ExecConfig, TransformerConfig

EXEC_FIELDS = tuple(f.name for f in dataclasses.fields(ExecConfig))
LM_TASKS = ("shakespeare",)
SEQ2SEQ_TASKS = ("copy", "reverse", "sort", "add", "multi30k")
TASKS = SEQ2SEQ_TASKS + LM_TASKS


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs besides the data files; saved as ``config.json`` in the workdir."""

    task: str = "reverse"
    model: TransformerConfig = field(default_factory=TransformerConfig)
    exe: ExecConfig = field(default_factory=ExecConfig)  # how it runs: may change on resume
    steps: int = 2000
    max_minutes: float = 0.0        # > 0: stop after this much training wall time (evaluate, checkpoint)
    batch_size: int = 64            # sequences per batch (LM, synthetic tasks)
    batch_tokens: int = 0           # if > 0: target tokens per batch (length-bucketed seq2seq)
    seq_len: int = 64               # LM context length
    optimizer: str = "adamw"        # "adamw" (warmup + cosine) or "paper" (Adam 0.9/0.98/1e-9, inverse sqrt)
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    weight_decay_rule: str = "kernels"  # decayed leaves: "kernels", or "matrices" (+ embeddings, nanoGPT's ndim >= 2)
    beta2: float = 0.98
    adam_eps: float = 1e-9          # Adam's ε: the paper's 1e-9; torch / nanoGPT use 1e-8
    clip_norm: float | None = 1.0
    accumulate_steps: int = 1
    label_smoothing: float = 0.0
    eval_every: int = 250
    eval_batches: int = 0           # 0: the whole validation set
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    init_from: str = ""             # run directory whose best checkpoint initialises the weights
    # Data.
    num_examples: int = 20000       # training examples: generated (synthetic tasks) or the first N (multi30k, 0 = all)
    min_len: int = 4
    max_len: int = 12
    num_symbols: int = 16
    vocab_size: int = 8000          # subword vocabulary per language (multi30k)
    max_tokens: int = 64            # longest subword sequence kept (multi30k)
    # Decoding (evaluation).
    beam_size: int = 4
    length_penalty: float = 0.6

    def __post_init__(self):
        """Check every field (type, then range) so that a bad value fails here, in one line naming
        the field, before a run writes anything, rather than as a traceback minutes into it."""
        hints = _type_hints(ExperimentConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        problem = self._range_problem()
        if problem:
            raise ValueError(problem)

    def _range_problem(self) -> str | None:
        """The first out-of-range field as a one-line message naming it and its value (None: all fine)."""
        def bad(name: str, rule: str) -> str:
            return f"{name}={getattr(self, name)!r} is invalid: {rule}"

        if self.task not in TASKS:
            return bad("task", f"must be one of {TASKS}")
        if self.optimizer not in ("adamw", "paper"):
            return bad("optimizer", "must be 'adamw' or 'paper'")
        at_least_one = ("steps", "batch_size", "seq_len", "accumulate_steps", "eval_every", "checkpoint_every",
                        "log_every", "min_len", "max_tokens", "beam_size")
        for name in at_least_one:
            if getattr(self, name) < 1:
                return bad(name, "must be >= 1")
        for name in ("batch_tokens", "eval_batches", "num_examples", "seed", "max_minutes", "weight_decay",
                     "length_penalty"):
            if getattr(self, name) < 0:
                return bad(name, "must be >= 0")
        if not 0 <= self.warmup_steps < self.steps:
            # The common case: a short run (steps=20) with the preset's warmup (100).
            return (f"warmup_steps={self.warmup_steps} is invalid: need 0 <= warmup_steps < steps={self.steps}; "
                    f"override it too, e.g. warmup_steps={max(0, self.steps // 10)}")
        if self.optimizer == "paper" and self.warmup_steps < 1:
            return bad("warmup_steps", "the 'paper' (inverse square root) schedule needs warmup_steps >= 1")
        if not self.learning_rate > 0:  # also catches NaN
            return bad("learning_rate", "must be > 0")
        if not self.min_learning_rate >= 0:
            return bad("min_learning_rate", "must be >= 0")
        if self.optimizer == "adamw" and self.min_learning_rate > self.learning_rate:
            return (f"min_learning_rate={self.min_learning_rate!r} is invalid: the cosine decay ends there, "
                    f"so it must be <= learning_rate={self.learning_rate!r}")
        if self.optimizer == "paper" and self.weight_decay:
            return bad("weight_decay", "the 'paper' optimizer (Adam) has no weight decay; use optimizer=adamw")
        if self.weight_decay_rule not in ("kernels", "matrices"):
            return bad("weight_decay_rule", "must be 'kernels' or 'matrices'")
        if not 0 < self.beta2 < 1:
            return bad("beta2", "must be in (0, 1)")
        if not self.adam_eps > 0:
            return bad("adam_eps", "must be > 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            return bad("clip_norm", "must be > 0, or None for no clipping")
        if not 0 <= self.label_smoothing < 1:
            return bad("label_smoothing", "must be in [0, 1)")
        if self.max_len < self.min_len:
            return f"max_len={self.max_len} is invalid: must be >= min_len={self.min_len}"
        if self.task == "add" and self.min_len < 3:
            return bad("min_len", "task 'add' needs min_len >= 3 (a digit, '+', a digit)")
        if self.batch_tokens and self.task != "multi30k":
            return bad("batch_tokens", "only multi30k batches by tokens; use batch_size (or batch_tokens=0)")
        if self.task in ("copy", "reverse", "sort") and self.num_symbols < 1:
            return bad("num_symbols", "must be >= 1")
        if self.task in ("copy", "reverse", "sort", "add") and self.num_examples < 1:
            return bad("num_examples", f"task {self.task!r} generates its training examples: must be >= 1")
        # sentencepiece reserves 4 ids (pad, bos, eos, unk) and needs room for the characters.
        if self.vocab_size < 16:
            return bad("vocab_size", "must be >= 16 (4 special ids plus the subwords)")
        return None

    @property
    def kind(self) -> str:
        return "lm" if self.task in LM_TASKS else "seq2seq"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        raw = json.loads(text)
        model, exe = dict(raw["model"]), dict(raw.get("exe", {}))
        for name in EXEC_FIELDS:  # config.json of runs made before ExecConfig held these
            if name in model:
                exe.setdefault(name, model.pop(name))
        return cls(**{**raw, "model": TransformerConfig(**model), "exe": ExecConfig(**exe)})

    def override(self, assignments: list[str]) -> ExperimentConfig:
        """Apply ``key=value`` strings (``model.<field>=value`` for the model, ``exe.<field>=value``
        for how it runs); values are Python literals.

        A value of the wrong type (``steps=abc``) or out of range raises a ValueError naming the key.
        """
        top, sub = {}, {"model": {}, "exe": {}}
        names = {f.name for f in dataclasses.fields(self)}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. steps=1000, model.d_model=256)")
            key, raw = item.split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word, e.g. optimizer=paper
            part, _, name = key.partition(".")
            if name and part in sub:
                hints = _type_hints(type(getattr(self, part)))
                if name in hints:  # unknown names: .replace lists the valid ones
                    # The configs check choices, not types: d_model='abc' would fail later, obscurely.
                    _check_type(key, value, hints[name], override=raw)
                sub[part][name] = value
            elif key in names and key not in sub:
                _check_type(key, value, _type_hints(ExperimentConfig)[key], override=raw)
                top[key] = value
            else:
                raise ValueError(f"unknown option {key!r}; valid: {sorted(names - set(sub))}, "
                                 "model.<TransformerConfig field> and exe.<ExecConfig field>")
        return dataclasses.replace(self, **top, model=self.model.replace(**sub["model"]),
                                   exe=self.exe.replace(**sub["exe"]))


@functools.cache
def _type_hints(cls) -> dict:
    """The resolved field annotations of a dataclass (they are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def _type_ok(value, hint) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (int, float, str, bool, a class, or a union)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass, but steps=True is a mistake
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int literal (learning_rate=1) is a fine float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_type(name: str, value, hint, override: str | None = None) -> None:
    """Raise a one-line ValueError naming ``name`` if ``value`` does not fit ``hint``."""
    if not _type_ok(value, hint):
        wanted = " or ".join(getattr(h, "__name__", str(h)) for h in (typing.get_args(hint) or (hint,)))
        given = f"{name}={override}" if override is not None else f"{name}={value!r}"
        raise ValueError(f"{given} is invalid: {name} must be of type {wanted}, got {type(value).__name__} "
                         f"{value!r}")


_SYNTHETIC_MODEL = TransformerConfig(d_model=64, num_heads=4, num_layers=2, d_ff=256, dropout_rate=0.0,
                                     norm_position="pre", max_len=64, pad_id=0)

PRESETS: dict[str, ExperimentConfig] = {
    **{task: ExperimentConfig(task=task, model=_SYNTHETIC_MODEL, steps=1000, learning_rate=3e-3,
                              min_learning_rate=1.5e-4, warmup_steps=50, eval_every=250,
                              checkpoint_every=250, num_examples=20000)
       for task in ("copy", "reverse", "sort", "add")},
    # nanoGPT's shakespeare_char on CPU (README: --device=cpu --compile=False --eval_iters=20
    # --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    # --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0, val loss 1.88): 4 layers, 4 heads,
    # width 128, FFN 4x, context 64, batch 12, 2000 iterations, no dropout; GPT-2 blocks (Pre-LN with
    # a final LayerNorm, exact GELU, learned positions, unscaled tied embeddings, bias=False: no
    # linear or LayerNorm biases); GPT-2 init (N(0, 0.02²), residual projections 0.02/√(2L));
    # AdamW(0.9, 0.99, ε=1e-8), weight decay 0.1 on every matrix and embedding, clip 1.0, lr 1e-3
    # warmed up over 100 steps then cosine to 1e-4 at step 2000; first 90% train / last 10% val.
    # Left different: the warmup ramp (lr·s/100 here, lr·(s+1)/101 there), 4 unused special-token
    # rows in the vocabulary (69 vs 65), and the val loss is the whole split (nanoGPT: 20 batches).
    "shakespeare": ExperimentConfig(
        task="shakespeare",
        model=TransformerConfig(d_model=128, num_heads=4, num_layers=4, d_ff=512, dropout_rate=0.0,
                                activation="gelu", norm_position="pre", positions="learned", max_len=64,
                                tie_embeddings=True, use_bias=False, scale_embeddings=False, pad_id=None,
                                init="gpt2"),
        steps=2000, batch_size=12, seq_len=64, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
        weight_decay=0.1, weight_decay_rule="matrices", beta2=0.99, adam_eps=1e-8, clip_norm=1.0,
        eval_every=250, checkpoint_every=500),
    # The best validation loss within 30 minutes of the 2-core CPU: nanoGPT's recipe above (same
    # blocks, init and optimizer) with a wider model (1.8M parameters), twice the context, dropout
    # 0.1 and 3500 small-batch steps sized to finish in ~27 minutes (max_minutes guards the budget
    # on a slower machine).
    "shakespeare-30min": ExperimentConfig(
        task="shakespeare",
        model=TransformerConfig(d_model=192, num_heads=6, num_layers=4, d_ff=768, dropout_rate=0.1,
                                activation="gelu", norm_position="pre", positions="learned", max_len=128,
                                tie_embeddings=True, use_bias=False, scale_embeddings=False, pad_id=None,
                                init="gpt2"),
        steps=3500, max_minutes=30.0, batch_size=12, seq_len=128, learning_rate=1e-3, min_learning_rate=1e-4,
        warmup_steps=200, weight_decay=0.1, weight_decay_rule="matrices", beta2=0.99, adam_eps=1e-8,
        clip_norm=1.0, eval_every=500, checkpoint_every=500),
    # Multi30k de->en, ~10M parameters (3+3 layers, width 256, 8 heads, F 1024): the PyTorch
    # tutorial's budget of 10 epochs (one epoch is 163 batches of up to 4096 target-token
    # slots, 441,283 target tokens), validated and checkpointed once per epoch so the best
    # epoch is chosen by validation loss; AdamW with warmup + cosine decay, label smoothing 0.1.
    "multi30k": ExperimentConfig(
        task="multi30k",
        model=TransformerConfig(d_model=256, num_heads=8, num_layers=3, d_ff=1024, dropout_rate=0.1,
                                norm_position="pre", max_len=128, pad_id=0),
        steps=1630, batch_tokens=4096, optimizer="adamw", learning_rate=1e-3, min_learning_rate=1e-5,
        warmup_steps=150, beta2=0.98, label_smoothing=0.1, clip_norm=1.0, eval_every=163,
        checkpoint_every=163, vocab_size=6000, num_examples=0),
}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]
