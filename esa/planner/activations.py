"""Bytes of activations a transformers decoder keeps for backward, per layer, from first principles.

Each function counts the distinct tensors autograd saves (views of one storage count once;
parameters are not activations) for B windows of T tokens, n = B*T, in model dtype of `b`
bytes. The terms were derived by reading the transformers implementations and checked by
counting the saved tensors of real tiny models with `torch.autograd.graph.saved_tensors_hooks`
(tests/test_planner.py does this for every family, dtype and attention kernel). Symbols:
h hidden, I intermediate, qd = heads*head_dim, kd = kv_heads*head_dim, a heads.

Family facts that matter:
- RMSNorm (llama, mistral, phi3, mixtral) upcasts to fp32, so each norm keeps an fp32 copy of
  its input plus the normalised tensor and the output in the model dtype.
- sdpa keeps q, k, v, the output and an fp32 log-sum-exp (flash / memory-efficient kernels; no
  T x T matrix). Eager attention keeps the fp32 softmax (plus a cast copy for bf16/fp16
  models; GPT-2 computes it in the model dtype) and copies of q, k, v.
- phi3 fuses qkv: with sdpa, v is a view of the fused output, which therefore stays alive.
- mixtral (grouped_mm experts) keeps S = n*top_k gathered rows, the expert intermediates,
  routing indices (int64) and fp32 routing weights.
- gpt2's gelu_new is a chain of elementwise ops that keeps five I-wide tensors.
"""

from __future__ import annotations

from esa.planner.shape import ModelShape

RMS_FAMILIES = ("llama", "phi3", "mixtral")


def _dims(s: ModelShape, B: int, T: int) -> tuple[int, int, int, int, int, int]:
    return B * T, s.hidden, s.intermediate, s.q_dim, s.kv_dim, B * s.heads * T * T


def _probs(s: ModelShape, b: int, BaTT: int) -> int:
    """Eager attention's saved softmax: fp32 (+ a cast copy when the model is not fp32); GPT-2
    keeps it in the model dtype."""
    if s.family == "gpt2":
        return b * BaTT
    return (4 + (b if b != 4 else 0)) * BaTT


def _moe_forward(s: ModelShape, n: int, b: int) -> int:
    S, h, i, e, k = n * s.experts_per_token, s.hidden, s.intermediate, s.experts, s.experts_per_token
    # gathered rows + expert output (b), gate_up (2I) + act + product (I each), int64 sort
    # indices (3 per row), fp32 row weights; router softmax (fp32 n*E), top-k ids and weights.
    return b * (2 * S * h + 4 * S * i) + 28 * S + n * (4 * e + 12 * k + 4) + 4 * e


def forward_saved_per_layer(s: ModelShape, B: int, T: int, b: int, attention: str, stat_bytes: int = 4) -> int:
    """Bytes one decoder block keeps for a first-order backward (`stat_bytes`: LayerNorm's
    mean/rstd, fp32 on CUDA)."""
    n, h, i, qd, kd, BaTT = _dims(s, B, T)
    lse = 4 * B * s.heads * T
    if s.family in RMS_FAMILIES:
        norms = 2 * (n * h * (4 + 2 * b) + 4 * n)
        if attention == "eager":
            attn = 4 * b * n * qd + _probs(s, b, BaTT)  # q, k and v (repeated or copied), merged output
        elif s.family == "phi3":
            attn = b * n * (3 * qd + kd + (qd + 2 * kd)) + lse  # q_emb, out, o_in, k_emb, fused qkv
        else:
            attn = b * n * (2 * qd + 2 * kd) + lse
        mlp = _moe_forward(s, n, b) if s.family == "mixtral" else 4 * b * n * i
        return norms + attn + mlp
    stats = 4 * n * stat_bytes  # two LayerNorms, mean and rstd each
    if s.family == "gpt_neox":
        keep = 3 if s.parallel_residual else 4  # x (shared by both norms when parallel), y1, y2
        if attention == "eager":
            attn = 4 * b * n * qd + _probs(s, b, BaTT)
        else:
            attn = b * n * (3 * qd + h + (qd + 2 * kd)) + lse  # q_emb, k_emb, out, o_in, fused qkv
        return stats + keep * b * n * h + attn + 2 * b * n * i
    # gpt2
    if attention == "eager":
        attn = 4 * b * n * qd + _probs(s, b, BaTT)
    else:
        attn = b * n * (qd + (qd + 2 * kd)) + lse  # output (= c_proj input), fused c_attn output
    mlp = (5 if s.gelu_tanh_chain else 2) * b * n * i
    return stats + 4 * b * n * h + attn + mlp


def forward_saved_outside(s: ModelShape, B: int, T: int, b: int, stat_bytes: int = 4) -> int:
    """Bytes kept outside the blocks, logits excluded: token (and position) ids, the final
    norm, the loss targets."""
    n, h = B * T, s.hidden
    ids = 8 * n + (8 * T if s.family == "gpt2" else 0) + 8 * B * (T - 1)
    if s.family in RMS_FAMILIES:
        return ids + n * h * (4 + 2 * b) + 4 * n
    return ids + 2 * b * n * h + 2 * n * stat_bytes


def backward_saved_per_layer(s: ModelShape, B: int, T: int, b: int) -> int:
    """Bytes one block's backward keeps when it is built with create_graph=True (the graph a
    Hessian-vector product differentiates again), eager attention."""
    n, h, i, qd, kd, BaTT = _dims(s, B, T)
    if s.family in ("llama", "phi3"):
        return 2 * ((12 + 2 * b) * n * h + 8 * n) + 2 * b * n * (qd + kd) + (4 + b) * BaTT + 8 * b * n * i
    if s.family == "mixtral":
        S, e = n * s.experts_per_token, s.experts
        norms = (12 + 2 * b) * n * h + (12 + b) * n * h + 16 * n
        moe = (b + 4) * S * h + 2 * b * S * i + 6 * b * S * i + 16 * S + (4 + b) * n * e
        return norms + 2 * b * n * (qd + kd) + (4 + b) * BaTT + moe
    if s.family == "gpt_neox":
        return b * n * (2 * i + 2 * h + 2 * qd + (qd + 2 * kd)) + (4 + b) * BaTT
    mlp = (5 if s.gelu_tanh_chain else 2) * b * n * i
    return mlp + b * n * (3 * h + 2 * qd + (qd + 2 * kd)) + 2 * b * BaTT


def backward_saved_outside(s: ModelShape, B: int, T: int, b: int) -> int:
    """The final norm's share of the create_graph backward (logits excluded)."""
    n, h = B * T, s.hidden
    if s.family in RMS_FAMILIES:
        return (12 + b) * n * h + 8 * n
    return b * n * h


def nograd_layer_peak(s: ModelShape, B: int, T: int, b: int, attention: str) -> int:
    """Largest working set of one block in a no-grad forward (evaluation, act_mag,
    super_weight): the residual stream and normalised input plus the bigger of the
    attention and MLP temporaries."""
    n, h, i, qd, kd, BaTT = _dims(s, B, T)
    base = 2 * b * n * h
    if attention == "eager":
        attn = b * n * (2 * qd + 2 * kd + 2 * qd) + (3 * b + 4) * BaTT
    else:
        attn = b * n * (3 * qd + 3 * kd) + 4 * B * s.heads * T
    if s.family == "mixtral":
        S = n * s.experts_per_token
        mlp = b * (2 * S * h + 4 * S * i) + 4 * S * h + 28 * S
    elif s.family == "gpt2" and s.gelu_tanh_chain:
        mlp = 4 * b * n * i
    elif s.family in ("gpt_neox", "gpt2"):
        mlp = 2 * b * n * i
    else:
        mlp = 4 * b * n * i
    return base + max(attn, mlp)
