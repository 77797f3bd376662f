"""The recurrent baseline the Transformer starts from: LSTM / GRU encoder-decoder with additive attention.

Bahdanau, Cho & Bengio (2015), "Neural Machine Translation by Jointly Learning to Align
and Translate", as bentrevett/pytorch-seq2seq tutorial 3 builds it: a bidirectional RNN
reads the source, the decoder RNN starts from a projection of its final states, and at
each target step attends over every source position with an additive score
``vᵀ tanh(W_q s + W_k h_j)``. Everything the Transformer removes is here to compare
against: time runs through a ``lax.scan``, one step after the other, so nothing is
parallel over positions.

Cells keep torch's gate layout (LSTM i, f, g, o; GRU r, z, n), so the weights of
``torch.nn.LSTM`` / ``torch.nn.GRU`` load unchanged (``interop.from_torch_rnn``). A cell is
``{"input": {"kernel": [D_in, G, Hd], "bias": [G, Hd]}, "hidden": {"kernel": [Hd, G, Hd],
"bias": [G, Hd]}}`` with G = 4 (LSTM) or 3 (GRU) gates; a carry is ``{"h": [B, Hd]}``, plus
``"c": [B, Hd]`` for an LSTM.

Shape legend: B batch, T target (or input) length, S source length, E embedding width
(``d_embed``), Hd hidden width (``d_hidden``), De = directions · Hd encoder output width,
A attention width (= Hd), V vocabulary, L layers.

``rnn_layer`` follows the layer contract of ``blocks``: ``state`` is the initial carry and
``aux["state"]`` the final one (the carry is a recurrent layer's state and its cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jformer import layers
from jformer.blocks import Context, split_keys
from jformer.config import CELLS, ExecConfig, _replace, check_choice, check_size

Array = jax.Array

_GATES = {"lstm": 4, "gru": 3}


@dataclass(frozen=True)
class RNNConfig:
    """What the recurrent encoder-decoder is (frozen, hashable: a static argument of ``jit``).

    * ``cell``: ``"lstm"`` or ``"gru"`` (``config.CELLS``), for encoder and decoder.
    * ``vocab_size``: target vocabulary V; ``src_vocab_size`` the source one (None: V).
      Source and target have their own embedding tables [V, E].
    * ``d_embed`` E, ``d_hidden`` Hd (also the attention width A), ``num_layers`` L of the
      encoder and of the decoder.
    * ``bidirectional``: the encoder reads the source both ways (De = 2·Hd), as
      bentrevett's tutorial 3; the decoder is always left to right.
    * ``dropout_rate``: on embeddings and between stacked layers (torch's ``dropout``),
      active only when a PRNG key is given; bentrevett uses 0.5.
    * ``pad_id``: tokens equal to it are padding (skipped by the recurrence, masked out
      of the attention, not scored by the losses); None: no padding.

    ``norm`` is always ``"none"``: there is no BatchNorm state for training to thread.
    """

    cell: str = "lstm"
    vocab_size: int = 256
    src_vocab_size: int | None = None
    d_embed: int = 256
    d_hidden: int = 512
    num_layers: int = 1
    bidirectional: bool = True
    dropout_rate: float = 0.5
    pad_id: int | None = None

    def __post_init__(self):
        check_choice("RNNConfig.cell", self.cell, CELLS)
        for name in ("vocab_size", "d_embed", "d_hidden", "num_layers"):
            check_size(f"RNNConfig.{name}", getattr(self, name))
        if self.src_vocab_size is not None:
            check_size("RNNConfig.src_vocab_size", self.src_vocab_size)
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"RNNConfig.bidirectional must be True or False, got {self.bidirectional!r}")
        if not 0.0 <= self.dropout_rate < 1.0:  # also catches NaN
            raise ValueError(f"RNNConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.pad_id is not None:
            vocab = min(self.vocab_size, self.source_vocab_size)
            if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < vocab:
                raise ValueError(f"RNNConfig.pad_id must be None or an id in [0, {vocab}) "
                                 f"(the vocabularies), got {self.pad_id!r}")

    @property
    def norm(self) -> str:
        return "none"

    @property
    def source_vocab_size(self) -> int:
        return self.src_vocab_size or self.vocab_size

    @property
    def directions(self) -> tuple[str, ...]:
        return ("forward", "backward") if self.bidirectional else ("forward",)

    def replace(self, **overrides) -> RNNConfig:
        """A copy with ``overrides``; unknown option names raise a ValueError listing the valid ones."""
        return _replace(self, **overrides)


# ----------------------------------------------------------------------- cells


def init_rnn_cell(key: Array, cell: str, d_in: int, d_hidden: int) -> dict:
    """Cell parameters: ``input`` kernel [D_in, G, Hd], ``hidden`` kernel [Hd, G, Hd], biases [G, Hd].

    Every entry ~ U(-1/√Hd, 1/√Hd), torch's initialisation of ``nn.LSTM`` / ``nn.GRU``. One draw
    of [D_in + Hd + 2, G, Hd] is cut into the four tensors: each random draw is its own
    generator in the compiled program, and an init of many small draws compiles slowly.
    """
    check_choice("cell", cell, CELLS)
    bound = 1.0 / math.sqrt(d_hidden)
    u = jax.random.uniform(key, (d_in + d_hidden + 2, _GATES[cell], d_hidden), jnp.float32, -bound, bound)
    return {"input": {"kernel": u[:d_in], "bias": u[-2]},
            "hidden": {"kernel": u[d_in:d_in + d_hidden], "bias": u[-1]}}


def _lstm(hidden: dict, carry: dict, xw: Array) -> tuple[dict, Array]:
    """LSTM step from the projected input xw = x W_i + b_i [B, 4, Hd] (see ``lstm_cell``)."""
    g = xw + layers.dense(hidden, carry["h"])
    i, f, o = (jax.nn.sigmoid(g[..., k, :]) for k in (0, 1, 3))
    c = f * carry["c"] + i * jnp.tanh(g[..., 2, :])
    h = o * jnp.tanh(c)
    return {"h": h, "c": c}, h


def _gru(hidden: dict, carry: dict, xw: Array) -> tuple[dict, Array]:
    """GRU step from the projected input xw = x W_i + b_i [B, 3, Hd] (see ``gru_cell``)."""
    hw = layers.dense(hidden, carry["h"])
    r = jax.nn.sigmoid(xw[..., 0, :] + hw[..., 0, :])
    z = jax.nn.sigmoid(xw[..., 1, :] + hw[..., 1, :])
    n = jnp.tanh(xw[..., 2, :] + r * hw[..., 2, :])  # the reset gate scales W_hn h + b_hn, as torch
    h = (1.0 - z) * n + z * carry["h"]
    return {"h": h}, h


def lstm_cell(params: dict, carry: dict, x: Array) -> tuple[dict, Array]:
    """One LSTM step: x [B, D_in], carry {"h", "c"} [B, Hd] -> (new carry, h' [B, Hd]).

        i = σ(W_ii x + b_ii + W_hi h + b_hi)     f = σ(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)  o = σ(W_io x + b_io + W_ho h + b_ho)
        c' = f ⊙ c + i ⊙ g                       h' = o ⊙ tanh(c')
    """
    return _lstm(params["hidden"], carry, layers.dense(params["input"], x))


def gru_cell(params: dict, carry: dict, x: Array) -> tuple[dict, Array]:
    """One GRU step: x [B, D_in], carry {"h"} [B, Hd] -> (new carry, h' [B, Hd]).

        r = σ(W_ir x + b_ir + W_hr h + b_hr)     z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h
    """
    return _gru(params["hidden"], carry, layers.dense(params["input"], x))


_STEPS = {"lstm": _lstm, "gru": _gru}
_CELL_FNS = {"lstm": lstm_cell, "gru": gru_cell}


def zero_carry(cell: str, batch_size: int, d_hidden: int) -> dict:
    """The initial carry of zeros: ``{"h": [B, Hd]}``, plus ``"c"`` for an LSTM."""
    return {n: jnp.zeros((batch_size, d_hidden), jnp.float32) for n in _carry_names(cell)}


def _carry_names(cell: str) -> tuple[str, ...]:
    check_choice("cell", cell, CELLS)
    return ("h", "c") if cell == "lstm" else ("h",)


def _hold(valid: Array, new, old):
    """``new`` carry where ``valid`` [B], ``old`` elsewhere: a padded step changes nothing."""
    return jax.tree.map(lambda n, o: jnp.where(valid[:, None], n, o), new, old)


# ----------------------------------------------------------------------- layer


def init_rnn_layer(key: Array, cfg: RNNConfig, d_in: int) -> dict:
    """A stack of ``cfg.num_layers`` (bi)directional layers: ``{"layers": [{"forward": cell,
    "backward": cell}] * L}`` (no ``backward`` unless ``cfg.bidirectional``); layer 0 reads
    D_in features, the next ones the De = directions · Hd outputs of the layer below."""
    check_size("d_in", d_in)
    width = len(cfg.directions) * cfg.d_hidden
    return {"layers": [{d: init_rnn_cell(k, cfg.cell, d_in if l == 0 else width, cfg.d_hidden)
                        for d, k in zip(cfg.directions, jax.random.split(kl, len(cfg.directions)))}
                       for l, kl in enumerate(jax.random.split(key, cfg.num_layers))]}


def _run_direction(cell: str, params: dict, x: Array, valid: Array, carry: dict,
                   reverse: bool) -> tuple[Array, dict]:
    """One direction of one layer: x [B, T, D_in], valid [B, T] -> (y [B, T, Hd], final carry).

    The input projections x_t W_i + b_i do not depend on the carry, so they are one matmul
    over all steps before the scan; only h W_h + b_h stays inside the sequential loop.
    """
    xw = jnp.swapaxes(layers.dense(params["input"], x), 0, 1)  # [T, B, G, Hd]

    def step(carry, inputs):
        xw_t, valid_t = inputs
        new, h = _STEPS[cell](params["hidden"], carry, xw_t)
        return _hold(valid_t, new, carry), jnp.where(valid_t[:, None], h, jnp.zeros_like(h))

    carry, y = jax.lax.scan(step, carry, (xw, valid.T), reverse=reverse)
    return jnp.swapaxes(y, 0, 1), carry


def rnn_layer(params: dict, x: Array, ctx: Context, *, key: Array | None = None, state: list | None = None,
              cache: None = None) -> tuple[Array, dict]:
    """A multi-layer (bidirectional) LSTM / GRU over time, ``torch.nn.LSTM`` / ``GRU`` with ``batch_first``.

    x [B, T, D_in] -> y [B, T, De]: each layer runs ``ctx.cfg.cell`` forward over t = 0..T-1
    (and, if ``ctx.cfg.bidirectional``, backward over T-1..0) and concatenates the directions'
    h_t; layer l > 0 reads layer l-1's outputs, after dropout when ``key`` is given.

    ``ctx``: a ``blocks.Context`` whose ``cfg`` is an ``RNNConfig`` and whose ``valid`` [B, T]
    marks real steps (None: all). A padded step leaves the carry unchanged and outputs zeros,
    in either direction, so a row's final state and real outputs are those of the row
    without its padding (torch's packed sequences, whatever side the padding is on).

    ``state``: initial carries ``[{"forward": carry, "backward": carry}] * L`` (None: zeros).
    Returns ``(y, aux)``, ``aux["state"]`` the final carries in the same layout
    (``aux["attention"]`` and ``aux["cache"]`` are None: the carry is the cache).
    """
    if cache is not None:
        raise ValueError("cache: a recurrent layer keeps no cache; its carry is the state (pass state=)")
    cfg = ctx.cfg
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D_in], got shape {tuple(x.shape)}")
    B, T = x.shape[:2]
    valid = jnp.ones((B, T), bool) if ctx.valid is None else ctx.valid
    if valid.shape != (B, T):
        raise ValueError(f"ctx.valid {tuple(valid.shape)} must be [B, T] = {(B, T)}")
    finals = []
    for l, (p, k) in enumerate(zip(params["layers"], split_keys(key, len(params["layers"])))):
        if l:  # torch's `dropout`: on the outputs of every layer but the last
            x = layers.dropout(x, cfg.dropout_rate, k)
        ys, final = [], {}
        for d in cfg.directions:
            carry = zero_carry(cfg.cell, B, cfg.d_hidden) if state is None else state[l][d]
            y, final[d] = _run_direction(cfg.cell, p[d], x, valid, carry, reverse=d == "backward")
            ys.append(y)
        x = jnp.concatenate(ys, -1)
        finals.append(final)
    return x, {"state": finals, "attention": None, "cache": None}


# ------------------------------------------------------------------- attention


def init_additive_attention(key: Array, d_query: int, d_key: int, d_attention: int) -> dict:
    """Additive attention parameters: ``query`` W_q [Dq, A] + b [A], ``key`` W_k [Dk, A] (one bias
    is enough: it adds to both), ``score`` v [A, 1]. Glorot-uniform kernels."""
    kq, kk, kv = jax.random.split(key, 3)
    return {"query": layers.init_dense(kq, d_query, d_attention),
            "key": layers.init_dense(kk, d_key, d_attention, use_bias=False),
            "score": layers.init_dense(kv, d_attention, 1, use_bias=False)}


def additive_attention(params: dict, query: Array, keys: Array, mask: Array | None = None, *,
                       projected_keys: Array | None = None) -> tuple[Array, Array]:
    """Bahdanau attention: query [B, Dq], keys [B, S, Dk] -> (context [B, Dk], weights [B, S]).

        e_j = vᵀ tanh(W_q q + b + W_k k_j),   α = softmax_j(e) over j where mask,
        context = Σ_j α_j k_j

    ``mask`` [B, S] bool, True = may attend; a fully masked row gets zero weights and a zero
    context (finite, no NaN). Scores and softmax are float32. ``projected_keys`` [B, S, A]:
    W_k k computed once by the caller (a decoder attends to the same keys at every step).
    """
    if mask is not None and (mask.dtype != jnp.bool_ or mask.shape != keys.shape[:-1]):
        raise ValueError(f"mask must be bool {tuple(keys.shape[:-1])} (True = may attend), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    pk = layers.dense(params["key"], keys) if projected_keys is None else projected_keys
    energy = jnp.tanh(layers.dense(params["query"], query)[..., None, :] + pk)  # [B, S, A]
    scores = layers.dense(params["score"], energy)[..., 0].astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if mask is not None:  # a fully masked row was softmaxed uniformly: give it nothing
        weights = jnp.where(mask, weights, 0.0)
    return jnp.einsum("...s,...sk->...k", weights.astype(keys.dtype), keys), weights


# ----------------------------------------------------------------------- model


def init_rnn_seq2seq(key: Array, cfg: RNNConfig) -> dict:
    """Recurrent encoder-decoder parameters.

    ``src_embed`` [V_src, E], ``tgt_embed`` [V, E] (``embedding`` leaves); ``encoder``
    (``init_rnn_layer`` on E); ``bridge`` {"h" (+ "c")}: per-layer kernel [L, De, Hd], bias
    [L, Hd]; ``attention`` (``init_additive_attention``, Dq = Hd, Dk = De, A = Hd);
    ``decoder`` {"layers": [cell] * L}, layer 0 reading E + De; ``head`` [Hd + De + E, V].
    """
    E, Hd, L = cfg.d_embed, cfg.d_hidden, cfg.num_layers
    De = len(cfg.directions) * Hd
    k = jax.random.split(key, 7)
    carry_names = _carry_names(cfg.cell)
    return {
        "src_embed": layers.init_embedding(k[0], cfg.source_vocab_size, E),
        "tgt_embed": layers.init_embedding(k[1], cfg.vocab_size, E),
        "encoder": init_rnn_layer(k[2], cfg, E),
        "bridge": {n: jax.vmap(lambda kl: layers.init_dense(kl, De, Hd))(jax.random.split(kn, L))
                   for n, kn in zip(carry_names, jax.random.split(k[3], len(carry_names)))},
        "attention": init_additive_attention(k[4], Hd, De, Hd),
        "decoder": {"layers": [init_rnn_cell(kl, cfg.cell, E + De if l == 0 else Hd, Hd)
                               for l, kl in enumerate(jax.random.split(k[5], L))]},
        "head": layers.init_dense(k[6], Hd + De + E, cfg.vocab_size),
    }


def _check_tokens(name: str, tokens: Array, vocab_size: int) -> None:
    """A ValueError unless ``tokens`` are integer ids [B, T] in [0, vocab_size) (where concrete)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids [B, T], got shape {tuple(tokens.shape)} "
                         f"dtype {tokens.dtype}")
    layers.check_ids(name, tokens, vocab_size)


def _real(tokens: Array, cfg: RNNConfig, explicit: Array | None, name: str) -> Array:
    """Real (non-pad) tokens [B, T]: ``explicit`` if given, else tokens != pad_id, else all."""
    if explicit is None:
        return jnp.ones(tokens.shape, bool) if cfg.pad_id is None else tokens != cfg.pad_id
    if explicit.dtype != jnp.bool_ or explicit.shape != tokens.shape:
        raise ValueError(f"{name} must be bool {tuple(tokens.shape)} like its tokens (True = real), "
                         f"got {explicit.dtype} {tuple(explicit.shape)}")
    return explicit


def _encode(params: dict, src: Array, cfg: RNNConfig, src_mask: Array | None, key: Array | None):
    """Source [B, S] -> memory [B, S, De], its projected keys W_k h [B, S, A], its mask [B, S] and
    the decoder's initial carries: per layer l, s_0 = tanh(W_l [h→_l; h←_l] + b_l) for h (and c)."""
    k_emb, k_rnn = split_keys(key, 2)
    valid = _real(src, cfg, src_mask, "src_mask")
    x = layers.dropout(layers.embed(params["src_embed"], src), cfg.dropout_rate, k_emb)
    memory, aux = rnn_layer(params["encoder"], x, Context(cfg, valid=valid), key=k_rnn)
    init = {}
    for n, bridge in params["bridge"].items():
        finals = jnp.stack([jnp.concatenate([f[d][n] for d in cfg.directions], -1) for f in aux["state"]])
        init[n] = jnp.tanh(jax.vmap(layers.dense)(bridge, finals))  # [L, B, Hd]
    carry = [{n: v[l] for n, v in init.items()} for l in range(cfg.num_layers)]
    return memory, layers.dense(params["attention"]["key"], memory), valid, carry


def _decoder_step(params: dict, cfg: RNNConfig, memory: tuple, carry: list, emb: Array, valid: Array,
                  key: Array | None) -> tuple[list, Array, Array]:
    """One target step: carries s_{t-1} [L] and the embedding [B, E] of y_{t-1} -> (carries s_t,
    logits [B, V], attention weights [B, S]).

        c_t = Σ_j α_tj h_j,  α_t = attention(s_{t-1}^top, h)   (the previous top hidden state asks)
        s_t = RNN([emb; c_t], s_{t-1}),   logits = W_o [s_t^top; c_t; emb] + b_o

    A padded input (``valid`` [B] False) leaves the carries as they were.
    """
    memory, projected, memory_valid = memory
    context, weights = additive_attention(params["attention"], carry[-1]["h"], memory, memory_valid,
                                          projected_keys=projected)
    h = jnp.concatenate([emb, context], -1)
    new = []
    for l, (p, k) in enumerate(zip(params["decoder"]["layers"], split_keys(key, cfg.num_layers))):
        if l:
            h = layers.dropout(h, cfg.dropout_rate, k)
        c, h = _CELL_FNS[cfg.cell](p, carry[l], h)
        new.append(c)
    logits = layers.dense(params["head"], jnp.concatenate([h, context, emb], -1))
    return _hold(valid, new, carry), logits, weights


def rnn_seq2seq_apply(params: dict, src: Array, tgt_in: Array, *, cfg: RNNConfig, exe: ExecConfig | None = None,
                      state: dict | None = None, train: bool = False, key: Array | None = None,
                      src_mask: Array | None = None, tgt_mask: Array | None = None,
                      return_attention: bool = False) -> tuple[Array, dict]:
    """Teacher-forced recurrent encoder-decoder: P(y_t | y_<t, x) logits [B, T, V] for source
    [B, S] and target inputs [B, T] (BOS-shifted targets), ``models.seq2seq_apply``'s convention.

    Padding comes from ``cfg.pad_id``, or from ``src_mask`` [B, S] / ``tgt_mask`` [B, T]
    (bool, True = real). Dropout runs when ``key`` is given. ``exe``, ``state`` and ``train``
    are taken for the shared signature (``training.seq2seq_loss(..., apply_fn=...)`` passes
    them) and change nothing: the model runs in float32 and has no BatchNorm statistics.
    Returns ``(logits, aux)``: ``aux["attention"]`` the weights [B, T, S] with
    ``return_attention`` (else None), ``aux["state"] = {}``, ``aux["cache"] = None``.
    An id outside the vocabulary raises a ValueError, or makes NaN logits under ``jit``.
    """
    _check_tokens("src", src, cfg.source_vocab_size)
    _check_tokens("tgt_in", tgt_in, cfg.vocab_size)
    if src.shape[0] != tgt_in.shape[0]:
        raise ValueError(f"src {tuple(src.shape)} and tgt_in {tuple(tgt_in.shape)} must share the batch size")
    k_enc, k_emb, k_dec = split_keys(key, 3)
    memory, projected, memory_valid, carry = _encode(params, src, cfg, src_mask, k_enc)
    valid = _real(tgt_in, cfg, tgt_mask, "tgt_mask")
    emb = layers.dropout(layers.embed(params["tgt_embed"], tgt_in), cfg.dropout_rate, k_emb)
    step_keys = None if k_dec is None else jax.random.split(k_dec, tgt_in.shape[1])

    def step(carry, xs):
        emb_t, valid_t, k = xs
        carry, logits, weights = _decoder_step(params, cfg, (memory, projected, memory_valid), carry,
                                               emb_t, valid_t, k)
        return carry, (logits, weights if return_attention else None)

    _, (logits, weights) = jax.lax.scan(step, carry, (jnp.swapaxes(emb, 0, 1), valid.T, step_keys))
    weights = jnp.swapaxes(weights, 0, 1) if return_attention else None
    return jnp.swapaxes(logits, 0, 1), {"state": {}, "attention": weights, "cache": None}


def rnn_greedy_decode(params: dict, src: Array, *, cfg: RNNConfig, max_len: int, bos_id: int,
                      eos_id: int | None, src_mask: Array | None = None) -> Array:
    """Greedy decoding: source [B, S] -> tokens [B, max_len], y_t = argmax P(y | y_<t, x).

    The source is encoded once; a ``lax.scan`` of ``max_len`` steps carries the decoder
    state (the recurrent "cache": h, c per layer) and the last token. After a row emits
    ``eos_id`` (kept) every later token is ``cfg.pad_id`` (``eos_id`` without one);
    ``eos_id=None`` never stops. A row whose logits are NaN (an out-of-range source id
    under ``jit``) emits -1. Jit-able with ``cfg``, ``max_len``, ``bos_id``, ``eos_id`` static;
    equals the argmax of ``rnn_seq2seq_apply`` on its own output (BOS-shifted) up to EOS.
    """
    _check_tokens("src", src, cfg.source_vocab_size)
    check_size("max_len", max_len)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size})")
    memory, projected, memory_valid, carry = _encode(params, src, cfg, src_mask, None)
    fill = cfg.pad_id if cfg.pad_id is not None else (0 if eos_id is None else eos_id)
    B = src.shape[0]

    def step(c, _):
        carry, last, done = c
        valid = jnp.ones((B,), bool) if cfg.pad_id is None else last != cfg.pad_id  # as tgt_in padding
        carry, logits, _ = _decoder_step(params, cfg, (memory, projected, memory_valid), carry,
                                         layers.embed(params["tgt_embed"], last), valid, None)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        token = jnp.where(jnp.isnan(logits).any(-1), -1, token)  # fed back, the row stays NaN
        token = jnp.where(done, fill, token)
        if eos_id is not None:
            done = done | (token == eos_id)
        return (carry, token, done), token

    init = (carry, jnp.full((B,), bos_id, jnp.int32), jnp.zeros((B,), bool))
    return jax.lax.scan(step, init, None, length=max_len)[1].T
