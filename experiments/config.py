"""Experiment configurations: one frozen dataclass, named presets, ``key=value`` overrides.

    python -m experiments.train --task shakespeare --workdir runs/sh steps=4000 model.num_layers=6
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field

from jformer import TransformerConfig

LM_TASKS = ("shakespeare",)
SEQ2SEQ_TASKS = ("copy", "reverse", "sort", "add", "multi30k")
TASKS = SEQ2SEQ_TASKS + LM_TASKS


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs besides the data files; saved as ``config.json`` in the workdir."""

    task: str = "reverse"
    model: TransformerConfig = field(default_factory=TransformerConfig)
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
    beta2: float = 0.98
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
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.optimizer not in ("adamw", "paper"):
            raise ValueError(f"optimizer must be 'adamw' or 'paper', got {self.optimizer!r}")

    @property
    def kind(self) -> str:
        return "lm" if self.task in LM_TASKS else "seq2seq"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        raw = json.loads(text)
        return cls(**{**raw, "model": TransformerConfig(**raw["model"])})

    def override(self, assignments: list[str]) -> ExperimentConfig:
        """Apply ``key=value`` strings (``model.<field>=value`` for the model); values are Python literals."""
        top, model = {}, {}
        names = {f.name for f in dataclasses.fields(self)}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. steps=1000, model.d_model=256)")
            key, raw = item.split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word, e.g. optimizer=paper
            if key.startswith("model."):
                model[key[len("model."):]] = value
            elif key in names and key != "model":
                top[key] = value
            else:
                raise ValueError(f"unknown option {key!r}; valid: {sorted(names - {'model'})} "
                                 "and model.<TransformerConfig field>")
        return dataclasses.replace(self, **top, model=self.model.replace(**model))


_SYNTHETIC_MODEL = TransformerConfig(d_model=64, num_heads=4, num_layers=2, d_ff=256, dropout_rate=0.0,
                                     norm_position="pre", max_len=64)

PRESETS: dict[str, ExperimentConfig] = {
    **{task: ExperimentConfig(task=task, model=_SYNTHETIC_MODEL, steps=1000, learning_rate=3e-3,
                              min_learning_rate=1.5e-4, warmup_steps=50, eval_every=250,
                              checkpoint_every=250, num_examples=20000)
       for task in ("copy", "reverse", "sort", "add")},
    # nanoGPT's shakespeare_char on CPU: 4 layers, 4 heads, width 128, context 64, batch 12,
    # 2000 iterations, no dropout; GPT-style Pre-LN, GELU, learned positions, tied embeddings, no biases.
    "shakespeare": ExperimentConfig(
        task="shakespeare",
        model=TransformerConfig(d_model=128, num_heads=4, num_layers=4, d_ff=512, dropout_rate=0.0,
                                activation="gelu", norm_position="pre", positions="learned", max_len=64,
                                tie_embeddings=True, use_bias=False, scale_embeddings=False, pad_id=None),
        steps=2000, batch_size=12, seq_len=64, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
        weight_decay=0.1, beta2=0.99, clip_norm=1.0, eval_every=250, checkpoint_every=500),
    # The best validation loss within 30 minutes of the 2-core CPU: nanoGPT's recipe with a wider
    # model (1.8M parameters), twice the context, dropout 0.1 and 3500 small-batch steps sized to
    # finish in ~27 minutes (max_minutes guards the budget on a slower machine).
    "shakespeare-30min": ExperimentConfig(
        task="shakespeare",
        model=TransformerConfig(d_model=192, num_heads=6, num_layers=4, d_ff=768, dropout_rate=0.1,
                                activation="gelu", norm_position="pre", positions="learned", max_len=128,
                                tie_embeddings=True, use_bias=False, scale_embeddings=False, pad_id=None),
        steps=3500, max_minutes=30.0, batch_size=12, seq_len=128, learning_rate=1e-3, min_learning_rate=1e-4,
        warmup_steps=200, weight_decay=0.1, beta2=0.99, clip_norm=1.0, eval_every=500, checkpoint_every=500),
    # Multi30k de->en, ~10M parameters (3+3 layers, width 256, 8 heads, F 1024), sized for a 2-core
    # CPU hour: ~9.5 epochs of 4096-token batches, AdamW with warmup + cosine decay, label smoothing 0.1.
    # experiments/README.md adds a second cycle (init_from=...) for the recorded BLEU.
    "multi30k": ExperimentConfig(
        task="multi30k",
        model=TransformerConfig(d_model=256, num_heads=8, num_layers=3, d_ff=1024, dropout_rate=0.1,
                                norm_position="pre", max_len=128),
        steps=1100, batch_tokens=4096, optimizer="adamw", learning_rate=1e-3, min_learning_rate=1e-5,
        warmup_steps=150, beta2=0.98, label_smoothing=0.1, clip_norm=1.0, eval_every=250,
        checkpoint_every=100, vocab_size=6000, num_examples=0),
}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]
