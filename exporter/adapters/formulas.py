"""Delta weights of the LoRA family, in fp32, from the tensors a file stores for one module.

Each function returns the unscaled ΔW (in its natural shape, or reshaped to `shape`); the caller
multiplies by (user multiplier × file scale). Formulas follow the public definitions:
kohya-ss LoRA / LoCon (with the Tucker `lora_mid` core), LyCORIS LoHa (Hadamard product of
two low-rank products, optionally Tucker) and LoKr (Kronecker product of two factors, each
full, low-rank or — for the second — Tucker).
"""

from __future__ import annotations

import torch


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A stored factor as a 2-D matrix: (rows, everything else)."""
    return t.reshape(t.shape[0], -1)


def tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Rebuild (p, r, kh, kw) from a Tucker core (i, j, kh, kw), left (i, p) and right (j, r).

    LyCORIS stores both factors with the rank first: out-factor (rank, out), in-factor (rank, in).
    """
    return torch.einsum("ijkl,ip,jr->prkl", core, _matrix(left), _matrix(right))


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None, *, shape=None) -> torch.Tensor:
    """kohya LoRA: up (out, r[,1,1]) @ down (r, in[,kh,kw]); with `mid` (r, r, kh, kw) the
    conv kernel is the Tucker product mid ×₀ up ×₁ down."""
    if mid is not None:
        delta = torch.einsum("nmkl,in,mj->ijkl", mid, _matrix(up), _matrix(down))
    else:
        delta = (_matrix(up) @ _matrix(down)).reshape(up.shape[0], *down.shape[1:])
    return delta if shape is None else delta.reshape(shape)


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None, *, shape=None) -> torch.Tensor:
    """LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores each factor is rebuilt from
    its core, w*_a (r, out) and w*_b (r, in)."""
    def factor(a, b, core):
        if core is not None:
            return tucker(core, a, b)
        return (_matrix(a) @ _matrix(b)).reshape(a.shape[0], *b.shape[1:])

    delta = factor(w1a, w1b, t1) * factor(w2a, w2b, t2)
    return delta if shape is None else delta.reshape(shape)


def lokr_delta(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None, *, shape=None) -> torch.Tensor:
    """LoKr: ΔW = w1 ⊗ w2, w1 (a, c) full or w1a @ w1b; w2 (b, d[, kh, kw]) full, w2a @ w2b,
    or Tucker (t2, w2a (r, b), w2b (r, d)). For conv weights w1 acts as (a, c, 1, 1)."""
    if w1 is None:
        w1 = _matrix(w1a) @ _matrix(w1b)
    if w2 is None:
        if t2 is not None:
            w2 = tucker(t2, w2a, w2b)
        else:
            rest = w2b.shape[1:]
            w2 = (_matrix(w2a) @ _matrix(w2b)).reshape(w2a.shape[0], *rest)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    delta = torch.kron(w1, w2.contiguous())
    return delta if shape is None else delta.reshape(shape)


def rank_of(kind: str, tensors: dict) -> int | None:
    """The rank that `alpha` is divided by; None where the format applies no alpha scaling."""
    if kind in ("lora", "peft"):
        key = "lora_down.weight" if kind == "lora" else "lora_A.weight"
        return int(tensors[key].shape[0])
    if kind == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    if kind == "lokr":  # rank of the factored w2 (else w1); both full -> no alpha scaling
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in tensors:
                return int(tensors[key].shape[0])
        return None
    raise ValueError(kind)


def scale_of(kind: str, tensors: dict, alpha: float | None) -> float:
    """alpha / rank, with kohya's convention that a missing or zero alpha means alpha = rank."""
    rank = rank_of(kind, tensors)
    if rank is None or alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank
