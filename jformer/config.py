"""The ground floor: what a model is (``TransformerConfig``), how it runs (``ExecConfig``),
and every option list either of them accepts (each list here, once).

``TransformerConfig`` fixes the parameters: change a field and the parameter tree, or
what the parameters compute, changes. ``ExecConfig`` only changes how the same function
is executed (scan or loop over layers, what the backward pass recomputes, the attention
kernel, the compute dtype, the CPU dense fast path, the BatchNorm device axis): it is not
saved with a model and may change between a checkpoint and its resumption.

Both are frozen (hashable) dataclasses: pass them as static arguments to ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layer", "rms", "batch", "none")
NORM_POSITIONS = ("post", "pre")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
POOLINGS = ("mean", "cls")
INITS = ("default", "gpt2")
ATTENTION_IMPLS = (None, "xla", "cudnn", "blockwise")
COMPUTE_DTYPES = ("float32", "bfloat16")
CELLS = ("lstm", "gru")  # recurrent.RNNConfig.cell
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def check_size(name: str, value, minimum: int = 1) -> None:
    """Raise a ValueError unless ``value`` is an integer >= ``minimum`` (a size, a count, a length).

    Checked where sizes enter, so that 0 or -3 is named here instead of failing as a
    ZeroDivisionError or an "invalid tensor dimension" deep inside XLA.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value, allowed: tuple) -> None:
    """Raise a ValueError naming ``name``, ``value`` and the ``allowed`` options unless value is one."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _replace(cfg, **overrides):
    """A copy of dataclass ``cfg`` with ``overrides``; unknown names raise listing the valid ones."""
    names = [f.name for f in dataclasses.fields(cfg)]
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} options {sorted(unknown)}; valid options: {names}")
    return dataclasses.replace(cfg, **overrides)


@dataclass(frozen=True)
class TransformerConfig:
    """What the model is: the hyper-parameters that fix its parameters and its function.

    ``num_layers`` is the encoder depth (and the depth of LM / classifier stacks);
    ``num_decoder_layers`` the seq2seq decoder depth (default ``num_layers``).
    ``final_norm`` defaults to True for Pre-LN and False for Post-LN.
    ``use_bias=False`` removes the biases of every dense layer and of the LayerNorms
    (BatchNorm keeps its shift). ``init`` chooses the initialisation: ``"default"``
    (Glorot-uniform kernels, token embeddings ~ N(0, 1/D)) or ``"gpt2"`` (GPT-2 /
    nanoGPT: kernels and token embeddings ~ N(0, 0.02²), the residual output projections
    ~ N(0, 0.02² / (2L)), see ``blocks.init_stds``); biases are zero and learned
    positions ~ N(0, 0.02²) under both.

    Vocabularies and lengths: ``vocab_size`` is the target (LM, classifier) vocabulary,
    ``src_vocab_size`` the seq2seq source one (default ``vocab_size``);
    ``share_embeddings`` gives source and target one table (one joint vocabulary, as
    the paper); with ``tie_embeddings`` that table is also the output projection
    (three-way tying). ``max_len`` bounds target (LM) positions, ``src_max_len`` source
    positions (default ``max_len``); only learned positions have a table that ends.

    Padding: ``pad_id=None`` (the default) means no token is padding: every token is
    attended to and scored. Set ``pad_id`` for padded batches (seq2seq, classifiers,
    LMs trained on padded rows): tokens equal to it are masked as keys, left out of
    BatchNorm statistics, and not scored by the losses.
    """

    vocab_size: int = 256
    src_vocab_size: int | None = None
    share_embeddings: bool = False
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    num_layers: int = 6
    num_decoder_layers: int | None = None
    d_ff: int = 2048
    activation: str = "relu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    norm: str = "layer"
    norm_position: str = "post"
    final_norm: bool | None = None
    norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.9
    positions: str = "sinusoidal"
    max_len: int = 512
    src_max_len: int | None = None
    rope_base: float = 10000.0
    scale_embeddings: bool = True
    tie_embeddings: bool = False
    use_bias: bool = True
    init: str = "default"
    pad_id: int | None = None
    num_classes: int | None = None
    pooling: str = "mean"

    def __post_init__(self):
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                              ("positions", POSITIONS), ("pooling", POOLINGS), ("init", INITS)):
            check_choice(f"TransformerConfig.{name}", getattr(self, name), allowed)
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            check_size(f"TransformerConfig.{name}", getattr(self, name))
        for name in ("src_vocab_size", "num_kv_heads", "num_decoder_layers", "num_classes", "src_max_len"):
            if getattr(self, name) is not None:
                check_size(f"TransformerConfig.{name}", getattr(self, name))
        for name in ("norm_eps", "rope_base"):
            if not getattr(self, name) > 0:  # also catches NaN
                raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.batch_norm_momentum < 1.0:
            raise ValueError(f"TransformerConfig.batch_norm_momentum must be in [0, 1), "
                             f"got {self.batch_norm_momentum!r}")
        if self.share_embeddings and self.src_vocab_size not in (None, self.vocab_size):
            raise ValueError(f"TransformerConfig.share_embeddings needs one vocabulary, but "
                             f"src_vocab_size={self.src_vocab_size} != vocab_size={self.vocab_size}")
        if self.pad_id is not None:
            vocab = min(self.vocab_size, self.source_vocab_size)
            if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < vocab:
                raise ValueError(f"TransformerConfig.pad_id must be None or an id in [0, {vocab}) "
                                 f"(the vocabularies), got {self.pad_id!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig.num_heads={self.num_heads} does not divide "
                             f"d_model={self.d_model}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"TransformerConfig.num_kv_heads={self.num_kv_heads} does not divide "
                             f"num_heads={self.num_heads}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary positions rotate pairs of features: the head width "
                             f"d_model / num_heads = {self.d_model // self.num_heads} must be even")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def source_vocab_size(self) -> int:
        return self.src_vocab_size or self.vocab_size

    @property
    def source_max_len(self) -> int:
        return self.src_max_len or self.max_len

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def use_final_norm(self) -> bool:
        return self.norm_position == "pre" if self.final_norm is None else self.final_norm

    def replace(self, **overrides) -> TransformerConfig:
        """A copy with ``overrides``; unknown option names raise a ValueError listing the valid ones."""
        return _replace(self, **overrides)


@dataclass(frozen=True)
class ExecConfig:
    """How a model runs: switches that change speed and memory, never the parameters.

    * ``scan_layers``: one ``lax.scan`` over a layer stack (compile time flat in depth);
      False unrolls a Python loop (identical results, easier to step through).
    * ``remat``: which layer activations the backward pass recomputes rather than
      stores: a ``REMAT_POLICIES`` name (a ``jax.checkpoint_policies`` member), True
      for all, False for none. The default keeps the weight matmuls' outputs.
    * ``attention_impl``: ``None`` (the vmapped reference), ``"xla"`` / ``"cudnn"``
      (``jax.nn.dot_product_attention``) or ``"blockwise"`` (O(T)-memory online
      softmax). Attention dropout and returned weights always use the reference.
    * ``compute_dtype="bfloat16"``: mixed precision — parameters stay float32 and are
      cast where used, activations and matmuls run in bfloat16, while attention
      logits/softmax, norm statistics and the loss stay float32.
    * ``fast_dense``: ``layers.dense`` with the CPU-tuned custom JVP (same values, a
      backward pass XLA:CPU runs faster); ``None`` turns it on when the default
      backend is the CPU (measured faster there: docs/performance.md).
    * ``batch_norm_axis_name``: the device axis BatchNorm averages its batch statistics
      over; set by the parallel train steps (``parallel.make_pmap_train_step``), not by hand.
    """

    scan_layers: bool = True
    remat: bool | str = "dots_with_no_batch_dims_saveable"
    attention_impl: str | None = None
    compute_dtype: str = "float32"
    fast_dense: bool | None = None
    batch_norm_axis_name: str | None = None

    def __post_init__(self):
        check_choice("ExecConfig.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_choice("ExecConfig.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("ExecConfig.remat", self.remat, (False, True, *REMAT_POLICIES))
        check_choice("ExecConfig.fast_dense", self.fast_dense, (None, False, True))

    @property
    def use_fast_dense(self) -> bool:
        return jax.default_backend() == "cpu" if self.fast_dense is None else self.fast_dense

    def replace(self, **overrides) -> ExecConfig:
        """A copy with ``overrides``; unknown option names raise a ValueError listing the valid ones."""
        return _replace(self, **overrides)
