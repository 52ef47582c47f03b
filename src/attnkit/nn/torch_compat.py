"""The boundary with ``torch.nn.MultiheadAttention``: mask polarity and weight layout.

Legend: B batch, H heads, L (= Nq) target length, S (= Nk) source length, E embed dim.

torch's conventions differ from attnkit's, and are converted here and nowhere else:
- ``attn_mask`` bool: True = NOT allowed (attnkit: True = may attend). Float: added to the
  scores (-inf blocks). Shapes (L, S) or (B * H, L, S), batch-major.
- ``key_padding_mask`` (B, S) bool: True = padding. Float: added to the scores.
- A query row with no allowed key gives NaN in torch and zeros in attnkit.
- Weights: ``in_proj_weight`` (3E, E) = [W_q; W_k; W_v] when kdim == vdim == E, otherwise
  separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``; ``in_proj_bias`` (3E,).
"""

from __future__ import annotations

import torch

from .._validate import shape_str


def _split_float(name: str, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float additive mask -> (bool allowed or None, finite bias or None)."""
    blocked = torch.isneginf(t)
    if torch.isnan(t).any() or torch.isposinf(t).any():
        raise ValueError(f"{name}: a float mask may hold finite values and -inf only, got NaN or +inf")
    allowed = ~blocked if bool(blocked.any()) else None
    finite = torch.where(blocked, torch.zeros_like(t), t)
    bias = finite if bool((finite != 0).any()) else None
    return allowed, bias


def convert_attn_mask(attn_mask: torch.Tensor | None, *, batch: int, num_heads: int, nq: int, nk: int):
    """torch's ``attn_mask`` -> (mask, bias) in attnkit form.

    Returns mask: bool (1, 1, L, S) or (B, H, L, S) with True = may attend, or None; bias: float
    tensor of the same shape added to the scores, or None.
    """
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"torch_attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (nq, nk):
            raise ValueError(f"torch_attn_mask of shape {shape_str(attn_mask)}: expected (L, S) = ({nq}, {nk})")
        t = attn_mask.view(1, 1, nq, nk)  # (1, 1, L, S)
    elif attn_mask.dim() == 3:
        if tuple(attn_mask.shape) != (batch * num_heads, nq, nk):
            raise ValueError(f"torch_attn_mask of shape {shape_str(attn_mask)}: expected (B * H, L, S) = "
                             f"({batch * num_heads}, {nq}, {nk})")
        t = attn_mask.view(batch, num_heads, nq, nk)  # (B, H, L, S), torch is batch-major
    else:
        raise ValueError(f"torch_attn_mask must be 2-D (L, S) or 3-D (B * H, L, S), got {shape_str(attn_mask)}")
    if t.dtype == torch.bool:
        return ~t, None
    if t.is_floating_point():
        return _split_float("torch_attn_mask", t)
    raise TypeError(f"torch_attn_mask must be bool (True = blocked) or float (added), got {t.dtype}")


def convert_key_padding_mask(kpm: torch.Tensor | None, *, batch: int, nk: int):
    """torch's ``key_padding_mask`` (B, S) -> (mask (B, 1, 1, S) True = may attend, bias) or Nones."""
    if kpm is None:
        return None, None
    if not isinstance(kpm, torch.Tensor) or tuple(kpm.shape) != (batch, nk):
        got = shape_str(kpm) if isinstance(kpm, torch.Tensor) else type(kpm).__name__
        raise ValueError(f"key_padding_mask must be a (B, Nk) = ({batch}, {nk}) tensor with True = padding, got {got}")
    t = kpm.view(batch, 1, 1, nk)  # (B, 1, 1, S)
    if t.dtype == torch.bool:
        return ~t, None
    if t.is_floating_point():
        return _split_float("key_padding_mask", t)
    raise TypeError(f"key_padding_mask must be bool (True = padding) or float (added), got {kpm.dtype}")


def torch_weights(m: torch.nn.MultiheadAttention) -> dict[str, torch.Tensor | None]:
    """{q,k,v,out}_{weight,bias} from a torch MHA (copies, detached)."""
    E = m.embed_dim
    if m.bias_k is not None or m.bias_v is not None:
        raise ValueError("from_torch: add_bias_kv=True (learned extra key/value token) is not supported; "
                         "build the torch module with add_bias_kv=False")
    if m.add_zero_attn:
        raise ValueError("from_torch: add_zero_attn=True (an extra all-zero key/value) is not supported")
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.detach().split(E, dim=0)
    else:
        wq, wk, wv = m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.detach().split(E, dim=0)
    else:
        bq = bk = bv = None
    ob = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
    return {"q_weight": wq, "k_weight": wk, "v_weight": wv, "q_bias": bq, "k_bias": bk, "v_bias": bv,
            "out_weight": m.out_proj.weight.detach(), "out_bias": ob}


def load_torch_weights(m: torch.nn.MultiheadAttention, w: dict[str, torch.Tensor | None]) -> None:
    """Write {q,k,v,out}_{weight,bias} into a torch MHA (inverse of torch_weights)."""
    with torch.no_grad():
        if m._qkv_same_embed_dim:
            m.in_proj_weight.copy_(torch.cat([w["q_weight"], w["k_weight"], w["v_weight"]], dim=0))
        else:
            m.q_proj_weight.copy_(w["q_weight"])
            m.k_proj_weight.copy_(w["k_weight"])
            m.v_proj_weight.copy_(w["v_weight"])
        if m.in_proj_bias is not None:
            m.in_proj_bias.copy_(torch.cat([w["q_bias"], w["k_bias"], w["v_bias"]], dim=0))
        m.out_proj.weight.copy_(w["out_weight"])
        if m.out_proj.bias is not None:
            m.out_proj.bias.copy_(w["out_bias"])


__all__ = ["convert_attn_mask", "convert_key_padding_mask", "torch_weights", "load_torch_weights"]
