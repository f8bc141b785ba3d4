"""The command line as a user meets it: the issue's example, help texts and user errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_esa


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = err.splitlines()[-1]
    assert "error:" in last
    for needle in needles:
        assert needle in last, (needle, err)
    # Only the error line on stderr, apart from log lines that came before it.
    assert all(" INFO " in line or " WARNING " in line for line in err.splitlines()[:-1]), err


def test_the_issue_example_runs_as_written(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n"}) + "\n"
                            for i in range(400)))
    made = run_esa("tiny-model", "--arch", "llama", "--out", "M", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    proc = run_esa("baseline", "--model", "M", "--dataset", "docs.jsonl", "--seq-len", "64",
                   "--max-samples", "1000", "--batch-size", "4", "--dtype", "fp32", "--device", "cpu",
                   "--out-dir", "O", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((tmp_path / "O" / "eval.json").read_text())
    for key in ("ppl", "nll", "token_accuracy", "n_tokens", "n_windows", "per_window_nll"):
        assert key in ev
    assert ev["n_windows"] == len(ev["per_window_nll"]) <= 1000
    assert ev["n_tokens"] == ev["n_windows"] * 63
    for name in ("experiment_manifest.json", "config.json"):
        assert (tmp_path / "O" / name).exists()


def test_help_lists_every_flag_with_its_default():
    from esa.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.option_strings[0] in text, (name, action.option_strings)
                if action.default is not None and action.nargs != 0:
                    assert "(default:" in (action.help or "") or "(default:" in text, (name, action.dest)


def test_missing_model_path(tmp_path):
    proc = run_esa("baseline", "--model", "./no-such-model", "--out-dir", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(proc, "model path './no-such-model' does not exist")


def test_offline_hub_model_missing_from_cache(tmp_path):
    proc = run_esa("baseline", "--model", "esa-no-such-org/no-such-model", "--out-dir", str(tmp_path / "o"),
                   "--quiet", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "esa-no-such-org/no-such-model", str(tmp_path / "hf"), "HF_HUB_OFFLINE=1")


def test_unknown_arch(tmp_path):
    proc = run_esa("tiny-model", "--arch", "bert", "--out", str(tmp_path / "m"))
    assert_one_line_error(proc, "unknown architecture 'bert'", "llama")


def test_dataset_without_the_text_field(tiny_llama, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    proc = run_esa("baseline", "--model", str(tiny_llama), "--dataset", str(data), "--seq-len", "8",
                   "--out-dir", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(proc, "no text field 'text'", "content", "--text-field")


def test_max_samples_zero(tiny_llama, tmp_path):
    proc = run_esa("baseline", "--model", str(tiny_llama), "--max-samples", "0", "--out-dir", str(tmp_path))
    assert_one_line_error(proc, "--max-samples", "at least 1")


def test_seq_len_longer_than_the_data(tiny_llama, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("only a few tokens")
    proc = run_esa("baseline", "--model", str(tiny_llama), "--dataset", str(data), "--seq-len", "256",
                   "--out-dir", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(proc, "--seq-len 256 is longer than the data")


def test_run_missing_manifest(tmp_path):
    proc = run_esa("run", str(tmp_path / "nope.json"))
    assert_one_line_error(proc, "does not exist")


@pytest.mark.parametrize("bad,needle", [({"phase": 9}, "$.phase"), ({"model": {"id": "x", "colour": 1}}, "colour")])
def test_run_rejects_bad_manifests(tmp_path, bad, needle):
    m = {"schema_version": 1, "phase": 1, "model": {"id": "x"}, "data": {"seq_len": 8},
         "seed": 0, "outputs": {"dir": str(tmp_path / "o")}}
    m.update(bad)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    assert_one_line_error(run_esa("run", str(path)), needle)


def test_profile_help_names_every_registered_metric():
    from esa.cli import build_parser
    from esa.spec.names import METRICS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["profile"]
    help_text = next(a.help for a in sub._actions if a.dest == "metric")
    assert all(name in help_text for name in METRICS.names(with_aliases=True))


def test_building_the_parser_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from esa.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
