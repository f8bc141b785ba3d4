"""`esa reduce`: sum the additive accumulators of data shards into one final scores.h5.

Each `esa profile --shard i/n` job writes the sums (gradient sums, squared-gradient sums,
activation norm sums) and counts of its slice of the calibration windows; summing them and
finalising gives the scores of an unsharded run (within fp32 summation order).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.model.loading import load_model
from esa.profile.finish import finish_scores
from esa.profile.metrics import MetricResult, get_metric
from esa.profile.metrics.base import SETTING_COUNTS
from esa.results.scorefile import open_score_file
from esa.results.tables import CandidateScores
from esa.spec.manifest import Manifest, ProfileManifest

log = get_logger("reduce")

# Count attributes that are settings (equal in every shard) rather than additive counts.
_PER_SHARD_SETTINGS = SETTING_COUNTS


def _shard_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "scores.h5" if path.is_dir() else path


def _core(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must agree between shards: everything but the shard, outputs and id."""
    return {k: v for k, v in manifest.items() if k not in ("shard", "outputs", "id")}


def reduce_shards(inputs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Sum the shards' accumulators, finalise the scores and write OUT/scores.h5 + exports (shards of a
    metric that splits its candidates, ablation, are merged row by row instead)."""
    if not inputs:
        raise UserError("esa reduce needs at least one shard (a scores.h5 or its folder)")
    with open_score_file(_shard_file(inputs[0])) as sf:
        first = sf.manifest() or {}
    name = (first.get("metric") or {}).get("name")
    if name and not get_metric(name).shards_data:
        return merge_candidate_shards(inputs, out_dir)
    manifests, seen_shards = [], set()
    totals: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, float] = {}
    for item in inputs:
        path = _shard_file(item)
        with open_score_file(path) as sf:
            manifest = sf.manifest()
            accs, cnt = sf.accumulators()
        if not accs:
            raise UserError(f"{path} holds no accumulators (was it written with --shard i/n?)")
        if manifests and _core(manifest) != _core(manifests[0]):
            raise UserError(f"{path} is a shard of a different job (metric, model, data or seed differ)")
        shard = manifest.get("shard", "0/1")
        n_of = str(shard).split("/")[-1]
        if manifests and n_of != str(manifests[0].get("shard", "0/1")).split("/")[-1]:
            raise UserError(f"{path} is shard {shard}, but the others split the data into "
                            f"{str(manifests[0].get('shard')).split('/')[-1]} parts")
        if shard in seen_shards:
            raise UserError(f"shard {shard} is given twice ({path})")
        seen_shards.add(shard)
        manifests.append(manifest)
        for name, per_param in accs.items():
            bucket = totals.setdefault(name, {})
            for param, arr in per_param.items():
                t = torch.from_numpy(arr)
                bucket[param] = bucket[param] + t if param in bucket else t.clone()
        for key, value in cnt.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in _PER_SHARD_SETTINGS:  # a setting every shard shares, not an additive count
                if key in counts and counts[key] != value:
                    raise UserError(f"{path} used {key}={value}, other shards {counts[key]}")
                counts[key] = value
            else:
                counts[key] = counts.get(key, 0) + value
    n_expected = int(str(manifests[0].get("shard", "0/1")).split("/")[1])
    if len(seen_shards) != n_expected:
        log.warning("reducing %d of %d shards: the scores cover only part of the calibration set",
                    len(seen_shards), n_expected)
    counts = {k: int(v) if float(v).is_integer() else v for k, v in counts.items()}
    base = Manifest.from_dict(manifests[0], source=f"the manifest of {_shard_file(inputs[0])}", check_id=False)
    assert isinstance(base, ProfileManifest)
    metric = get_metric(base.metric.name)
    loaded = load_model(base.model)
    scores = metric.finalize(totals, counts, loaded.model)
    manifest = base.with_outputs(dir=str(out_dir))
    shard = f"reduced:{len(seen_shards)}/{n_expected}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = MetricResult(scores=scores, unscored=_unscored(inputs[0]))
    # The reduced file is the unsharded job's result: its id is that of the same manifest with
    # shard 0/1, which is also the folder plans point phase 3 at.
    whole = dataclasses.replace(manifest, shard="0/1").with_id()
    summary = finish_scores(out, whole, loaded.model, result, loaded.dtype,
                            {"shard": shard, "reduced_from": json.dumps([str(i) for i in inputs])})
    log.info("reduced %d shards into %s", len(seen_shards), summary["files"]["scores"])
    return summary


def _unscored(first: str | Path) -> list[str]:
    with open_score_file(_shard_file(first)) as sf:
        return sf.unscored()


def merge_candidate_shards(inputs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge shards that each scored a slice of one candidate list (ablation): their rows, in candidate
    order, are the unsharded job's rows. The shards must be of one job and share the unperturbed NLL."""
    manifests, parts, seen, dtype = [], [], set(), ""
    for item in inputs:
        path = _shard_file(item)
        with open_score_file(path) as sf:
            manifest = sf.manifest()
            if not sf.has_candidates():
                raise UserError(f"{path} holds no candidate scores (is it an ablation shard?)")
            part = sf.candidates()
            dtype = str(sf.attrs().get("model_dtype", ""))
        if manifests and _core(manifest) != _core(manifests[0]):
            raise UserError(f"{path} is a shard of a different job (metric, model, data, seed or candidates differ)")
        shard = str(manifest.get("shard", "0/1"))
        if manifests and shard.split("/")[-1] != str(manifests[0].get("shard", "0/1")).split("/")[-1]:
            raise UserError(f"{path} is shard {shard}, but the others split the candidates differently")
        if shard in seen:
            raise UserError(f"shard {shard} is given twice ({path})")
        if parts and part.attrs.get("baseline_nll") != parts[0].attrs.get("baseline_nll"):
            raise UserError(f"{path} measured the unperturbed NLL as {part.attrs.get('baseline_nll')!r}, the first "
                            f"shard as {parts[0].attrs.get('baseline_nll')!r}: they did not evaluate the same "
                            "windows the same way (another device or dtype?)")
        seen.add(shard)
        manifests.append(manifest)
        parts.append(part)
    merged = CandidateScores.concat(parts)
    if len(set(merged.order.tolist())) != len(merged):
        raise UserError("the shards overlap: a candidate was evaluated by two of them")
    n_expected = int(str(manifests[0].get("shard", "0/1")).split("/")[1])
    if len(seen) != n_expected:
        log.warning("merging %d of %d shards: %d of %s candidates are scored", len(seen), n_expected, len(merged),
                    merged.attrs.get("n_candidates"))
    merged.attrs["shard"] = f"reduced:{len(seen)}/{n_expected}"
    base = Manifest.from_dict(manifests[0], source=f"the manifest of {_shard_file(inputs[0])}", check_id=False)
    assert isinstance(base, ProfileManifest)
    whole = dataclasses.replace(base.with_outputs(dir=str(out_dir)), shard="0/1").with_id()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = finish_scores(out, whole, None, MetricResult({}, candidates=merged), dtype,
                            {"shard": f"reduced:{len(seen)}/{n_expected}",
                             "reduced_from": json.dumps([str(i) for i in inputs])})
    log.info("merged %d candidate shards into %s", len(seen), summary["files"]["scores"])
    return summary
