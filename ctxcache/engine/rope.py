"""Rotary position embedding, and moving cached keys to new positions.

Design decision: **cached K is stored after RoPE** (rotated at the positions it was encoded at),
like every production engine does, because attention kernels consume rotated keys and a prefix
hit then needs no work at all. RoPE is a rotation per frequency pair, and rotations compose:
``R(p + d) = R(d) · R(p)``. So a chunk cached at positions ``0..n`` is placed at offset ``d`` by
rotating its keys once more by ``d`` (``rope_shift``) — exact up to float rounding, no need to keep
pre-RoPE keys. V carries no position and is reused as is.

The inverse frequencies come from the HF model's rotary module, so scaled variants (llama3,
linear, YaRN, …) are honoured; their ``attention_scaling`` multiplies cos/sin once at encode time
and is *not* applied again by a shift (a shift is a pure rotation).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """RoPE for one model: ``apply`` at encode time, ``shift`` to re-position cached keys."""

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0):
        self.inv_freq = inv_freq.detach().to(torch.float32)
        self.attention_scaling = float(attention_scaling)
        self._on: dict = {}
        self._table: dict = {}  # device → (cos, sin) [max_pos, D] fp32, grown on demand

    def inv_freq_on(self, device) -> Tensor:
        key = str(device)
        if key not in self._on:
            self._on[key] = self.inv_freq.to(device)
        return self._on[key]

    def _tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        key = str(positions.device)
        need = int(positions.max()) + 1 if positions.numel() else 1
        tab = self._table.get(key)
        if tab is None or tab[0].shape[0] < need:
            n = max(need, 2 * (tab[0].shape[0] if tab is not None else 2048))
            cos, sin = self.cos_sin(torch.arange(n, device=positions.device))
            tab = self._table[key] = (cos, sin)
        return tab

    @classmethod
    def from_hf(cls, rotary_emb) -> "Rope":
        return cls(rotary_emb.inv_freq, getattr(rotary_emb, "attention_scaling", 1.0))

    def cos_sin(self, positions: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """cos/sin tables of shape [T, head_dim] in float32 for integer ``positions`` [T]."""
        inv = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` [H, T, D] to ``positions`` [T]; math in x's dtype, as HF does.

        cos/sin come from a table cached per device (non-negative positions)."""
        if positions.numel() and int(positions.min()) >= 0:
            cos_t, sin_t = self._tables(positions)
            cos, sin = cos_t[positions], sin_t[positions]
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        else:
            cos, sin = self.cos_sin(positions, self.attention_scaling)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def shift(self, k: Tensor, delta: Tensor | int) -> Tensor:
        """Return keys ``k`` [..., T, D] rotated by ``delta`` positions (scalar or [T]).

        Computed in float32 and cast back, so shifting a bf16 cache adds one rounding only.
        """
        t = k.shape[-2]
        if not torch.is_tensor(delta):
            delta = torch.full((t,), int(delta), dtype=torch.long, device=k.device)
        if delta.numel() == 1 and t != 1:
            delta = delta.reshape(1).expand(t)
        if delta.shape != (t,):
            raise ValueError(f"delta must be a scalar or have {t} entries, got {tuple(delta.shape)}")
        cos, sin = self.cos_sin(delta.to(k.device))
        kf = k.to(torch.float32)
        return (kf * cos + rotate_half(kf) * sin).to(k.dtype)


def rope_shift(rope: Rope, k: Tensor, delta: Tensor | int) -> Tensor:
    """Functional form of ``Rope.shift``: place keys cached at p at p + delta."""
    return rope.shift(k, delta)
