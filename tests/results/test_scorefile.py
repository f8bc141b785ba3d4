"""The HDF5 score file (esa.results.scorefile): round trip, refusal of incomplete files, options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import esa.results.scorefile as scorefile
from esa.core.errors import UserError
from esa.profile.ranking import rank_scores
from esa.results.scorefile import (open_score_file, read_accumulators, read_attrs, read_scores,
                           read_stats, read_topk, write_score_file)
from esa.profile.stats import compute_stats

ATTRS = {
    "metric": "grad_x_weight",
    "manifest_id": "abc123",
    "manifest_json": {"phase": 2, "metric": "grad_x_weight"},
    "model_name": "tiny-llama",
    "model_revision": None,
    "model_dtype": "float32",
}


def _scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.rand(11, 4, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.rand(4, 6, generator=g) * 10,
        "model.layers.0.input_layernorm.weight": torch.rand(4, generator=g),
        "model.layers.0.block_sparse_moe.experts.w1": torch.rand(2, 3, 5, generator=g),
    }


def _write(path: Path, **kw) -> Path:
    scores = kw.pop("scores", _scores())
    args = dict(scores=scores, topk=rank_scores(scores, 7, "global", weights=scores),
                attrs=ATTRS)
    args.update(kw)
    return write_score_file(path, **args)


def test_round_trip_everything(tmp_path):
    scores = _scores()
    top = rank_scores(scores, 7, "global", weights=scores)
    bottom = rank_scores(scores, 3, "per_layer", largest=False)
    stats = compute_stats(scores, k=7)
    accs = {"grad_sum": {n: t * 2 for n, t in scores.items()}}
    path = write_score_file(
        tmp_path / "out" / "scores.h5", scores=scores, topk=top, bottomk=bottom, stats=stats,
        attrs={**ATTRS, "seed": 3}, accumulators=accs, counts={"tokens": 1234, "batches": 5},
        unscored=["model.norm.weight", "lm_head.weight"], compression="gzip")
    assert path == tmp_path / "out" / "scores.h5"
    assert os.listdir(path.parent) == ["scores.h5"]  # no temporary left behind

    back = read_scores(path)
    assert list(back) == list(scores)
    for name, t in scores.items():
        assert back[name].dtype == np.float32 and back[name].shape == tuple(t.shape)
        np.testing.assert_array_equal(back[name], t.numpy())
    assert torch.equal(read_scores(path, ["model.embed_tokens.weight"],
                                   as_torch=True)["model.embed_tokens.weight"],
                       scores["model.embed_tokens.weight"])

    for got, want, group in ((read_topk(path), top, "topk"),
                             (read_topk(path, "bottomk"), bottom, "bottomk")):
        assert got.param == want.param and got.index == want.index, group
        np.testing.assert_array_equal(got.flat_index, want.flat_index)
        np.testing.assert_array_equal(got.score, want.score)
        np.testing.assert_array_equal(got.rank, want.rank)
        np.testing.assert_array_equal(got.value, want.value)
        assert (got.mode, got.largest, got.k) == (want.mode, want.largest, want.k)
    assert read_topk(path).index[0] == top.index[0]  # padding (-1) stripped via ndim

    assert read_stats(path) == stats
    got_accs, counts = read_accumulators(path)
    np.testing.assert_array_equal(got_accs["grad_sum"]["model.embed_tokens.weight"],
                                  (scores["model.embed_tokens.weight"] * 2).numpy())
    assert counts == {"tokens": 1234, "batches": 5}

    attrs = read_attrs(path)
    assert attrs["format"] == "esa-scores" and attrs["format_version"] == 1
    assert attrs["complete"] is True and attrs["model_revision"] == ""
    assert json.loads(attrs["manifest_json"]) == ATTRS["manifest_json"]
    assert attrs["seed"] == 3 and attrs["esa_version"]
    with open_score_file(path) as sf:
        assert sf.unscored() == ["model.norm.weight", "lm_head.weight"]
        assert sf.manifest() == ATTRS["manifest_json"]
        assert sf.h5["scores/model.layers.0.mlp.down_proj.weight"].chunks is not None
        assert sf.h5["scores/model.layers.0.mlp.down_proj.weight"].compression == "gzip"
        idx = sf.h5["bottomk/index"][()]  # per_layer bottom-k holds 1-D, 2-D and 3-D rows
        assert idx.shape == (12, 3) and sf.h5["bottomk/ndim"].dtype == np.int8
        ndim = sf.h5["bottomk/ndim"][()]
        assert sorted(set(ndim.tolist())) == [1, 2, 3]
        assert all((idx[i, ndim[i]:] == -1).all() for i in range(len(ndim)))
        assert sf.h5["topk/param"].dtype.kind == "O"


def test_complete_is_the_last_attribute_written(tmp_path):
    path = _write(tmp_path / "scores.h5")
    with h5py.File(path, "r") as f:
        # The file tracks attribute creation order, so iteration order is write order.
        assert list(f.attrs)[-1] == "complete"
        assert bool(f.attrs["complete"]) is True


def test_missing_file_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_score_file(tmp_path / "nope.h5")


def test_truncated_or_garbage_file_refused(tmp_path):
    good = _write(tmp_path / "scores.h5")
    data = good.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="not a readable HDF5"):
        read_topk(bad)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5 at all")
    with pytest.raises(UserError, match="not a readable HDF5"):
        read_attrs(junk)


def test_incomplete_file_refused(tmp_path):
    path = _write(tmp_path / "scores.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(UserError, match="incomplete"):
        read_scores(path)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(UserError, match="did not finish"):
        read_topk(path)


def test_foreign_and_future_files_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["complete"] = True
    with pytest.raises(UserError, match="not an ESA score file"):
        open_score_file(other)
    path = _write(tmp_path / "scores.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(UserError, match="version 99"):
        open_score_file(path)


def test_writer_killed_midway_leaves_nothing_complete(tmp_path, monkeypatch):
    """A failure while writing removes the temporary and never creates the target."""
    def boom(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(scorefile, "_write_stats", boom)
    scores = _scores()
    with pytest.raises(RuntimeError, match="killed"):
        _write(tmp_path / "scores.h5", stats=compute_stats(scores, 2))
    assert os.listdir(tmp_path) == []


def test_temporary_is_not_complete_before_rename(tmp_path, monkeypatch):
    """Freeze the writer just before the rename: the target does not exist yet and the
    temporary file is in the same folder; a hard kill before `complete` leaves a file that
    readers refuse."""
    seen = {}
    real_replace = os.replace

    def spy_replace(src, dst):
        seen["src"], seen["dst"] = Path(src), Path(dst)
        seen["dst_existed"] = Path(dst).exists()
        seen["same_dir"] = Path(src).parent == Path(dst).parent
        return real_replace(src, dst)
    monkeypatch.setattr(scorefile.os, "replace", spy_replace)

    # Simulate a kill between the data and the `complete` flag: write everything but the
    # flag through the real code path by intercepting the attribute assignment.
    real_write_topk = scorefile._write_topk

    def write_topk_then_die(group, topk):
        real_write_topk(group, topk)
        group.file.flush()
        seen["tmp_copy"] = tmp_path / "copy_of_tmp.h5"
        seen["tmp_copy"].write_bytes(Path(group.file.filename).read_bytes())
    monkeypatch.setattr(scorefile, "_write_topk", write_topk_then_die)

    path = _write(tmp_path / "scores.h5")
    assert seen["dst"] == path and seen["same_dir"] and not seen["dst_existed"]
    assert seen["src"].name.startswith(".scores.h5.") and not seen["src"].exists()
    with pytest.raises(UserError, match="incomplete"):
        open_score_file(seen["tmp_copy"])
    assert read_topk(path).param  # the finished file is fine


def test_float16_scores(tmp_path):
    scores = _scores()
    path = _write(tmp_path / "scores.h5", scores=scores, score_dtype="float16",
                  compression="lzf")
    back = read_scores(path)
    for name, t in scores.items():
        assert back[name].dtype == np.float16
        np.testing.assert_array_equal(back[name], t.half().numpy())
    assert read_attrs(path)["score_dtype"] == "float16"
    # The ranking itself was made on fp32 and is kept in float64.
    assert read_topk(path).score[0] == pytest.approx(float(max(t.max() for t in scores.values())))


def test_topk_only_save(tmp_path):
    scores = _scores()
    top = rank_scores(scores, 5, "global")
    path = write_score_file(tmp_path / "scores.h5", scores=None, topk=top, attrs=ATTRS,
                            save="topk")
    with h5py.File(path, "r") as f:
        assert "scores" not in f
    assert read_topk(path).param == top.param
    with pytest.raises(UserError, match="only the top-k"):
        read_scores(path)


def test_large_tensor_written_in_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(scorefile, "_SLICE_ELEMS", 10)
    scores = {"a.weight": torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6),
              "b.bias": torch.arange(25, dtype=torch.float32),
              "c.w": torch.arange(60, dtype=torch.float32).reshape(3, 4, 5).transpose(0, 2)}
    path = _write(tmp_path / "scores.h5", scores=scores)
    back = read_scores(path)
    for name, t in scores.items():
        np.testing.assert_array_equal(back[name], t.numpy())


def test_bad_options(tmp_path):
    with pytest.raises(UserError, match="score dtype"):
        _write(tmp_path / "s.h5", score_dtype="bfloat16")
    with pytest.raises(UserError, match="save mode"):
        _write(tmp_path / "s.h5", save="some")
    with pytest.raises(UserError, match="compression"):
        _write(tmp_path / "s.h5", compression="zstd")
    with pytest.raises(ValueError, match="manifest_id"):
        _write(tmp_path / "s.h5", attrs={k: v for k, v in ATTRS.items() if k != "manifest_id"})
    with pytest.raises(UserError, match="cannot store"):
        _write(tmp_path / "s.h5", scores={"a/b": torch.ones(2)})
    with pytest.raises(UserError, match="no 'bottomk'"):
        read_topk(_write(tmp_path / "ok.h5"), "bottomk")
    assert sorted(os.listdir(tmp_path)) == ["ok.h5"]


def test_large_manifest_attribute(tmp_path):
    """Manifests with long candidate lists exceed HDF5's 64 KiB compact-attribute limit."""
    manifest = {"candidates": [f"model.layers.{i}.mlp.down_proj.weight:{i},{i}"
                               for i in range(5000)]}
    path = _write(tmp_path / "scores.h5", attrs={**ATTRS, "manifest_json": manifest})
    assert len(read_attrs(path)["manifest_json"]) > 65536
    with open_score_file(path) as sf:
        assert sf.manifest() == manifest
