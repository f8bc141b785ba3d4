"""The memory planner against first principles: parameter counts from transformers, the
activations autograd really saves, the accumulator and layout rules, the CLI contract, and one
small measured job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from esa.planner import BUNDLED, load_config, model_shape, plan_job, smallest_layout
from esa.planner import activations as A
from esa.planner.configs import bundled_config_dir
from esa.planner.memory import PARTS, candidate_layouts
from esa.planner.scaled import scaled_config

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "phi-3-mini-4k": 3_821_079_552,
             "mixtral-8x7b": 46_702_792_704, "pythia-1.4b": 1_414_647_808, "gpt2": 124_439_808}


def _meta_count(cfg: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_config_parameter_count_matches_transformers(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bundled_config_dir(name))  # the folder loads directly
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(p.numel() for p in model.parameters())
    assert model_shape(load_config(name)).n_parameters() == counted == PUBLISHED[name]


@pytest.mark.parametrize("name", list(BUNDLED))
def test_scaled_config_parameter_count_matches_transformers(name):
    extra = {"experts": 4, "experts_per_token": 2} if name == "mixtral-8x7b" else {}
    cfg = scaled_config(name, hidden=96, layers=3, heads=6, kv_heads=2, intermediate=160, vocab=1000, **extra)
    assert model_shape(cfg).n_parameters() == _meta_count(cfg)


def _saved_bytes(cfg: dict, dtype, attention: str, B: int, T: int) -> dict[str, int]:
    """Bytes of distinct storages autograd saves in the forward (first-order graph) and in a
    create_graph backward, parameters excluded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from esa.profile.metrics.loss import next_token_nll

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype,
                                             attn_implementation=attention).eval()
    params = list(model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    total = {"fwd": 0, "bwd": 0}
    phase = ["fwd"]

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in weights and storage.nbytes():
            seen.add(key)
            total[phase[0]] += storage.nbytes()
        return t

    ids = torch.randint(3, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_token_nll(model, ids)
        if attention == "eager":
            phase[0] = "bwd"
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return total


CASES = [(name, dt, attn) for name in BUNDLED if name != "mistral-7b" for dt in ("fp32", "bf16")
         for attn in ("sdpa", "eager")]


@pytest.mark.parametrize("name,dtype,attention", CASES)
def test_saved_activations_per_block_match_autograd(name, dtype, attention):
    """forward_saved_per_layer (and, for eager, backward_saved_per_layer) equal the bytes a
    real block saves: the difference between a 3-block and a 2-block model, exactly."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    b = {"fp32": 4, "bf16": 2}[dtype]
    extra = {"experts": 4, "experts_per_token": 2, "intermediate": 96} if name == "mixtral-8x7b" else {}
    dims = {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 176, "vocab": 1000, **extra}
    B, T = 2, 24
    two = _saved_bytes(scaled_config(name, layers=2, **dims), torch_dtype, attention, B, T)
    three = _saved_bytes(scaled_config(name, layers=3, **dims), torch_dtype, attention, B, T)
    shape = model_shape(scaled_config(name, layers=2, **dims))
    # On a CPU, LayerNorm keeps mean/rstd in the model dtype (fp32 on CUDA).
    assert three["fwd"] - two["fwd"] == A.forward_saved_per_layer(shape, B, T, b, attention, stat_bytes=b)
    outside = A.forward_saved_outside(shape, B, T, b, stat_bytes=b) + 4 * B * (T - 1) * dims["vocab"]
    rest = two["fwd"] - 2 * A.forward_saved_per_layer(shape, B, T, b, attention, stat_bytes=b)
    assert abs(rest - outside) <= 2 * T * 64 * 4  # RoPE cos/sin tables and scalars are not modelled
    if attention == "eager":
        assert three["bwd"] - two["bwd"] == A.backward_saved_per_layer(shape, B, T, b)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "phi-3-mini-4k"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_saved_activations_without_grouped_query_attention(name, attention):
    import torch

    dims = {"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 176, "vocab": 1000}
    two = _saved_bytes(scaled_config(name, layers=2, **dims), torch.float32, attention, 2, 24)
    three = _saved_bytes(scaled_config(name, layers=3, **dims), torch.float32, attention, 2, 24)
    shape = model_shape(scaled_config(name, layers=2, **dims))
    assert not shape.gqa
    assert three["fwd"] - two["fwd"] == A.forward_saved_per_layer(shape, 2, 24, 4, attention, stat_bytes=4)
    if attention == "eager":
        assert three["bwd"] - two["bwd"] == A.backward_saved_per_layer(shape, 2, 24, 4)


@pytest.mark.parametrize("world", [1, 2, 8, 16])
def test_accumulators_and_weights_are_sharded_over_the_world(world):
    s = model_shape(load_config("llama-3.1-8b"))
    P = s.n_parameters()
    nodes, per_node = (1, world) if world <= 8 else (world // 8, 8)
    for metric in ("grad_x_weight", "grad_squared"):
        plan = plan_job("llama-3.1-8b", metric, seq_len=2048, batch_size=1, nodes=nodes, gpus_per_node=per_node)
        assert plan.per_gpu_bytes["accumulators"] == math.ceil(4 * P / world)
        assert plan.per_gpu_bytes["weights"] == math.ceil(2 * P / world)
        assert (plan.per_gpu_bytes["communication"] > 0) == (world > 1)
    hutch = plan_job("llama-3.1-8b", "hutchinson_diag", seq_len=512, batch_size=1, nodes=nodes, gpus_per_node=per_node)
    assert hutch.per_gpu_bytes["accumulators"] == math.ceil(8 * P / world)
    assert hutch.settings["attention"] == "eager"


def test_parts_add_up_and_json_keys():
    plan = plan_job("mixtral-8x7b", "grad_x_weight", seq_len=1024, batch_size=1, nodes=2, gpus_per_node=8,
                    gpu="h100-80g")
    d = plan.to_dict()
    for key in ("n_parameters", "layout", "per_gpu_bytes", "fits", "peak_stage", "time", "metric", "settings"):
        assert key in d
    assert d["layout"] == {"nodes": 2, "gpus_per_node": 8}
    parts = d["per_gpu_bytes"]
    assert set(PARTS) | {"total"} == set(parts)
    assert parts["total"] == sum(parts[k] for k in PARTS)
    assert d["n_parameters"] == PUBLISHED["mixtral-8x7b"]
    assert d["time"]["seconds"] > 0 and d["fits"] in (True, False)
    json.dumps(d)


def test_peak_is_the_largest_stage_and_activation_terms_scale():
    short = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=512, batch_size=1)
    long = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=1)
    assert long.per_gpu_bytes["activations"] == pytest.approx(4 * short.per_gpu_bytes["activations"], rel=0.01)
    assert long.total_bytes == max(long.stages.values())
    ckpt = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=1, activation_checkpointing=True)
    assert ckpt.per_gpu_bytes["activations"] < long.per_gpu_bytes["activations"] / 5
    base = plan_job("llama-3.1-8b", "baseline", seq_len=2048, batch_size=1)
    assert base.per_gpu_bytes["accumulators"] == 0 and base.total_bytes < long.total_bytes


def test_fits_and_smallest_layout():
    def pairs(layouts):
        return [(x.nodes, x.gpus_per_node) for x in layouts]

    assert pairs(candidate_layouts(8, 3)) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8)]
    assert pairs(candidate_layouts(4, 2)) == [(1, 1), (1, 2), (1, 4), (2, 4)]
    one = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=1)
    roomy = smallest_layout("llama-3.1-8b", "grad_x_weight", gpu_memory_bytes=one.total_bytes, seq_len=2048,
                            batch_size=1)
    assert roomy.layout.world == 1 and roomy.fits
    tight = smallest_layout("llama-3.1-8b", "grad_x_weight", gpu_memory_bytes=one.total_bytes - 1, seq_len=2048,
                            batch_size=1)
    assert tight.fits and tight.layout.world > 1
    order = candidate_layouts(8)
    previous = order[pairs(order).index((tight.layout.nodes, tight.layout.gpus_per_node)) - 1]
    before = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=1, nodes=previous.nodes,
                      gpus_per_node=previous.gpus_per_node, gpu_memory_bytes=one.total_bytes - 1)
    assert not before.fits
    hopeless = smallest_layout("mixtral-8x7b", "hutchinson_diag", gpu_memory_bytes=1 << 30, seq_len=4096,
                               batch_size=8, max_nodes=2)
    assert hopeless.fits is False and "does not fit" in hopeless.notes[-1]


def test_hub_cache_lookup_without_huggingface_hub(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((bundled_config_dir("gpt2") / "config.json").read_text())
    (tmp_path / "hub" / "models--acme--small" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--small" / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert model_shape(load_config("acme/small")).n_parameters() == PUBLISHED["gpt2"]
    assert model_shape(load_config("meta-llama/Llama-3.1-8B")).n_parameters() == PUBLISHED["llama-3.1-8b"]
    from esa.core.errors import UserError

    with pytest.raises(UserError, match="not a bundled name"):
        load_config("acme/missing")


def _esa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esa", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_for_the_smallest_layout_and_a_forced_one():
    proc = _esa("plan-memory", "--model", "llama-3.1-8b", "--metric", "grad_x_weight", "--seq-len", "2048",
                "--batch-size", "1", "--dtype", "bf16", "--gpu-memory", "40G", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fits"] is True and out["layout"]["gpus_per_node"] >= 2
    assert out["per_gpu_bytes"]["total"] <= 40 << 30
    for key in ("weights", "accumulators", "activations", "logits", "double_backward", "communication",
                "workspace", "overhead", "total"):
        assert key in out["per_gpu_bytes"]
    forced = json.loads(_esa("plan-memory", "--model", "llama-3.1-8b", "--metric", "grad_x_weight", "--seq-len",
                             "2048", "--gpus", "16", "--json").stdout)
    assert forced["layout"] == {"nodes": 2, "gpus_per_node": 8}
    table = _esa("plan-memory", "--model", "gpt2", "--metric", "hutchinson_diag", "--gpu", "l40s")
    assert table.returncode == 0 and "fits" in table.stdout and "MFU" in table.stdout and "GiB" in table.stdout


def test_cli_reads_a_manifest(tmp_path):
    manifest = {"schema_version": 1, "phase": 2, "model": {"id": "mistral-7b", "dtype": "bf16"},
                "data": {"dataset": "builtin", "seq_len": 512, "batch_size": 2, "max_samples": 64}, "seed": 0,
                "metric": {"name": "act_mag"}, "ranking": {"mode": "per_layer", "topk": 10},
                "outputs": {"dir": str(tmp_path / "o")}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    out = json.loads(_esa("plan-memory", str(path), "--gpu", "a100-40g", "--json").stdout)
    assert out["metric"] == "act_mag" and out["settings"]["seq_len"] == 512 and out["settings"]["batch_size"] == 2
    assert out["settings"]["samples"] == 64
    base = json.loads(_esa("plan-memory", str(path), "--metric", "baseline", "--json").stdout)
    assert base["metric"] == "baseline"


@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt2", "--metric", "nope"], "unknown metric 'nope'"),
    (["--model", "gpt2", "--metric", "act_mag", "--gpu-memory", "lots"], "not a memory size"),
    (["--model", "gpt2", "--metric", "act_mag", "--gpus", "12"], "not a whole number of nodes"),
    (["--model", "gpt2", "--metric", "act_mag", "--gpu", "tpu"], "unknown GPU preset"),
    (["--model", "./no/such/dir", "--metric", "act_mag"], "not a bundled name"),
    (["--metric", "act_mag"], "say which model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, needle):
    proc = _esa("plan-memory", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_planner_and_command_import_no_torch():
    code = ("import sys; import esa.planner as p; p.plan_job('gpt2', 'grad_x_weight', seq_len=1024, batch_size=1); "
            "print('torch' in sys.modules, 'transformers' in sys.modules); "
            "from esa.cli import main; main(['plan-memory', '--model', 'mixtral-8x7b', '--metric', 'hutchinson_diag', "
            "'--json']); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "False False"  # the planner alone: neither torch nor transformers
    assert lines[-1] == "False"  # the whole command: no torch


def test_planner_table_script_covers_every_model_and_metric():
    from esa.planner.table import markdown_table

    text = markdown_table()
    for name in BUNDLED:
        assert name in text
    assert text.count("\n") >= len(BUNDLED) * 9


def test_one_measured_job_is_within_15_percent(tiny_llama, tmp_path):
    """A real `esa profile --metric grad_x_weight` on the tiny Llama, measured by the benchmark's
    profiler wrapper, against the planner (fp32, CPU)."""
    from esa.data.corpus import builtin_documents

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(builtin_documents("validation", max_bytes=60_000)))
    out = tmp_path / "m.json"
    args = ["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--dataset", str(data),
            "--seq-len", "128", "--batch-size", "2", "--max-samples", "4", "--dtype", "fp32", "--device", "cpu",
            "--topk", "5", "--out-dir", str(tmp_path / "o"), "--quiet"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_planner_memory.py"), "--child", str(out),
                           "--", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(out.read_text())["measured_peak"]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    plan = plan_job(cfg, "grad_x_weight", seq_len=128, batch_size=2, dtype="fp32", samples=4, device="cpu")
    assert 0.85 <= plan.total_bytes / measured <= 1.15, (plan.total_bytes, measured, plan.per_gpu_bytes)


# ------------------------------------------------------------------- manifests and "auto" resources
def _manifest(model: str, metric: str | None = None, phase: int = 2, **resources):
    from esa.spec.manifest import Manifest

    doc = {"phase": phase, "model": {"id": model, "dtype": "bf16"},
           "data": {"dataset": "wikitext", "seq_len": 2048, "max_samples": 128, "batch_size": 1},
           "resources": resources, "outputs": {"dir": "x"}}
    if phase == 2:
        doc["metric"] = {"name": metric}
    return Manifest.from_dict(doc, partial=True)


def test_auto_resources_pick_the_smallest_layout_and_size_memory_and_time():
    from esa.planner.manifests import fill_auto_resources, plan_manifest

    m = _manifest("mixtral-8x7b", "grad_x_weight", gpus="auto", mem="auto", time="auto", gpu_memory="80G")
    filled, plan = fill_auto_resources(m)
    assert filled.job_id() == m.job_id()  # where a job runs is not what it computes
    layout = filled.parallel
    assert layout.nodes == 1 and layout.gpus_per_node > 1 and filled.resources.gpus == 1
    assert plan.fits and plan.layout.world == layout.world_size
    # one GPU fewer does not fit: the layout is the smallest that does
    smaller = plan_manifest(filled.__class__.from_dict({**filled.to_dict(), "parallel": {
        "nodes": 1, "gpus_per_node": layout.gpus_per_node // 2}}), gpu_memory="80G")
    assert not smaller.fits
    # host memory holds the full bf16 weights (rank 0 reads them) plus 8 GiB per rank
    assert int(filled.resources.mem[:-1]) * 1024**3 >= plan.n_parameters * 2 + 8 * 1024**3 * layout.gpus_per_node
    h, mm, _ = (int(x) for x in filled.resources.time.split(":"))
    assert h * 60 + mm >= max(30, 2 * plan.time.seconds / 60 + 15)
    assert fill_auto_resources(_manifest("gpt2", "grad_x_weight", gpus=1))[1] is None  # nothing to plan


def test_auto_resources_say_what_is_missing():
    from esa.core.errors import UserError
    from esa.planner.manifests import fill_auto_resources

    with pytest.raises(UserError, match='gpu_memory = "80G"'):
        fill_auto_resources(_manifest("gpt2", "grad_x_weight", gpus="auto"))
    with pytest.raises(UserError, match="no layout that fits"):  # curvature cannot be sharded
        fill_auto_resources(_manifest("llama-3.1-8b", "hutchinson_diag", gpus="auto", gpu_memory="80G"))
    with pytest.raises(UserError, match="planner, which says"):
        fill_auto_resources(_manifest("/no/such/model", "grad_x_weight", gpus="auto", gpu_memory="80G"))


def test_a_sharded_job_splits_its_batch_over_the_gpus():
    one = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=8)
    two = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=8, nodes=1, gpus_per_node=2)
    per_gpu = plan_job("llama-3.1-8b", "grad_x_weight", seq_len=2048, batch_size=4)
    assert two.per_gpu_bytes["activations"] == per_gpu.per_gpu_bytes["activations"] < one.per_gpu_bytes["activations"]


def test_obd_fisher_obd_and_ablation_are_planned_and_kept_on_one_gpu():
    """obd / fisher_obd are planned as the metrics whose sums they keep; ablation as an evaluation that also
    holds one block's output of every window, with one forward of every window per candidate."""
    kw = dict(seq_len=512, batch_size=4, dtype="bf16", gpu="a100-80g", samples=64)
    for metric, like in (("obd", "hutchinson_diag"), ("fisher_obd", "grad_squared")):
        a, b = plan_job("gpt2", metric, **kw), plan_job("gpt2", like, **kw)
        assert a.per_gpu_bytes == b.per_gpu_bytes and a.time.seconds == b.time.seconds
        assert any(f"planned as {like}" in n for n in a.notes)
    base, one, many = (plan_job("gpt2", m, coords=c, **kw) for m, c in (("baseline", 1), ("ablation", 1),
                                                                         ("ablation", 100)))
    s = model_shape(load_config("gpt2"))
    cache = 2 * 64 * 512 * s.hidden * 2  # two caches of [windows, T, hidden] in bf16
    assert one.per_gpu_bytes["activations"] == base.per_gpu_bytes["activations"] + cache
    assert many.time.seconds == pytest.approx(base.time.seconds * 101, rel=1e-9)  # 1 + 100 forwards
    for metric in ("obd", "fisher_obd", "ablation"):
        plan = smallest_layout("llama-3.1-8b", metric, gpu_memory_bytes=40 * 1024**3, seq_len=512, batch_size=1)
        assert (plan.layout.nodes, plan.layout.gpus_per_node) == (1, 1)
        sharded = plan_job("gpt2", metric, nodes=1, gpus_per_node=2, seq_len=512, batch_size=4)
        assert any(f"esa refuses {metric} on a sharded model" in n for n in sharded.notes)
