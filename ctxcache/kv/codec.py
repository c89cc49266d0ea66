"""How K/V tensors are stored: raw, or quantized (KIVI / CacheGen style).

Keys have outlier *channels* (a few head dims are large for every token), values do not, so K is
quantized per channel (one scale per layer/head/channel, over the chunk's tokens) and V per token
(one scale per layer/head/token, over channels). Symmetric round-to-nearest; int4 packs two
values per byte. Reconstruction error and the effect on next-token logits are measured in the
tests and in ``benchmarks/kvstore.py``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ctxcache.errors import InvalidInputError


class Codec(Protocol):
    name: str

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]: ...

    def decode(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]: ...


class RawCodec:
    """Model dtype as is: lossless."""

    name = "raw"

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        return {"k": k, "v": v}

    def decode(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return tensors["k"].to(dtype), tensors["v"].to(dtype)


def _quantize(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor]:
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / qmax
    q = torch.round(xf / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale.to(torch.float16 if x.dtype != torch.float32 else torch.float32)


def _dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scale.float()).to(dtype)


def _pack4(q: Tensor) -> Tensor:
    """int8 values in [-7, 7] → uint8, two per byte (last dim must be even)."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(p: Tensor) -> Tensor:
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


class QuantCodec:
    """K per-channel, V per-token symmetric quantization to ``bits`` (8 or 4)."""

    def __init__(self, bits: int = 8):
        if bits not in (4, 8):
            raise InvalidInputError("quantized codec supports 4 or 8 bits")
        self.bits = bits
        self.name = f"int{bits}"

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        kq, ks = _quantize(k, dim=2, bits=self.bits)  # over tokens → per channel
        vq, vs = _quantize(v, dim=3, bits=self.bits)  # over channels → per token
        if self.bits == 4:
            if k.shape[-1] % 2:
                raise InvalidInputError("int4 needs an even head_dim")
            kq, vq = _pack4(kq), _pack4(vq)
        return {"k.q": kq, "k.scale": ks, "v.q": vq, "v.scale": vs}

    def decode(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        kq, vq = tensors["k.q"], tensors["v.q"]
        if self.bits == 4:
            kq, vq = _unpack4(kq), _unpack4(vq)
        return (_dequantize(kq, tensors["k.scale"], dtype),
                _dequantize(vq, tensors["v.scale"], dtype))


CODECS = {"raw": RawCodec, "int8": lambda: QuantCodec(8), "int4": lambda: QuantCodec(4)}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]()
    except KeyError:
        raise InvalidInputError(f"unknown codec {name!r}; use one of {sorted(CODECS)}") from None
