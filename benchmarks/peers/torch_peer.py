"""PyTorch peer: the benchmark workloads in idiomatic PyTorch (CPU, float32).

Builds, for ``benchmarks.workloads``:

* ``lm`` / ``decode``: token + learned-position ``nn.Embedding`` tables, an
  ``nn.TransformerEncoder`` of Pre-LN ``nn.TransformerEncoderLayer`` (erf GELU) run
  with a causal mask, a final ``nn.LayerNorm`` and an untied ``nn.Linear`` head.
* ``s2s``: separate src/tgt token and position tables, ``nn.Transformer`` (Post-LN,
  ReLU; source padding masks, causal target mask) and an ``nn.Linear`` head.
* ``long``: one causal self-attention layer (fused qkv ``nn.Linear``,
  ``F.scaled_dot_product_attention``, output ``nn.Linear``).

Training uses ``torch.optim.AdamW`` and token cross-entropy ignoring pad id 0.
Variant ``"eager"`` runs the modules as they are; ``"compile"`` wraps the model in
``torch.compile`` (default mode), so the first ``train_step`` call compiles it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import Bench
from benchmarks.workloads import PAD, Workload


def _causal_mask(t: int) -> torch.Tensor:
    """Float [t, t] mask: 0 on and below the diagonal, -inf above."""
    return nn.Transformer.generate_square_subsequent_mask(t)


class DecoderLM(nn.Module):
    """Decoder-only Pre-LN LM: ``forward(ids)`` -> logits, ``forward(ids, targets)`` -> loss."""

    def __init__(self, w: Workload):
        super().__init__()
        D = w.d_model
        self.tok = nn.Embedding(w.vocab, D)
        self.pos = nn.Embedding(w.length, D)
        layer = nn.TransformerEncoderLayer(D, w.heads, w.d_ff, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-5, batch_first=True, norm_first=True)
        # Nested tensors only speed up padded inputs in eval mode; the LM has no padding.
        self.blocks = nn.TransformerEncoder(layer, w.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D, eps=1e-5)
        self.head = nn.Linear(D, w.vocab)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        x = self.blocks(x, mask=_causal_mask(T), is_causal=True)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        # The loss lives inside forward (nanoGPT style) so torch.compile covers it too.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)


class Seq2Seq(nn.Module):
    """Post-LN ``nn.Transformer`` encoder-decoder: ``forward(src, tgt_in, tgt_out)`` -> loss."""

    def __init__(self, w: Workload):
        super().__init__()
        D, V, T = w.d_model, w.vocab, w.length
        self.src_tok, self.src_pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.tgt_tok, self.tgt_pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.transformer = nn.Transformer(D, w.heads, num_encoder_layers=w.layers,
                                          num_decoder_layers=w.decoder_layers, dim_feedforward=w.d_ff,
                                          dropout=0.0, activation="relu", batch_first=True, norm_first=False)
        self.head = nn.Linear(D, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        S, T = src.shape[1], tgt_in.shape[1]
        x = self.src_tok(src) + self.src_pos(torch.arange(S, device=src.device))
        y = self.tgt_tok(tgt_in) + self.tgt_pos(torch.arange(T, device=tgt_in.device))
        src_pad = src == PAD  # True = ignore this key, in encoder self- and decoder cross-attention
        h = self.transformer(x, y, tgt_mask=_causal_mask(T), tgt_is_causal=True,
                             src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=PAD)


class CausalSelfAttention(nn.Module):
    """One causal multi-head self-attention layer: fused qkv projection, SDPA, output projection."""

    def __init__(self, w: Workload):
        super().__init__()
        self.heads = w.heads
        self.qkv = nn.Linear(w.d_model, 3 * w.d_model)
        self.out = nn.Linear(w.d_model, w.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # [B, T, 3, N, H] -> three [B, N, T, H] tensors, the layout SDPA expects.
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_bench(model: nn.Module, args: tuple[torch.Tensor, ...], variant: str) -> Bench:
    """Bench for ``lm`` / ``s2s``: ``model(*args)`` is the loss; AdamW on all parameters."""
    num_params = _num_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if variant == "compile":
        model = torch.compile(model)  # lazy: compiles on the first call, i.e. the first train_step

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(*args)
        loss.backward()
        opt.step()
        return loss.item()

    def forward() -> float:
        with torch.no_grad():
            return model(*args).item()

    return Bench(num_params=num_params, train_step=train_step, forward=forward)


def _long_bench(w: Workload, batch: dict[str, np.ndarray], variant: str) -> Bench:
    """Bench for ``long``: forward + backward of sum(attention(x)) w.r.t. x and the weights."""
    layer = CausalSelfAttention(w)
    num_params = _num_params(layer)
    x = torch.from_numpy(batch["x"]).requires_grad_(True)
    if variant == "compile":
        layer = torch.compile(layer)

    def train_step() -> float:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        s = layer(x).sum()
        s.backward()
        return s.item()

    def forward() -> float:
        with torch.no_grad():
            return layer(x).sum().item()

    return Bench(num_params=num_params, train_step=train_step, forward=forward)


def _decode_bench(w: Workload, batch: dict[str, np.ndarray]) -> Bench:
    """Bench for ``decode``: greedy generation re-running the full prefix every token (no KV cache)."""
    model = DecoderLM(w).eval()
    prompt = torch.from_numpy(batch["prompt"]).long()

    def generate_full() -> np.ndarray:
        ids = prompt
        with torch.inference_mode():
            for _ in range(w.new_tokens):
                next_ids = model(ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_ids], dim=1)
        return ids[:, 1:].numpy()

    # nn.TransformerEncoderLayer has no key/value cache, so there is no cached path.
    return Bench(num_params=_num_params(model), generate_full=generate_full, generate_cached=None)


def build(w: Workload, batch: dict[str, np.ndarray], variant: str | None) -> Bench:
    """Build workload ``w`` on ``batch`` in PyTorch; ``variant`` is ``"eager"`` (default) or ``"compile"``."""
    variant = variant or "eager"
    if variant not in ("eager", "compile"):
        raise ValueError(f"unknown torch variant {variant!r}")
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    if w.kind == "decode":
        if variant != "eager":
            raise ValueError("decode is measured in eager mode only")
        return _decode_bench(w, batch)
    if w.kind == "long":
        return _long_bench(w, batch, variant)
    # int32 numpy -> int64 tensors once, here, not per step (embeddings and cross_entropy want int64).
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    if w.kind == "lm":
        return _train_bench(DecoderLM(w), (t["inputs"], t["targets"]), variant)
    if w.kind == "s2s":
        return _train_bench(Seq2Seq(w), (t["src"], t["tgt_in"], t["tgt_out"]), variant)
    raise ValueError(f"unknown workload kind {w.kind!r}")
