"""What is alive at each stage of an ESA job, per GPU, as named parts.

A job passes through stages (forward, loss, backward, Hessian-vector product, finalise,
ranking). For each stage the planner adds up what is alive at that moment, from the real
code paths of esa/metrics, esa/evaluate.py and esa/phases; the stage with the largest total
is the peak, and its parts are the breakdown. Parts (bytes per GPU):

- weights: parameters in the model dtype, sharded over the world size (FSDP2).
- accumulators: fp32 sums of gradient/curvature metrics, sharded (grad_x_weight and
  grad_squared fold every gradient into them in post-accumulate-grad hooks and free `.grad`
  at once; finalising builds the scores inside them, so no second copy); act_mag's
  per-input-feature sums.
- scores: fp32 score tensors of metrics without sums (magnitude, act_mag, super_weight).
- activations: what the forward keeps for backward (esa.planner.activations), or a block's
  no-grad working set for evaluation and activation metrics.
- logits: the logits, their fp32 upcast, log-softmax and its gradient (the loss upcasts
  bf16/fp16 logits to fp32).
- gradients: gradients alive at the peak (the lm_head's before it is folded; the first-order
  gradients a curvature metric builds with create_graph).
- double_backward: what the create_graph backward keeps for the Hessian-vector product.
- probes: Hutchinson's Rademacher vectors and Hessian-vector products (or hessian_diag's
  batched one-hot vectors).
- communication: FSDP2 all-gather of the current and the prefetched unit (a decoder block,
  the embedding or the lm_head), the unsharded gradients being reduce-scattered, NCCL buffers.
- workspace: cuBLAS workspaces; ranking/statistics temporaries; metric hook temporaries.
- overhead: the CUDA context and a caching-allocator fragmentation margin (GPU only).

GPU-only parts (overhead, cuBLAS) are assumptions, not measurements: see docs/cluster.md.
"""

from __future__ import annotations

import math

from esa.planner import activations as act
from esa.planner.gpus import GIB, MIB
from esa.planner.shape import ModelShape

CUDA_CONTEXT = int(0.75 * GIB)  # CUDA context + kernel images, outside torch's allocator
CUBLAS_WORKSPACE = 64 * MIB
NCCL_BUFFERS = 512 * MIB  # only when world > 1
FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the tensors
STATS_CHUNK = 1 << 22  # esa.tensor_stats: moments in float64 chunks of this many elements
SORT_LIMIT = 1 << 24  # esa.tensor_stats: exact order statistics up to this size, else a sample
RANK_CHUNK_CUDA = 1 << 26  # esa.ranking: slice length on a GPU
HOOK_ROWS = 8192  # esa.profile.metrics.activation: rows upcast at a time
ONEHOT_ELEMENTS = 1 << 24  # esa.profile.metrics.curvature: one-hot chunk size of hessian_diag


def sharded(nbytes: float, world: int) -> int:
    """Bytes per GPU of something split evenly over `world` GPUs (rounded up)."""
    return int(math.ceil(nbytes / world))


class JobStages:
    """One job's stages: `stages()` returns {stage name: {part: bytes per GPU}}."""

    def __init__(self, s: ModelShape, metric: str, B: int, T: int, b: int, attention: str, world: int,
                 checkpointing: bool, device: str, probes: int, batches: int) -> None:
        self.s, self.metric, self.B, self.T, self.b = s, metric, B, T, b
        self.attention, self.world, self.ckpt, self.device, self.probes = attention, world, checkpointing, device, probes
        self.batches = batches
        self.n, self.Np, self.V = B * T, B * (T - 1), s.vocab
        self.stat = 4 if device == "cuda" else b  # LayerNorm mean/rstd dtype
        self.P = s.n_parameters()
        self.W = sharded(self.P * b, world)

    # --------------------------------------------------------------- shared pieces
    def comm(self, backward: bool) -> int:
        if self.world == 1:
            return 0
        unit = self.s.largest_unit() * self.b
        gathered = 2 * unit  # current unit + prefetched next one
        grads = unit + sharded(unit, self.world) if backward else 0  # unsharded grads + reduce-scatter shard
        return gathered + grads + NCCL_BUFFERS

    def cublas(self) -> int:
        return CUBLAS_WORKSPACE if self.device == "cuda" else 0

    def finish_workspace(self, largest_scored: int) -> int:
        """Ranking and per-tensor statistics of the largest score tensor (esa.tensor_stats,
        esa.ranking): float64 moment chunks; on a GPU also the sort for order statistics."""
        p = sharded(largest_scored, self.world)
        # Float64 moments: d, d*d and one product; from the second chunk on, the previous
        # chunk's d and d*d are still alive while the next .double() copy and d are made.
        moments = 24 * p if p <= STATS_CHUNK else 32 * STATS_CHUNK
        # Above SORT_LIMIT elements a sample is drawn: int64 positions and the gathered values.
        sample = 12 * SORT_LIMIT if p > SORT_LIMIT else 0
        if self.device != "cuda":
            return max(moments, sample)  # on a CPU the sort itself runs in numpy
        sort = 12 * p if p <= SORT_LIMIT else sample + 12 * SORT_LIMIT  # + sorted values and int64 indices
        return max(moments, sort, RANK_CHUNK_CUDA)

    def saved_activations(self, attention: str, checkpointing: bool) -> int:
        s, B, T, b = self.s, self.B, self.T, self.b
        layer = act.forward_saved_per_layer(s, B, T, b, attention, self.stat)
        outside = act.forward_saved_outside(s, B, T, b, self.stat)
        if checkpointing:  # block inputs only, one block recomputed at a time during backward
            return s.layers * b * self.n * s.hidden + layer + outside
        return s.layers * layer + outside

    def eval_logits(self) -> int:
        """esa.baseline.evaluate.window_sums (token_nll): logits, their fp32 (or contiguous) copy, log-softmax."""
        copy = 4 * self.Np * self.V if (self.b != 4 or self.B > 1) else 0
        return self.B * self.T * self.V * self.b + copy + 4 * self.Np * self.V

    # --------------------------------------------------------------- stages per metric
    def stages(self) -> dict[str, dict[str, int]]:
        """Every stage of this job's metric, each with the parts alive at that moment."""
        m = self.metric
        if m in ("baseline", "perturb"):
            return self._eval_stages()
        if m == "ablation":
            return self._ablation_stages()
        if m == "magnitude":
            return self._magnitude_stages()
        if m in ("act_mag", "super_weight"):
            return self._activation_metric_stages()
        if m in ("grad_x_weight", "grad_squared"):
            return self._gradient_stages()
        return self._curvature_stages()

    def _base(self, backward: bool = False, /, **parts: int) -> dict[str, int]:
        out = {"weights": self.W, "communication": self.comm(backward), "workspace": self.cublas()}
        for k, v in parts.items():
            out[k] = out.get(k, 0) + int(v)
        return out

    def _forward_stages(self, extra_layer: int = 0, extra_head: int = 0, **fixed: int) -> dict[str, dict[str, int]]:
        s = self.s
        layer = act.nograd_layer_peak(s, self.B, self.T, self.b, self.attention)
        return {
            "forward (blocks)": self._base(activations=layer, workspace=extra_layer, **fixed),
            "forward (lm_head)": self._base(activations=self.b * self.n * s.hidden,
                                            logits=self.B * self.T * self.V * self.b, workspace=extra_head, **fixed),
        }

    def _eval_stages(self) -> dict[str, dict[str, int]]:
        stages = self._forward_stages()
        stages["loss"] = self._base(activations=self.b * self.n * self.s.hidden, logits=self.eval_logits())
        return stages

    def _ablation_stages(self) -> dict[str, dict[str, int]]:
        """An evaluation that also keeps one block's output of every calibration window
        (esa.perturb.cached_forward), and while the next cache is built, the previous one."""
        cache = 2 * self.batches * self.n * self.s.hidden * self.b
        return {name: {**parts, "activations": parts.get("activations", 0) + cache}
                for name, parts in self._eval_stages().items()}

    def _magnitude_stages(self) -> dict[str, dict[str, int]]:
        s, b = self.s, self.b
        scores = sharded(4 * self.P, self.world)
        temp = sharded(b * s.largest_tensor(), self.world) if b != 4 else 0  # |W| before .float()
        return {"scores": self._base(scores=scores, workspace=temp),
                "ranking": self._base(scores=scores, workspace=self.finish_workspace(s.largest_tensor()))}

    def _activation_metric_stages(self) -> dict[str, dict[str, int]]:
        s, b, n = self.s, self.b, self.n
        if self.metric == "act_mag":
            scored, largest = s.linear_params(), s.largest_linear()
            sums = 4 * self._act_feature_count()
            widest = max(s.intermediate, s.q_dim, s.hidden)
            rows = min(n * (s.experts_per_token if s.family == "mixtral" else 1), HOOK_ROWS)
            hook = 4 * rows * widest * (2 if b != 4 else 1)  # fp32 upcast + square of a row block
            head_hook = 4 * min(n, HOOK_ROWS) * s.hidden * (2 if b != 4 else 1)
        else:
            scored, largest = s.down_params(), s.largest_down()
            sums = 4 * s.layers * s.intermediate * max(s.experts, 1)  # per-channel maxima
            hook = b * n * max(s.intermediate, s.hidden)  # |block| of a captured input / output
            head_hook = 0
        if s.family == "mixtral":  # expert inputs recomputed per expert from the routed tokens
            routed = math.ceil(n * s.experts_per_token / s.experts)
            hook += b * routed * (s.hidden + 3 * s.intermediate)
        stages = self._forward_stages(extra_layer=hook, extra_head=head_hook, accumulators=sums)
        scores = sharded(4 * scored, self.world)
        temp = sharded(b * largest, self.world) if b != 4 else 0  # |W| before .float()
        stages["finalize"] = self._base(accumulators=sums, scores=scores, workspace=temp)
        stages["ranking"] = self._base(scores=scores, workspace=self.finish_workspace(largest))
        return stages

    def _act_feature_count(self) -> int:
        """Input features summed by act_mag's hooks (one fp32 per feature, per expert)."""
        s = self.s
        if s.family == "mixtral":
            per = 3 * s.hidden + s.q_dim + s.hidden + s.experts * (s.hidden + s.intermediate)
        elif s.family in ("phi3", "gpt_neox", "gpt2"):
            per = s.hidden + s.q_dim + s.hidden + s.intermediate
        else:
            per = 3 * s.hidden + s.q_dim + 2 * s.hidden + s.intermediate
        return s.layers * per + s.hidden

    def _gradient_stages(self) -> dict[str, dict[str, int]]:
        s, b, n, w = self.s, self.b, self.n, self.world
        A = sharded(4 * self.P, w)
        acts = self.saved_activations(self.attention, self.ckpt)
        fold_temp = 4 if (self.metric == "grad_squared" and b != 4) else 0  # grad.to(fp32) before addcmul_
        head_grad = s.vocab * s.hidden * b + b * n * s.hidden  # unsharded lm_head grad + grad of its input
        block_param = s.largest_tensor() if s.family == "mixtral" else max(s.q_dim, s.intermediate) * s.hidden
        block_grad = 3 * b * n * max(s.intermediate * max(s.experts_per_token, 1), s.hidden) + block_param * b
        recompute = act.forward_saved_per_layer(s, self.B, self.T, b, self.attention, self.stat) if self.ckpt else 0
        return {
            "backward (loss)": self._base(True, accumulators=A, activations=acts, logits=12 * self.Np * self.V),
            "backward (lm_head)": self._base(True, accumulators=A, activations=acts, logits=self.B * self.T * self.V * b,
                                             gradients=head_grad,
                                             workspace=sharded(fold_temp * s.vocab * s.hidden, w)),
            "backward (blocks)": self._base(True, accumulators=A, activations=acts + recompute, gradients=block_grad,
                                            workspace=sharded(fold_temp * block_param, w)),
            "ranking": self._base(accumulators=A, workspace=self.finish_workspace(s.largest_tensor())),
        }

    def _curvature_stages(self) -> dict[str, dict[str, int]]:
        s, b, n, w, Np, V = self.s, self.b, self.n, self.world, self.Np, self.V
        acts = self.saved_activations("eager", False)
        graph = s.layers * act.backward_saved_per_layer(s, self.B, self.T, b) + act.backward_saved_outside(
            s, self.B, self.T, b)
        lso = 4 * Np * V  # log-softmax kept by the forward
        graph_logits = n * V * b + 4 * Np * V  # lm_head input-grad copy + nll double-backward tensor
        # At the loss, the second backward works on fp32 N'xV tensors (exp, products: five) and
        # the second-order gradient of the logits (n x V, fp32); the blocks' graph is freed by then.
        loss_work = 5 * 4 * Np * V + 4 * n * V
        if self.metric == "hutchinson_diag":
            scored = self.P
            A = sharded(8 * scored, w)  # hz_sum and hz_sq_sum
            probes = sharded(2 * scored * b, w)  # z and H z
            grads = sharded(scored * b, w)
            spread = sharded(16 * s.largest_tensor(), w)  # hutchinson_spread: mean, var, ... of one tensor
            finish = {"summarize": self._base(accumulators=A, workspace=spread),
                      "ranking": self._base(accumulators=sharded(4 * scored, w),
                                            workspace=self.finish_workspace(s.largest_tensor()))}
        else:  # hessian_diag on one tensor (--include / --candidates select it; assumed the largest)
            scored = s.largest_tensor()
            A = sharded(4 * scored, w)
            probes = 2 * ONEHOT_ELEMENTS * b  # batched one-hot vectors and the rows they return
            grads = scored * b
            finish = {"ranking": self._base(accumulators=A, workspace=self.finish_workspace(scored))}
        common = dict(accumulators=A, activations=acts, gradients=grads, probes=probes)
        # A tied lm_head's gradient leads the second backward to the loss early, while the
        # blocks' graph is still alive (measured on GPT-2); untied models reach it last.
        early_loss = 5 * 4 * Np * V if s.tied else 0
        stages = {
            "hessian-vector product (blocks)": self._base(True, logits=lso + graph_logits + early_loss,
                                                          double_backward=graph, **common),
            "hessian-vector product (loss)": self._base(True, logits=lso + graph_logits + loss_work, **common),
        }
        stages.update(finish)
        return stages
