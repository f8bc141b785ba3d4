"""The typed manifest: one default per field, built alike from flags, plans and files, one id."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from esa.core.errors import UserError
from esa.spec.manifest import (NOT_IDENTITY, Manifest, ProfileManifest, manifest_id)
from esa.spec.schema_gen import render, schema_files

REPO = Path(__file__).resolve().parents[2]


def _flags(*argv: str) -> argparse.Namespace:
    from esa.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_the_committed_schemas_are_the_generated_ones():
    """manifests/schema/*.json are written by `make schema` from the typed spec; they cannot drift."""
    for name, doc in schema_files().items():
        assert (REPO / "manifests" / "schema" / name).read_text() == render(doc), (
            f"manifests/schema/{name} differs from the typed spec: run `make schema`")


def test_the_demo_the_plan_and_the_cli_give_the_same_id_for_the_same_job(tmp_path):
    """The defect of issue #11: one job, three ways of writing it, one id."""
    from esa.cli import profile
    from jobs.demo import demo_plans
    from jobs.plans import load_plan, plan_from_dict

    demo = plan_from_dict(demo_plans()[2], runs=tmp_path / "a")
    plan = load_plan(REPO / "manifests" / "demo" / "phase2.toml", runs=tmp_path / "b")
    assert [j.id for j in demo.jobs] == [j.id for j in plan.jobs]
    job = next(j for j in plan.jobs if j.labels == {"model": "esa:tiny-llama", "metric": "grad_x_weight",
                                                   "mode": "global", "topk": 8, "seed": 0})
    args = _flags("profile", "--model", "esa:tiny-llama", "--dtype", "fp32", "--device", "cpu", "--dataset",
                  "builtin", "--split", "train", "--seq-len", "128", "--max-samples", "16", "--pool-size", "256",
                  "--batch-size", "4", "--metric", "grad_x_weight", "--mode", "global", "--topk", "8")
    from_cli = profile.manifest_of(args, 0, str(tmp_path / "out"))
    assert from_cli.job_id() == job.id
    # A spelling that only restates defaults (or an alias) is the same job.
    same = profile.manifest_of(_flags(*vars_to_argv(args), "--probes", "1", "--export-topk-csv"), 0, "elsewhere")
    assert same.job_id() == job.id


def vars_to_argv(args: argparse.Namespace) -> list[str]:
    return ["profile", "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--dataset",
            args.dataset, "--split", args.split, "--seq-len", str(args.seq_len), "--max-samples",
            str(args.max_samples), "--pool-size", str(args.pool_size), "--batch-size", str(args.batch_size),
            "--metric", args.metric, "--mode", args.mode, "--topk", str(args.topk)]


def base(**extra) -> dict:
    return {"phase": 2, "model": {"id": "m"}, "metric": {"name": "grad_x_weight"}, "outputs": {"dir": "o"}, **extra}


def test_defaults_are_filled_once_and_aliases_resolved():
    m = Manifest.from_dict(base(metric={"name": "activation_magnitude"}), partial=True)
    assert isinstance(m, ProfileManifest)
    doc = m.to_dict()
    assert doc["metric"] == {"name": "act_mag", "probes": 1, "include": [], "exclude": [], "candidates": [],
                             "max_exact_coords": 4096}
    assert doc["data"]["batch_size"] == 1 and doc["ranking"] == {"mode": "per_layer", "topk": 100, "include": [],
                                                                 "exclude": []}
    assert doc["outputs"]["export_topk_csv"] is True and "id" not in doc
    # The canonical form is itself a valid file and reads back to the same manifest.
    assert Manifest.from_dict(doc) == m
    baseline = Manifest.from_dict({"phase": 1, "model": {"id": "m"}, "outputs": {"dir": "o"}}, partial=True)
    assert baseline.data.batch_size == 4 and "pool_size" not in baseline.to_dict()["data"]
    assert set(baseline.to_dict()["outputs"]) == {"dir"}


def test_the_id_covers_what_is_computed_and_nothing_else():
    m = Manifest.from_dict(base(), partial=True)
    ident = m.job_id()
    assert manifest_id(m.to_dict()) == ident and m.with_id().id == ident
    where = [m.with_outputs(dir="elsewhere", save_plots=True), dataclasses.replace(m, experiment="other"),
             dataclasses.replace(m, parallel=dataclasses.replace(m.parallel, gpus_per_node=4))]
    assert all(x.job_id() == ident for x in where)
    assert set(NOT_IDENTITY) == {"outputs", "id", "experiment", "resources", "parallel"}
    what = [base(seed=1), base(data={"seq_len": 64}), base(ranking={"topk": 7}), base(model={"id": "m2"}),
            base(metric={"name": "grad_squared"}), base(shard="0/2")]
    ids = {Manifest.from_dict(d, partial=True).job_id() for d in what}
    assert len(ids) == len(what) and ident not in ids


def test_files_must_be_complete_while_builders_may_be_partial():
    with pytest.raises(UserError, match=r"\$\.schema_version: required field is missing"):
        Manifest.from_dict(base())
    with pytest.raises(UserError, match=r"\$\.metric\.nmae: unknown field"):
        Manifest.from_dict(base(metric={"nmae": "x"}), partial=True)
    with pytest.raises(UserError, match=r"\$\.metric\.name: required field is missing"):
        Manifest.from_dict(base(metric={}), partial=True)
    with pytest.raises(UserError, match=r"\$\.data\.seq_len: 'x' is not of type"):
        Manifest.from_dict(base(data={"seq_len": "x"}), partial=True)
    with pytest.raises(UserError, match=r"\$\.shard: '2/2' needs 0 <= i < n"):
        Manifest.from_dict(base(shard="2/2"), partial=True)
    doc = Manifest.from_dict(base(), partial=True).with_id().to_dict()
    doc["seed"] = 5  # edited after expansion: the id no longer matches
    with pytest.raises(UserError, match=r"\$\.id: .* is not the content hash"):
        Manifest.from_dict(doc)


def test_fields_added_after_v1_are_written_only_when_set():
    """The canonical form (and the id) of a manifest written before the metric's candidate, per-sample and
    ablation fields existed stays the same; setting one of them makes a different job."""
    from esa.spec.manifest import Manifest

    base = {"phase": 2, "model": {"id": "m"}, "metric": {"name": "grad_x_weight"}, "outputs": {"dir": "o"}}
    plain = Manifest.from_dict(base, partial=True)
    assert set(plain.to_dict()["metric"]) == {"name", "probes", "include", "exclude", "candidates",
                                              "max_exact_coords"}
    zero = Manifest.from_dict({**base, "metric": {"name": "grad_x_weight", "perturbation": {"name": "zero"},
                                                  "per_sample": False}}, partial=True)
    assert zero.job_id() == plain.job_id()  # the defaults, spelled out, are the same job
    sample = Manifest.from_dict({**base, "metric": {"name": "fisher_obd", "per_sample": True}}, partial=True)
    assert sample.to_dict()["metric"]["per_sample"] is True
    again = Manifest.from_dict(sample.to_dict())  # a file with the field reads back to the same job
    assert again.job_id() == sample.job_id()


def test_a_list_of_k_is_sorted_and_a_single_k_stays_an_int():
    from esa.spec.manifest import Manifest, TargetsSpec

    assert TargetsSpec(from_scores="s.h5", topk=(10, 1, 10, 100)).topk == (1, 10, 100)
    assert TargetsSpec(from_scores="s.h5", topk=(7,)).topk == 7
    assert TargetsSpec(from_scores="s.h5", topk=(1, 10)).ks() == [1, 10]
    assert TargetsSpec(from_scores="s.h5").ks() == [None]
    base = {"phase": 3, "model": {"id": "m"}, "perturbation": {"name": "zero"}, "outputs": {"dir": "o"}}
    one = Manifest.from_dict({**base, "targets": {"from_scores": "s.h5", "topk": 7}}, partial=True)
    listed = Manifest.from_dict({**base, "targets": {"from_scores": "s.h5", "topk": [7]}}, partial=True)
    assert one.to_dict()["targets"]["topk"] == 7 and one.job_id() == listed.job_id()
    sweep = Manifest.from_dict({**base, "targets": {"from_scores": "s.h5", "topk": [100, 1, 10]}}, partial=True)
    assert sweep.to_dict()["targets"]["topk"] == [1, 10, 100]
    with pytest.raises(UserError, match="topk"):
        Manifest.from_dict({**base, "targets": {"from_scores": "s.h5", "topk": [0, 3]}}, partial=True)
