"""The benchmark workloads: one architecture definition every peer library builds.

Every peer (``benchmarks/peers/<name>.py``) builds exactly this network, and the
runner checks that its parameter count equals ``Workload.num_params``:

Decoder-only LM (``lm-small``, ``lm-medium``; Pre-LN, GPT-2 style)::

    x = E_tok[ids] + E_pos[0..T-1]                 E_tok [V, D], E_pos [T, D]   (no √D scaling)
    L times:  x = x + MHA(LN(x), causal)           q, k, v, out: Linear(D, D) with bias
              x = x + W2 · GELU(W1 · LN(x))        W1 [D, 4D] + b, W2 [4D, D] + b, exact (erf) GELU
    logits = Linear(D, V)(LN(x))                   untied head with bias; LN: scale + bias, eps 1e-5

Encoder-decoder (``s2s-small``; Post-LN as in ``torch.nn.Transformer``, ReLU)::

    src: E_src[ids] + P_src, tgt: E_tgt[ids] + P_tgt    (separate token and learned-position tables)
    encoder layer: x = LN(x + MHA(x, src padding)); x = LN(x + FFN(x))
    decoder layer: y = LN(y + MHA(y, causal)); y = LN(y + MHA(y, memory, src padding)); y = LN(y + FFN(y))
    a final LN after each stack (as nn.Transformer has), then Linear(D, V) with bias

Training (every peer): float32, no dropout, AdamW(lr 1e-4, β (0.9, 0.999), ε 1e-8, weight
decay 0.01 on every parameter), mean token cross-entropy over non-padding targets
(pad id 0), one fixed batch from ``make_batch`` reused every step.

``decode``: greedy generation of 256 tokens from a 1-token prompt with the ``lm-small``
model, batch 8 (input positions 0..255, so the 256-position table suffices).
``long``: one self-attention layer (D 256, N 8, causal, B 1) forward + backward at
T = 4096, 8192, 16384.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD = 0


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark configuration. ``kind`` is ``lm``, ``s2s``, ``decode`` or ``long``."""

    name: str
    kind: str
    vocab: int = 256
    d_model: int = 256
    heads: int = 8
    layers: int = 4
    decoder_layers: int = 0
    length: int = 256
    batch: int = 16
    d_ff: int = 1024
    activation: str = "gelu"
    norm_position: str = "pre"
    pad_fraction: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_step(self) -> int:
        """Target positions per train step (padding included): B · T."""
        return self.batch * self.length

    @property
    def num_params(self) -> int:
        """Parameter count of the architecture in the module docstring."""
        D, F, V, T = self.d_model, self.d_ff, self.vocab, self.length
        attn = 4 * (D * D + D)
        ffn = D * F + F + F * D + D
        ln = 2 * D
        head = D * V + V
        if self.kind in ("lm", "decode"):
            return V * D + T * D + self.layers * (attn + ffn + 2 * ln) + ln + head
        if self.kind == "s2s":
            enc = self.layers * (attn + ffn + 2 * ln) + ln
            dec = self.decoder_layers * (2 * attn + ffn + 3 * ln) + ln
            return 2 * (V * D + T * D) + enc + dec + head
        return attn  # long: one attention layer

    def train_flops(self) -> float:
        """Model FLOPs of one train step (3 × forward: backward costs two forwards).

        Forward = 2 · (matmul parameters) · tokens + attention 2 · 2 · T · S · D per
        layer and sequence (QKᵀ and AV, causal counted in full as in the PaLM MFU
        convention). Embedding lookups, norms and softmax are not counted.
        """
        D, F, V, T, B = self.d_model, self.d_ff, self.vocab, self.length, self.batch
        attn_mm, ffn_mm = 4 * D * D, 2 * D * F
        if self.kind == "lm":
            fwd = 2 * B * T * (self.layers * (attn_mm + ffn_mm) + D * V) + self.layers * 4 * B * T * T * D
        elif self.kind == "s2s":
            enc = self.layers * (2 * B * T * (attn_mm + ffn_mm) + 4 * B * T * T * D)
            dec = self.decoder_layers * (2 * B * T * (2 * attn_mm + ffn_mm) + 2 * 4 * B * T * T * D)
            fwd = enc + dec + 2 * B * T * D * V
        else:
            raise ValueError(f"no train FLOPs for kind {self.kind!r}")
        return 3.0 * fwd


WORKLOADS = {
    w.name: w for w in (
        Workload("lm-small", "lm", vocab=256, d_model=256, heads=8, layers=4, length=256, batch=16, d_ff=1024),
        Workload("lm-medium", "lm", vocab=8192, d_model=512, heads=8, layers=6, length=512, batch=8, d_ff=2048),
        Workload("s2s-small", "s2s", vocab=8000, d_model=256, heads=8, layers=3, decoder_layers=3, length=64,
                 batch=64, d_ff=1024, activation="relu", norm_position="post", pad_fraction=0.1),
        Workload("decode", "decode", vocab=256, d_model=256, heads=8, layers=4, length=256, batch=8,
                 d_ff=1024, new_tokens=256),
        Workload("long-4k", "long", d_model=256, heads=8, length=4096, batch=1),
        Workload("long-8k", "long", d_model=256, heads=8, length=8192, batch=1),
        Workload("long-16k", "long", d_model=256, heads=8, length=16384, batch=1),
    )
}


def make_batch(w: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed int32 batch of a workload (numpy; peers convert it).

    * ``lm``: ``inputs``, ``targets`` [B, T] (targets = inputs shifted by one), no padding.
    * ``s2s``: ``src``, ``tgt_in``, ``tgt_out`` [B, T]; each row keeps a random length in
      [T·(1 - 2·pad_fraction), T] (so ~pad_fraction of positions are padding, id 0 at the end);
      ``tgt_in`` is ``tgt_out`` shifted right behind a BOS id 1.
    * ``decode``: ``prompt`` [B, 1].
    * ``long``: ``x`` float32 [B, T, D] ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    B, T, V = w.batch, w.length, w.vocab
    if w.kind == "lm":
        seq = rng.integers(2, V, (B, T + 1), dtype=np.int32)
        return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}
    if w.kind == "s2s":
        def padded():
            ids = rng.integers(2, V, (B, T), dtype=np.int32)
            lengths = rng.integers(int(round(T * (1 - 2 * w.pad_fraction))), T + 1, B)
            return np.where(np.arange(T)[None, :] < lengths[:, None], ids, PAD).astype(np.int32)
        src, tgt_out = padded(), padded()
        tgt_in = np.concatenate([np.ones((B, 1), np.int32), tgt_out[:, :-1]], 1)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
    if w.kind == "decode":
        return {"prompt": rng.integers(2, V, (B, 1), dtype=np.int32)}
    return {"x": rng.standard_normal((B, T, w.d_model), dtype=np.float32)}
