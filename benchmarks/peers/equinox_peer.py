"""Equinox peer: the ``lm`` and ``s2s`` workloads written as idiomatic Equinox.

Builds the networks of ``benchmarks.workloads`` from ``eqx.Module`` classes over
``eqx.nn.MultiheadAttention`` (q/k/v/out with bias), ``eqx.nn.Linear``,
``eqx.nn.LayerNorm(D, eps=1e-5)`` and ``eqx.nn.Embedding``:

* ``lm``: a Pre-LN GPT (token + learned position embeddings, causal self-attention,
  exact-GELU MLP, final LN, untied head with bias);
* ``s2s``: a Post-LN encoder-decoder with ReLU FFN, as ``torch.nn.Transformer``
  (final LN after each stack, head with bias).

Equinox layers act on one example (and ``Linear``/``LayerNorm``/``Embedding`` on one
position), so modules map over positions and the loss maps the model over the batch
with ``jax.vmap``. Training is an ``eqx.filter_jit`` step with
``eqx.filter_value_and_grad`` and ``optax.adamw``, donating the model and optimiser
state. ``decode`` and ``long`` are not run for Equinox.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Bench
from benchmarks.workloads import PAD, Workload


def _attention(d: int, heads: int, key) -> eqx.nn.MultiheadAttention:
    """Self/cross attention whose four projections are Linear(D, D) with bias."""
    return eqx.nn.MultiheadAttention(heads, d, use_query_bias=True, use_key_bias=True,
                                     use_value_bias=True, use_output_bias=True, key=key)


def _per_position(layer, x):
    """Apply a single-position layer (Linear, LayerNorm) to every row of ``x`` [T, ...]."""
    return jax.vmap(layer)(x)


class FeedForward(eqx.Module):
    """Linear(D, F) -> activation -> Linear(F, D), applied per position."""

    up: eqx.nn.Linear
    down: eqx.nn.Linear
    relu: bool = eqx.field(static=True)

    def __init__(self, d: int, f: int, relu: bool, key):
        k1, k2 = jax.random.split(key)
        self.up = eqx.nn.Linear(d, f, key=k1)
        self.down = eqx.nn.Linear(f, d, key=k2)
        self.relu = relu

    def __call__(self, x):
        h = _per_position(self.up, x)
        h = jax.nn.relu(h) if self.relu else jax.nn.gelu(h, approximate=False)  # exact (erf) GELU
        return _per_position(self.down, h)


class Embed(eqx.Module):
    """Token embedding plus learned position embedding (no sqrt(D) scaling)."""

    tok: eqx.nn.Embedding
    pos: eqx.nn.Embedding

    def __init__(self, vocab: int, length: int, d: int, key):
        k1, k2 = jax.random.split(key)
        self.tok = eqx.nn.Embedding(vocab, d, key=k1)
        self.pos = eqx.nn.Embedding(length, d, key=k2)

    def __call__(self, ids):
        return jax.vmap(self.tok)(ids) + jax.vmap(self.pos)(jnp.arange(ids.shape[0]))


def _causal(t: int):
    """Boolean [T, T] mask: position i attends to positions <= i."""
    return jnp.tril(jnp.ones((t, t), dtype=bool))


# --- lm: Pre-LN GPT ---------------------------------------------------------


class GPTBlock(eqx.Module):
    """x = x + MHA(LN(x), causal); x = x + FFN(LN(x))."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    ffn: FeedForward

    def __init__(self, w: Workload, key):
        k1, k2 = jax.random.split(key)
        self.ln1 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.attn = _attention(w.d_model, w.heads, k1)
        self.ln2 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.ffn = FeedForward(w.d_model, w.d_ff, relu=False, key=k2)

    def __call__(self, x, mask):
        h = _per_position(self.ln1, x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + self.ffn(_per_position(self.ln2, x))


class GPT(eqx.Module):
    """Decoder-only LM on one sequence: ids [T] -> logits [T, V]."""

    embed: Embed
    blocks: list[GPTBlock]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, w: Workload, key):
        ke, kh, *kb = jax.random.split(key, 2 + w.layers)
        self.embed = Embed(w.vocab, w.length, w.d_model, ke)
        self.blocks = [GPTBlock(w, k) for k in kb]
        self.ln_f = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.head = eqx.nn.Linear(w.d_model, w.vocab, key=kh)

    def __call__(self, ids):
        x = self.embed(ids)
        mask = _causal(ids.shape[0])
        for block in self.blocks:
            x = block(x, mask)
        return _per_position(self.head, _per_position(self.ln_f, x))


# --- s2s: Post-LN encoder-decoder --------------------------------------------


class EncoderLayer(eqx.Module):
    """x = LN(x + MHA(x, src padding)); x = LN(x + FFN(x))."""

    attn: eqx.nn.MultiheadAttention
    ln1: eqx.nn.LayerNorm
    ffn: FeedForward
    ln2: eqx.nn.LayerNorm

    def __init__(self, w: Workload, key):
        k1, k2 = jax.random.split(key)
        self.attn = _attention(w.d_model, w.heads, k1)
        self.ln1 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.ffn = FeedForward(w.d_model, w.d_ff, relu=True, key=k2)
        self.ln2 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)

    def __call__(self, x, mask):
        x = _per_position(self.ln1, x + self.attn(x, x, x, mask=mask))
        return _per_position(self.ln2, x + self.ffn(x))


class DecoderLayer(eqx.Module):
    """y = LN(y + MHA(y, causal)); y = LN(y + MHA(y, memory, src padding)); y = LN(y + FFN(y))."""

    self_attn: eqx.nn.MultiheadAttention
    ln1: eqx.nn.LayerNorm
    cross_attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    ffn: FeedForward
    ln3: eqx.nn.LayerNorm

    def __init__(self, w: Workload, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.self_attn = _attention(w.d_model, w.heads, k1)
        self.ln1 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.cross_attn = _attention(w.d_model, w.heads, k2)
        self.ln2 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.ffn = FeedForward(w.d_model, w.d_ff, relu=True, key=k3)
        self.ln3 = eqx.nn.LayerNorm(w.d_model, eps=1e-5)

    def __call__(self, y, memory, self_mask, cross_mask):
        y = _per_position(self.ln1, y + self.self_attn(y, y, y, mask=self_mask))
        y = _per_position(self.ln2, y + self.cross_attn(y, memory, memory, mask=cross_mask))
        return _per_position(self.ln3, y + self.ffn(y))


class Seq2Seq(eqx.Module):
    """Encoder-decoder on one pair: src [S], tgt_in [T] -> logits [T, V]."""

    src_embed: Embed
    tgt_embed: Embed
    encoder: list[EncoderLayer]
    enc_ln: eqx.nn.LayerNorm
    decoder: list[DecoderLayer]
    dec_ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, w: Workload, key):
        ks, kt, kh, key = jax.random.split(key, 4)
        ke = jax.random.split(key, w.layers + w.decoder_layers)
        self.src_embed = Embed(w.vocab, w.length, w.d_model, ks)
        self.tgt_embed = Embed(w.vocab, w.length, w.d_model, kt)
        self.encoder = [EncoderLayer(w, k) for k in ke[:w.layers]]
        self.enc_ln = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.decoder = [DecoderLayer(w, k) for k in ke[w.layers:]]
        self.dec_ln = eqx.nn.LayerNorm(w.d_model, eps=1e-5)
        self.head = eqx.nn.Linear(w.d_model, w.vocab, key=kh)

    def __call__(self, src, tgt_in):
        keep = src != PAD  # key padding: no query attends to a padded source position
        enc_mask = jnp.broadcast_to(keep[None, :], (src.shape[0], src.shape[0]))
        cross_mask = jnp.broadcast_to(keep[None, :], (tgt_in.shape[0], src.shape[0]))
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, enc_mask)
        memory = _per_position(self.enc_ln, x)
        y = self.tgt_embed(tgt_in)
        causal = _causal(tgt_in.shape[0])
        for layer in self.decoder:
            y = layer(y, memory, causal, cross_mask)
        return _per_position(self.head, _per_position(self.dec_ln, y))


# --- training -----------------------------------------------------------------


def _masked_ce(logits, targets):
    """Mean cross-entropy over non-padding targets."""
    weights = (targets != PAD).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.sum(weights)


def _loss(model, batch):
    """Batch loss: the per-example model is vmapped over the batch axis."""
    if isinstance(model, GPT):
        logits = jax.vmap(model)(batch["inputs"])
        return _masked_ce(logits, batch["targets"])
    logits = jax.vmap(model)(batch["src"], batch["tgt_in"])
    return _masked_ce(logits, batch["tgt_out"])


def build(w: Workload, batch: dict[str, np.ndarray], variant: str | None) -> Bench:
    """Build the Equinox model of ``w`` and closures that train / evaluate it on ``batch``."""
    if w.kind == "lm":
        model = GPT(w, jax.random.PRNGKey(0))
    elif w.kind == "s2s":
        model = Seq2Seq(w, jax.random.PRNGKey(0))
    else:
        raise NotImplementedError(f"the Equinox peer does not run {w.kind!r} workloads")

    data = {k: jnp.asarray(v) for k, v in batch.items()}  # on device once, reused every step
    optim = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))

    # The batch comes first so "all-except-first" donates the model and optimiser
    # state (replaced every step) but keeps the fixed batch alive for the next call.
    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, batch)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    forward_loss = eqx.filter_jit(_loss)
    state = {"model": model, "opt_state": opt_state}

    def train_step() -> float:
        state["model"], state["opt_state"], loss = step(data, state["model"], state["opt_state"])
        jax.block_until_ready(state["model"])
        return float(loss)

    def forward() -> float:
        return float(forward_loss(state["model"], data))

    return Bench(num_params=num_params, train_step=train_step, forward=forward)
