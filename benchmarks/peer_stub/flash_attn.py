"""Stand-in for the two flash-attn functions the official DC-DiT imports, for `gpu_peers.py` on a machine
without flash-attn (it has no wheel for every torch). NOT flash-attn: on CUDA in half precision the varlen
function is torch's own FlashAttention varlen kernel (``torch.nn.attention.varlen.varlen_attn``), the
same kernel dyncompute uses there, so both sides pay the same attention; elsewhere it loops over the
sequences with SDPA, like peer-bench's CPU stand-in.
"""
import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """qkv (B, N, 3, H, d) -> (B, N, H, d): one fused SDPA call."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                          scale=softmax_scale).transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """Packed (T, H, d) sequences delimited by cu_seqlens -> (T, H, d)."""
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout_p:
        extra = {} if softmax_scale is None else {"scale": softmax_scale}  # older torch: fewer keywords
        if causal:
            extra["window_size"] = (-1, 0)
        return varlen_attn(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), int(max_seqlen_q), int(max_seqlen_k),
                           **extra)
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1),
                                           dropout_p=dropout_p, is_causal=causal, scale=softmax_scale).transpose(0, 1)
            for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outs)
