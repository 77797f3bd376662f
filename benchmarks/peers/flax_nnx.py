"""Flax NNX peer: the workloads of ``benchmarks.workloads`` written with ``flax.nnx``.

Builds, as an NNX user would:

* ``lm``: a Pre-LN GPT (token + learned position ``nnx.Embed``, causal
  ``nnx.MultiHeadAttention``, exact-GELU MLP, final ``nnx.LayerNorm``, untied head);
* ``s2s``: a Post-LN encoder-decoder with ReLU MLPs and source padding masks;

trained with the documented NNX pattern: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and an
``@nnx.jit`` step around ``nnx.value_and_grad`` (model and optimizer donated, as the
``nnx.jit`` docs suggest). ``decode`` only reports the parameter count (the runner
decodes with flax-linen). Nothing here is shared with jformer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.harness import Bench
from benchmarks.workloads import PAD, Workload

LN_EPS = 1e-5  # torch's LayerNorm epsilon (NNX's default is 1e-6)


def layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)


def attention(w: Workload, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
    """MHA with biased q, k, v, out projections of width D, no cache."""
    return nnx.MultiHeadAttention(w.heads, w.d_model, qkv_features=w.d_model, out_features=w.d_model,
                                  decode=False, rngs=rngs)


class Mlp(nnx.Module):
    """Linear(D, F) -> activation -> Linear(F, D), both with bias."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.up = nnx.Linear(w.d_model, w.d_ff, rngs=rngs)
        self.down = nnx.Linear(w.d_ff, w.d_model, rngs=rngs)
        self.activation = w.activation

    def __call__(self, x):
        h = self.up(x)
        # exact (erf) GELU: jax.nn.gelu defaults to the tanh approximation
        h = nnx.relu(h) if self.activation == "relu" else nnx.gelu(h, approximate=False)
        return self.down(h)


class Embedding(nnx.Module):
    """Token embedding plus a learned position embedding (no √D scaling)."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.tok = nnx.Embed(w.vocab, w.d_model, rngs=rngs)
        self.pos = nnx.Embed(w.length, w.d_model, rngs=rngs)

    def __call__(self, ids):
        return self.tok(ids) + self.pos(jnp.arange(ids.shape[1])[None, :])


class GptBlock(nnx.Module):
    """Pre-LN decoder block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.ln1, self.attn = layer_norm(w.d_model, rngs), attention(w, rngs)
        self.ln2, self.mlp = layer_norm(w.d_model, rngs), Mlp(w, rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class Gpt(nnx.Module):
    """Decoder-only LM: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.embed = Embedding(w, rngs)
        self.blocks = nnx.List([GptBlock(w, rngs) for _ in range(w.layers)])
        self.ln_f = layer_norm(w.d_model, rngs)
        self.head = nnx.Linear(w.d_model, w.vocab, rngs=rngs)

    def __call__(self, ids):
        x, mask = self.embed(ids), nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


class EncoderLayer(nnx.Module):
    """Post-LN: x = LN(x + MHA(x)); x = LN(x + MLP(x))."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.attn, self.ln1 = attention(w, rngs), layer_norm(w.d_model, rngs)
        self.mlp, self.ln2 = Mlp(w, rngs), layer_norm(w.d_model, rngs)

    def __call__(self, x, mask):
        x = self.ln1(x + self.attn(x, mask=mask))
        return self.ln2(x + self.mlp(x))


class DecoderLayer(nnx.Module):
    """Post-LN: self-attention (causal), cross-attention over memory, MLP."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.self_attn, self.ln1 = attention(w, rngs), layer_norm(w.d_model, rngs)
        self.cross_attn, self.ln2 = attention(w, rngs), layer_norm(w.d_model, rngs)
        self.mlp, self.ln3 = Mlp(w, rngs), layer_norm(w.d_model, rngs)

    def __call__(self, y, memory, self_mask, cross_mask):
        y = self.ln1(y + self.self_attn(y, mask=self_mask))
        y = self.ln2(y + self.cross_attn(y, memory, mask=cross_mask))
        return self.ln3(y + self.mlp(y))


class Seq2Seq(nnx.Module):
    """Encoder-decoder: (src [B, S], tgt_in [B, T]) -> logits [B, T, V]."""

    def __init__(self, w: Workload, rngs: nnx.Rngs):
        self.src_embed, self.tgt_embed = Embedding(w, rngs), Embedding(w, rngs)
        self.encoder = nnx.List([EncoderLayer(w, rngs) for _ in range(w.layers)])
        self.enc_ln = layer_norm(w.d_model, rngs)
        self.decoder = nnx.List([DecoderLayer(w, rngs) for _ in range(w.decoder_layers)])
        self.dec_ln = layer_norm(w.d_model, rngs)
        self.head = nnx.Linear(w.d_model, w.vocab, rngs=rngs)

    def __call__(self, src, tgt):
        src_valid, tgt_valid = src != PAD, tgt != PAD
        x, enc_mask = self.src_embed(src), nnx.make_attention_mask(src_valid, src_valid)
        for layer in self.encoder:
            x = layer(x, enc_mask)
        memory = self.enc_ln(x)

        y = self.tgt_embed(tgt)
        self_mask = nnx.make_causal_mask(tgt)
        cross_mask = nnx.make_attention_mask(tgt_valid, src_valid)
        for layer in self.decoder:
            y = layer(y, memory, self_mask, cross_mask)
        return self.head(self.dec_ln(y))


def token_loss(logits, targets):
    """Mean cross-entropy over non-padding targets."""
    weights = (targets != PAD).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.sum(weights)


def count_params(model: nnx.Module) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build(w: Workload, batch: dict[str, np.ndarray], variant: str | None) -> Bench:
    """Build workload ``w`` in Flax NNX; returns the blocking closures of a ``Bench``."""
    del variant  # one NNX configuration
    rngs = nnx.Rngs(0)
    if w.kind == "decode":  # only the parameter count: decoding is measured with flax-linen
        return Bench(num_params=count_params(Gpt(w, rngs)))

    data = {k: jnp.asarray(v) for k, v in batch.items()}  # to the device once
    if w.kind == "lm":
        model = Gpt(w, rngs)
        inputs, targets = (data["inputs"],), data["targets"]
    elif w.kind == "s2s":
        model = Seq2Seq(w, rngs)
        inputs, targets = (data["src"], data["tgt_in"]), data["tgt_out"]
    else:
        raise ValueError(f"flax-nnx has no {w.kind!r} workload")

    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, inputs, targets):
        return token_loss(model(*inputs), targets)

    # the step updates model and optimizer in place, so their old buffers can be reused
    @nnx.jit(donate_argnames=("model", "optimizer"))
    def train_step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    forward = nnx.jit(loss_fn)

    def step() -> float:
        loss = train_step(model, optimizer, inputs, targets)
        jax.block_until_ready(nnx.state(model, nnx.Param))
        return float(loss)

    return Bench(
        num_params=count_params(model),
        train_step=step,
        forward=lambda: float(forward(model, inputs, targets)),
    )
