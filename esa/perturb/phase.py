"""Phase 3: perturb target weights in place, measure ΔPPL against matched controls, restore exactly."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from esa.baseline.evaluate import evaluate
from esa.core.errors import NonFiniteLossError, UserError
from esa.core.logs import get_logger
from esa.inputs import load_model_and_windows, seed_everything
from esa.parallel.env import is_rank0
from esa.perturb.controls import bottom_k, magnitude_matched, random_k
from esa.perturb.perturbations import cpu_generator, perturbation_from_spec, perturbed
from esa.perturb.significance import paired_bootstrap_ci, summarize_controls
from esa.perturb.targets import WeightTarget, read_target_list, resolve_targets
from esa.results.records import EvalFigures, EvalRecord, PerturbationRecord, read_record, write_record
from esa.results.scorefile import open_score_file
from esa.spec.manifest import PerturbManifest, TargetsSpec

log = get_logger("perturb")


def _ranked_rows(path: str, k: int | None, mode: str | None, group: str) -> list[tuple[str, tuple[int, ...]]]:
    """The first k weights of a scores.h5 ranking (per tensor for per_layer rankings)."""
    with open_score_file(path) as sf:
        ranking = sf.topk(group)
    if mode and ranking.mode != mode:
        raise UserError(f"{path} holds a {ranking.mode} ranking, not {mode}; profile with --mode {mode}")
    rows = list(zip(ranking.param, ranking.index, ranking.rank.tolist()))
    if k is not None:
        if k > ranking.k:
            raise UserError(f"{path} ranks the top {ranking.k}; --topk {k} needs a larger profile run")
        rows = [r for r in rows if r[2] <= k]
    return [(p, i) for p, i, _ in rows]


def resolve_target_refs(targets: TargetsSpec, k: int | None = None) -> list[Any]:
    """Target references from explicit weights, a CSV list, or the top k of a scores.h5 ranking
    (k: one k of a sweep; default: targets.topk, the largest k of a sweep)."""
    ks = targets.ks()
    if len(ks) > 1 and not targets.from_scores:
        raise UserError("a list of k (a dose-response sweep) takes the top k of a ranking: give --from-scores")
    refs: list[Any] = list(targets.weights)
    if targets.list:
        refs += read_target_list(targets.list)
    if targets.from_scores:
        refs += _ranked_rows(targets.from_scores, k if k is not None else ks[-1], targets.mode, "topk")
    if not refs:
        raise UserError("no targets: give --target, --target-list or --from-scores")
    return refs


def check_targets_early(manifest: PerturbManifest) -> None:
    """Validate target names and indices against the checkpoint's shapes before loading the model."""
    from esa.perturb.targets import check_targets_against_shapes, param_shapes_from_checkpoint

    refs = resolve_target_refs(manifest.targets)  # reads the target list / ranking: they must exist
    model_dir = Path(manifest.model.id)
    if not model_dir.is_dir():
        return
    try:
        shapes = param_shapes_from_checkpoint(model_dir)
    except UserError:
        return  # no safetensors header to read: the model itself will validate
    # Tied names (lm_head -> embedding) are only known once the model is built.
    if all(str(r[0] if isinstance(r, tuple) else r).split(":")[0] in shapes for r in refs):
        check_targets_against_shapes(shapes, refs)


def check_bit_index(manifest: PerturbManifest) -> None:
    """bit_flip's bit_index against the width of the dtype the weights will be loaded in."""
    from esa.model.loading import resolve_device, resolve_dtype

    index = getattr(manifest.perturbation.params, "bit_index", None)
    if manifest.perturbation.name != "bit_flip" or index is None:
        return
    dtype = resolve_dtype(manifest.model.dtype, resolve_device(manifest.model.device))
    nbits = torch.finfo(dtype).bits
    if index >= nbits:
        raise UserError(f"bit_index {index} out of range for {dtype} ({nbits} bits: 0..{nbits - 1})")


def check_perturb_inputs(manifest: PerturbManifest) -> None:
    """Everything phase 3 can check before loading the model: bit_index, targets, the baseline file."""
    check_bit_index(manifest)
    check_targets_early(manifest)
    if manifest.baseline.eval_json and not Path(manifest.baseline.eval_json).is_file():
        raise UserError(f"baseline eval.json '{manifest.baseline.eval_json}' does not exist")


def _control_sets(name: str, model: Any, targets: list[WeightTarget], manifest: PerturbManifest
                  ) -> list[list[WeightTarget]]:
    seed, repeats = manifest.seed, manifest.controls.repeats
    if name == "bottom_k":
        scores = manifest.targets.from_scores
        if not scores:
            raise UserError("the bottom_k control needs a ranking: use --from-scores (or esa profile --perturb)")
        with open_score_file(scores) as sf:
            per_tensor = sf.topk("bottomk").mode == "per_layer"
        ranking = _ranked_rows(scores, None, None, "bottomk")
        return [bottom_k(model, targets, ranking, per_tensor=per_tensor, clip=True)]
    draw = random_k if name == "random_k" else magnitude_matched
    # clip: a tensor whose weights are almost all targets (a per-layer top-k as large as a
    # norm vector) gives what it has; the record says how many weights each draw held.
    return [draw(model, targets, cpu_generator(seed * 100_003 + r + 1), clip=True) for r in range(repeats)]


def _reuse_baseline(path: str | None, n_windows: int, fingerprint: str, loaded: Any) -> EvalFigures | None:
    """A phase-1 result for exactly this model (id, revision, dtype, device type) and data, or None."""
    if not path:
        return None
    ev = read_record(EvalRecord, path)
    model, now = ev.model, loaded.describe()
    same = (ev.n_windows == n_windows and ev.data.get("fingerprint") == fingerprint
            and all(model.get(k) == now[k] for k in ("id", "revision", "resolved_dtype"))
            and str(model.get("resolved_device", "")).split(":")[0] == now["resolved_device"].split(":")[0])
    if not same:
        log.warning("baseline %s is for other data or another model; computing the baseline again", path)
        return None
    log.info("reusing baseline from %s", path)
    return ev.figures()


def _evaluate_or_inf(model: Any, ids: torch.Tensor, batch_size: int, desc: str) -> EvalFigures:
    """Evaluate; a damaged model whose loss is no longer finite is a result (ΔPPL = inf), not an error."""
    try:
        return evaluate(model, ids, batch_size, desc=desc)
    except NonFiniteLossError:
        log.warning("%s: the loss is NaN/Inf with the perturbation applied; recorded as PPL = inf", desc)
        return EvalFigures.non_finite(*ids.shape)


def _measure(model: Any, ids: torch.Tensor, batch_size: int, targets: list[WeightTarget], pert: Any,
             base: EvalFigures, manifest: PerturbManifest) -> dict[str, Any]:
    """Perturbed and control evaluations of one target set against the baseline `base`."""
    seed, names = manifest.seed, list(manifest.controls.names)
    with perturbed(model, targets, pert, cpu_generator(seed)) as applied:
        hit = applied.records()
        pert_eval = _evaluate_or_inf(model, ids, batch_size, "perturbed")
    delta_nll = pert_eval.nll - base.nll
    delta_ppl = pert_eval.ppl - base.ppl
    ci = (paired_bootstrap_ci(base.per_window_nll, pert_eval.per_window_nll, seed=seed)
          if math.isfinite(delta_nll) else None)
    control_out: dict[str, Any] = {}
    for name in names:
        nll_deltas, ppl_deltas = [], []
        sets = _control_sets(name, model, targets, manifest)
        for i, control in enumerate(sets):
            with perturbed(model, control, pert, cpu_generator(seed * 7_919 + i + 1)):
                r = _evaluate_or_inf(model, ids, batch_size, f"{name} {i + 1}/{len(sets)}")
            nll_deltas.append(r.nll - base.nll)
            ppl_deltas.append(r.ppl - base.ppl)
        entry = summarize_controls(delta_ppl, ppl_deltas)
        entry["nll"] = summarize_controls(delta_nll, nll_deltas)
        entry["draws"] = len(sets)
        # JSON has no Inf: a destroyed model's Δ is written as null; say how many there were.
        entry["n_nonfinite"] = sum(1 for d in ppl_deltas if not math.isfinite(d))
        entry["sizes"] = [len(c) for c in sets]
        if min(entry["sizes"]) < len(targets):
            log.warning("%s: some target tensors have too few other weights; control sets hold %d-%d weights "
                        "for %d targets", name, min(entry["sizes"]), max(entry["sizes"]), len(targets))
        control_out[name] = entry
        log.info("%s: target ΔPPL %.4g vs control mean %.4g (p = %.3g, z = %.3g)", name, delta_ppl,
                 entry["mean"], entry["p_value"], entry["z"])
    return {"n_targets": len(targets), "targets": [t.name for t in targets], "applied": hit,
            "perturbed": pert_eval.summary(), "perturbed_finite": pert_eval.finite,  # false: NaN/Inf loss
            "delta_ppl": delta_ppl, "delta_nll": delta_nll,
            "delta_token_accuracy": pert_eval.token_accuracy - base.token_accuracy,
            "delta_nll_ci": None if ci is None else {"low": ci.low, "high": ci.high, "alpha": ci.alpha,
                                                     "n_boot": ci.n_boot,
                                                     "method": "paired per-window bootstrap, percentile"},
            "controls": control_out, "perturbed_per_window_nll": pert_eval.per_window_nll}


def run_perturb(manifest: PerturbManifest, out: Path) -> dict[str, Any]:
    """Baseline, perturbed and control evaluations (at each k of a sweep); writes perturbation.json
    (rank 0; every rank of a sharded job runs it)."""
    seed = manifest.seed
    seed_everything(seed)
    pert = perturbation_from_spec(manifest.perturbation)
    batch_size = manifest.data.batch_size
    assert batch_size is not None
    check_targets_early(manifest)
    loaded, windows = load_model_and_windows(manifest)
    model, ids = loaded.model, windows.ids.to(loaded.device)
    ks = manifest.targets.ks()
    target_sets = [resolve_targets(model, resolve_target_refs(manifest.targets, k)) for k in ks]
    log.info("%s on %s target weights; controls %s", pert, "/".join(str(len(t)) for t in target_sets),
             list(manifest.controls.names) or "none")
    t0 = time.perf_counter()
    base = _reuse_baseline(manifest.baseline.eval_json, len(ids), windows.fingerprint, loaded) \
        or evaluate(model, ids, batch_size, desc="baseline")
    results = []
    for k, targets in zip(ks, target_sets):
        if len(ks) > 1:
            log.info("k = %d: %d targets", k, len(targets))
        results.append(_measure(model, ids, batch_size, targets, pert, base, manifest))
    main = results[-1]  # a sweep's largest k fills the single-k fields
    record = PerturbationRecord(
        perturbation=pert.describe(), baseline=base.summary(), baseline_per_window_nll=base.per_window_nll,
        n_windows=len(ids), n_tokens=base.n_tokens, seconds=time.perf_counter() - t0, data=windows.info(),
        model=loaded.describe(), manifest_id=manifest.id, **main,
        by_k=[{"k": k, **r} for k, r in zip(ks, results)] if len(ks) > 1 else None)
    if is_rank0():
        write_record(out, record)
    if manifest.outputs.save_plots and main["controls"] and is_rank0():
        from esa.perturb.plots import save_perturbation_plot

        save_perturbation_plot(out / "plots" / "perturbation_vs_controls.png", main["delta_ppl"], main["controls"])
    ci = main["delta_nll_ci"]
    log.info("ΔPPL %+.4g (ΔNLL %+.4g, 95%% CI %s); baseline PPL %.4g -> %.4g", main["delta_ppl"], main["delta_nll"],
             "n/a" if ci is None else f"[{ci['low']:.4g}, {ci['high']:.4g}]", base.ppl, main["perturbed"]["ppl"])
    return {"delta_ppl": main["delta_ppl"], "delta_nll": main["delta_nll"], "n_targets": main["n_targets"],
            "baseline_ppl": base.ppl, "perturbed_ppl": main["perturbed"]["ppl"],
            "controls": {k: {"p_value": v["p_value"], "z": v["z"]} for k, v in main["controls"].items()},
            **({"by_k": [{"k": k, "delta_ppl": r["delta_ppl"]} for k, r in zip(ks, results)]} if len(ks) > 1 else {}),
            "perturbation_json": str(out / PerturbationRecord.FILE)}
