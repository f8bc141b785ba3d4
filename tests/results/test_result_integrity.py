"""Issue #12, finished work never silently wrong: corrupt results are found by the one state function
(checksums written last with the complete record, the score file's size/shape record, JSON without
NaN), and result files are readable by the group (the umask's mode, not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from esa.core.errors import ResultFileError
from esa.core.io import atomic_write_json, read_json
from esa.results.checksums import ALWAYS_HASH_BYTES, file_digests, verify_files
from esa.results.scorefile import check_score_file
from esa.results.state import CORRUPT, DONE, job_state
from fixtures.synthetic import (fake_scores, manifest, write_baseline_job, write_perturb_job, write_profile_job,
                                write_scores_h5)


def _profile(tmp_path: Path) -> Path:
    return write_profile_job(tmp_path / "p", manifest(2, metric="magnitude"), fake_scores(0))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write `data` into the file at `offset` without changing its size (dd conv=notrunc)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _data_offset(h5: Path) -> int:
    """File offset of the first chunk of the first score tensor (plain data, no metadata)."""
    with h5py.File(h5, "r") as f:
        ds = f["scores"][next(iter(f["scores"]))]
        return int(ds.id.get_chunk_info(0).byte_offset)


def test_random_bytes_in_the_score_data_are_found(tmp_path):
    folder = _profile(tmp_path)
    assert job_state(folder).done
    h5 = folder / "scores.h5"
    _overwrite(h5, _data_offset(h5), np.random.default_rng(0).bytes(64))
    check_score_file(h5)  # the file itself still opens, is complete and matches its layout ...
    state = job_state(folder)
    assert (state.state, state.reason) == (CORRUPT, "corrupt")  # ... its checksum does not
    assert "checksum" in state.message and "scores.h5" in state.message


def test_64kib_of_random_bytes_anywhere_are_found(tmp_path):
    folder = _profile(tmp_path)
    h5 = folder / "scores.h5"
    size = h5.stat().st_size
    _overwrite(h5, size // 4, np.random.default_rng(1).bytes(min(64 << 10, size // 2)))
    state = job_state(folder)  # whatever the bytes hit, one clear reason and no exception
    assert state.state == CORRUPT and "scores.h5" in state.message


def test_a_large_file_is_hashed_when_its_mtime_changed(tmp_path, monkeypatch):
    folder = _profile(tmp_path)
    h5 = folder / "scores.h5"
    record = json.loads((folder / "experiment_manifest.json").read_text())["files"]
    monkeypatch.setattr("esa.results.checksums.ALWAYS_HASH_BYTES", 0)  # treat every file as large
    verify_files(folder, record)  # unchanged: size and mtime match, no hashing needed
    _overwrite(h5, _data_offset(h5), np.random.default_rng(2).bytes(16))
    with pytest.raises(ResultFileError, match="checksum"):
        verify_files(folder, record)  # the write changed the mtime: hashed, caught
    os.utime(h5, ns=(record["scores.h5"]["mtime_ns"], record["scores.h5"]["mtime_ns"]))
    verify_files(folder, record)  # mtime forged back: only a deep check hashes it ...
    with pytest.raises(ResultFileError, match="checksum"):
        verify_files(folder, record, deep=True)
    assert ALWAYS_HASH_BYTES >= 1 << 20


def test_truncated_scores_h5_and_size_mismatch_are_corrupt(tmp_path):
    folder = _profile(tmp_path)
    h5 = folder / "scores.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    state = job_state(folder)
    assert state.state == CORRUPT and "scores.h5" in state.message


def test_scores_h5_size_shape_record(tmp_path):
    h5 = write_scores_h5(tmp_path / "scores.h5", fake_scores(0), man=manifest(2, metric="magnitude"), k=5,
                         mode="per_layer")
    info = check_score_file(h5)
    assert "layout_json" not in info.attrs
    with h5py.File(h5, "r") as f:
        layout = json.loads(f.attrs["layout_json"])
    assert "topk/score" in layout and layout["topk/score"][1] == "float64"
    with h5py.File(h5, "r+") as f:  # a dataset replaced by a shorter one: complete is still True
        del f["topk/score"]
        f["topk/score"] = np.zeros(2)
    with pytest.raises(ResultFileError, match="size/shape record"):
        check_score_file(h5)


@pytest.mark.parametrize("edit", ["nan", "text", "truncate"])
def test_broken_perturbation_json_is_corrupt(tmp_path, edit):
    folder = write_perturb_job(tmp_path / "q", manifest(3), base_ppl=10.0, delta_ppl=7.0276,
                               controls={"random_k": [0.1, 0.2]}, n_targets=3)
    assert job_state(folder).done
    path = folder / "perturbation.json"
    text = path.read_text()
    if edit == "nan":  # what a hand edit or another tool writes; Python's json would accept it
        path.write_text(text.replace('"delta_ppl": 7.0276', '"delta_ppl": NaN'))
    elif edit == "text":
        path.write_text(text.replace('"delta_ppl": 7.0276', '"delta_ppl": "7.0276"'))
    else:
        path.write_text(text[: len(text) // 2])
    state = job_state(folder)
    assert state.state == CORRUPT, state
    assert "perturbation.json" in state.message


def test_broken_eval_json_is_corrupt(tmp_path):
    folder = write_baseline_job(tmp_path / "b", manifest(1), ppl=12.0, nll=2.48, accuracy=0.4)
    assert job_state(folder).done
    (folder / "eval.json").write_text((folder / "eval.json").read_text().replace('"ppl": 12.0', '"ppl": 12.5'))
    state = job_state(folder)
    assert state.state == CORRUPT and "eval.json" in state.message and "checksum" in state.message


def test_read_json_refuses_nan_and_infinity(tmp_path):
    for literal in ("NaN", "Infinity", "-Infinity"):
        (tmp_path / "x.json").write_text(f'{{"a": {literal}}}')
        with pytest.raises(ResultFileError, match="not valid JSON"):
            read_json(tmp_path / "x.json")


def test_checksums_list_result_files_only(tmp_path):
    folder = _profile(tmp_path)
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"png")
    (folder / ".scores.h5.abc.tmp").write_bytes(b"temp")
    (folder / "perturb").mkdir()  # another job's folder (esa profile --perturb)
    (folder / "perturb" / "perturbation.json").write_text("{}")
    names = set(file_digests(folder))
    assert names == {"scores.h5", "profile.json", "plots/a.png"}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_json(tmp_path / "eval.json", {"a": 1})
        h5 = write_scores_h5(tmp_path / "scores.h5", fake_scores(0), man=manifest(2, metric="magnitude"), k=5,
                             mode="per_layer")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(h5.stat().st_mode) == mode


def test_state_done_needs_every_listed_file(tmp_path):
    folder = _profile(tmp_path)
    (folder / "profile.json").unlink()
    state = job_state(folder)
    assert state.state == CORRUPT and "profile.json is missing" in state.message
    assert job_state(_profile(tmp_path / "again")).state == DONE
