"""Flax Linen peer: the workloads of ``benchmarks.workloads`` written with ``flax.linen``.

Builds, as a Linen user would:

* ``lm`` / ``decode``: a Pre-LN GPT (token + learned position ``nn.Embed``, causal
  ``nn.MultiHeadDotProductAttention``, exact-GELU MLP, final ``nn.LayerNorm``, untied head);
* ``s2s``: a Post-LN encoder-decoder with ReLU MLPs and source padding masks;

parameters from ``model.init``, a ``jax.jit`` AdamW (optax) train step that donates the
params and optimizer state, and for ``decode`` greedy generation with Linen's own
``decode=True`` key/value cache (the ``"cache"`` collection) or by rerunning the full
forward on a fixed-length buffer. Nothing here is shared with jformer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Bench
from benchmarks.workloads import PAD, Workload

LN_EPS = 1e-5  # torch's LayerNorm epsilon (Linen's default is 1e-6)


class Mlp(nn.Module):
    """Dense(d_ff) -> activation -> Dense(d_model), both with bias."""

    d_model: int
    d_ff: int
    activation: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.d_ff)(x)
        # exact (erf) GELU: jax.nn.gelu defaults to the tanh approximation
        h = nn.relu(h) if self.activation == "relu" else nn.gelu(h, approximate=False)
        return nn.Dense(self.d_model)(h)


class GptBlock(nn.Module):
    """Pre-LN decoder block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    d_model: int
    heads: int
    d_ff: int
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(epsilon=LN_EPS)(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.d_model, out_features=self.d_model,
            decode=self.decode)(h, mask=mask)
        h = nn.LayerNorm(epsilon=LN_EPS)(x)
        return x + Mlp(self.d_model, self.d_ff, "gelu")(h)


class Gpt(nn.Module):
    """Decoder-only LM: ids [B, T] -> logits [B, T, V].

    With ``decode=True`` every attention layer keeps a key/value cache and the model
    takes one token per call; the position is then read from a ``"cache"`` index
    that advances by one per call (as the Flax lm1b example does).
    """

    vocab: int
    d_model: int
    heads: int
    layers: int
    d_ff: int
    max_len: int
    decode: bool = False

    @nn.compact
    def __call__(self, ids):
        length = ids.shape[1]
        positions = jnp.arange(length)[None, :]
        if self.decode:
            index = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            # the init call (which builds the caches from a [B, T] input) must not advance it
            if not self.is_initializing():
                positions = index.value[None, None]
                index.value = index.value + 1
        x = nn.Embed(self.vocab, self.d_model, name="tok_embed")(ids)
        x = x + nn.Embed(self.max_len, self.d_model, name="pos_embed")(positions)
        # a cached single-token step may attend to everything cached so far: the
        # attention layer masks the not-yet-written cache rows itself
        mask = None if self.decode and not self.is_initializing() else nn.make_causal_mask(ids)
        for _ in range(self.layers):
            x = GptBlock(self.d_model, self.heads, self.d_ff, self.decode)(x, mask)
        x = nn.LayerNorm(epsilon=LN_EPS)(x)
        return nn.Dense(self.vocab, name="head")(x)


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + MHA(x)); x = LN(x + MLP(x))."""

    d_model: int
    heads: int
    d_ff: int
    activation: str

    @nn.compact
    def __call__(self, x, mask):
        x = nn.LayerNorm(epsilon=LN_EPS)(x + nn.MultiHeadDotProductAttention(self.heads)(x, mask=mask))
        return nn.LayerNorm(epsilon=LN_EPS)(x + Mlp(self.d_model, self.d_ff, self.activation)(x))


class DecoderLayer(nn.Module):
    """Post-LN: self-attention (causal), cross-attention over memory, MLP."""

    d_model: int
    heads: int
    d_ff: int
    activation: str

    @nn.compact
    def __call__(self, y, memory, self_mask, cross_mask):
        y = nn.LayerNorm(epsilon=LN_EPS)(y + nn.MultiHeadDotProductAttention(self.heads)(y, mask=self_mask))
        y = nn.LayerNorm(epsilon=LN_EPS)(
            y + nn.MultiHeadDotProductAttention(self.heads)(y, memory, mask=cross_mask))
        return nn.LayerNorm(epsilon=LN_EPS)(y + Mlp(self.d_model, self.d_ff, self.activation)(y))


class Seq2Seq(nn.Module):
    """Encoder-decoder: (src [B, S], tgt_in [B, T]) -> logits [B, T, V]."""

    vocab: int
    d_model: int
    heads: int
    layers: int
    decoder_layers: int
    d_ff: int
    max_len: int
    activation: str

    @nn.compact
    def __call__(self, src, tgt):
        def embed(ids, name):
            tok = nn.Embed(self.vocab, self.d_model, name=f"{name}_tok_embed")(ids)
            return tok + nn.Embed(self.max_len, self.d_model, name=f"{name}_pos_embed")(
                jnp.arange(ids.shape[1])[None, :])

        src_valid, tgt_valid = src != PAD, tgt != PAD
        x = embed(src, "src")
        enc_mask = nn.make_attention_mask(src_valid, src_valid)
        for _ in range(self.layers):
            x = EncoderLayer(self.d_model, self.heads, self.d_ff, self.activation)(x, enc_mask)
        memory = nn.LayerNorm(epsilon=LN_EPS)(x)

        y = embed(tgt, "tgt")
        self_mask = nn.make_causal_mask(tgt)
        cross_mask = nn.make_attention_mask(tgt_valid, src_valid)
        for _ in range(self.decoder_layers):
            y = DecoderLayer(self.d_model, self.heads, self.d_ff, self.activation)(
                y, memory, self_mask, cross_mask)
        y = nn.LayerNorm(epsilon=LN_EPS)(y)
        return nn.Dense(self.vocab, name="head")(y)


def gpt(w: Workload, decode: bool = False) -> Gpt:
    """The ``lm`` / ``decode`` model of workload ``w``."""
    return Gpt(w.vocab, w.d_model, w.heads, w.layers, w.d_ff, w.length, decode)


def token_loss(logits, targets):
    """Mean cross-entropy over non-padding targets."""
    weights = (targets != PAD).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.sum(weights)


def build(w: Workload, batch: dict[str, np.ndarray], variant: str | None) -> Bench:
    """Build workload ``w`` in Flax Linen; returns the blocking closures of a ``Bench``."""
    del variant  # one Linen configuration
    data = {k: jnp.asarray(v) for k, v in batch.items()}  # to the device once
    if w.kind == "decode":
        return _build_decode(w, data)

    if w.kind == "lm":
        model = gpt(w)
        inputs, targets = (data["inputs"],), data["targets"]
    elif w.kind == "s2s":
        model = Seq2Seq(w.vocab, w.d_model, w.heads, w.layers, w.decoder_layers, w.d_ff, w.length,
                        w.activation)
        inputs, targets = (data["src"], data["tgt_in"]), data["tgt_out"]
    else:
        raise ValueError(f"flax-linen has no {w.kind!r} workload")

    params = model.init(jax.random.key(0), *inputs)["params"]
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = tx.init(params)

    def loss_fn(params, inputs, targets):
        return token_loss(model.apply({"params": params}, *inputs), targets)

    # params and opt_state are replaced every step, so XLA may update them in place
    @jax.jit(donate_argnums=(0, 1))
    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    forward = jax.jit(loss_fn)
    state = {"params": params, "opt_state": opt_state}

    def step() -> float:
        state["params"], state["opt_state"], loss = train_step(
            state["params"], state["opt_state"], inputs, targets)
        jax.block_until_ready(state["params"])
        return float(loss)

    return Bench(
        num_params=sum(p.size for p in jax.tree.leaves(params)),
        train_step=step,
        forward=lambda: float(forward(state["params"], inputs, targets)),
    )


def _build_decode(w: Workload, data: dict[str, jax.Array]) -> Bench:
    """Greedy generation of ``w.new_tokens`` tokens from ``data["prompt"]`` [B, 1]."""
    model, decoder = gpt(w), gpt(w, decode=True)
    B, T, n = w.batch, w.length, w.new_tokens
    prompt = data["prompt"]
    params = model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))["params"]

    @jax.jit
    def generate_cached(params, prompt):
        # the init call sizes every layer's key/value cache for T positions; its
        # params are unused, so XLA drops their computation
        cache = decoder.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))["cache"]

        def body(i, carry):
            cache, token, out = carry
            logits, updated = decoder.apply({"params": params, "cache": cache}, token, mutable=["cache"])
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return updated["cache"], token, out.at[:, i].set(token[:, 0])

        out = jnp.zeros((B, n), jnp.int32)
        return jax.lax.fori_loop(0, n, body, (cache, prompt, out))[2]

    @jax.jit
    def generate_full(params, prompt):
        # causal attention: positions > t (not yet written) cannot affect the logits at t
        buffer = jnp.zeros((B, T), jnp.int32).at[:, :1].set(prompt)

        def body(t, carry):
            buffer, out = carry
            logits = model.apply({"params": params}, buffer)
            token = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
            # the last token has no next position to be fed into: "drop" skips that write
            return buffer.at[:, t + 1].set(token, mode="drop"), out.at[:, t].set(token)

        return jax.lax.fori_loop(0, n, body, (buffer, jnp.zeros((B, n), jnp.int32)))[1]

    def run(fn):
        return lambda: np.asarray(jax.block_until_ready(fn(params, prompt)))

    return Bench(
        num_params=sum(p.size for p in jax.tree.leaves(params)),
        generate_cached=run(generate_cached),
        generate_full=run(generate_full),
    )
