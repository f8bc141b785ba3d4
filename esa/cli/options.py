"""Flag groups shared by several subcommands, and the manifest sections they give.

Flags left unset are None and left out of the sections, so the typed manifest fills the default
(esa.spec.manifest, the one place defaults are written): flags > defaults, as plans are plan >
defaults. Help texts show those defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from esa.spec.fields import default_of
from esa.spec.manifest import ATTENTION, DEFAULT_BATCH_SIZE, DEVICES, DTYPES, DataSpec, Manifest, ModelSpec


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' for every flag that has a default; flags without one say so in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


HELP_FORMATTER = HelpFormatter


def default(cls: type, name: str) -> str:
    """' (default: X)' for field `name` of spec class `cls`, for help texts."""
    return f" (default: {default_of(cls, name)})"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so --max-samples 0 is refused with one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def given(**values: Any) -> dict[str, Any]:
    """The values that were given (None means: not given, take the spec's default)."""
    return {k: v for k, v in values.items() if v is not None}


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    """--quiet and --log-level."""
    g = p.add_argument_group("logging")
    g.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors; no progress bars")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level on stderr (the job's esa.log in --out-dir keeps INFO and up)")
    g.add_argument("--verbose", "-v", dest="log_level", action="store_const", const="DEBUG",
                   help="same as --log-level DEBUG")


def add_model_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model --revision --dtype --device --attention --trust-remote-code."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="hub id (read from the local HF cache), a local directory, "
                   "or esa:tiny-<arch> (the built-in tiny model, trained once and cached)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype; auto = bf16 on GPU, fp32 on CPU" + default(ModelSpec, "dtype"))
    g.add_argument("--device", default=None, choices=DEVICES,
                   help="auto = cuda when available" + default(ModelSpec, "device"))
    g.add_argument("--attention", "--attn-implementation", dest="attention", default=None, choices=ATTENTION,
                   help="attention kernel; second-order metrics switch to eager themselves"
                   + default(ModelSpec, "attention"))
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model repository's own Python code to run (off unless asked for)")


def add_data_flags(p: argparse.ArgumentParser, phase: int) -> None:
    """--dataset --dataset-config --split --text-field --seq-len --max-samples --batch-size."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="'builtin' (held-out Python stdlib source, offline), a hub dataset "
                        "(e.g. wikitext with --dataset-config wikitext-2-raw-v1 --split test), "
                        "or a local .txt/.jsonl/.json/.parquet file or folder" + default(DataSpec, "dataset"))
    g.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    g.add_argument("--split", default=None, help="split; default validation for builtin, test for hub data")
    g.add_argument("--text-field", default=None,
                   help="column holding the text (json/parquet/hub)" + default(DataSpec, "text_field"))
    g.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per window; default min(2048, the model's context)")
    g.add_argument("--max-samples", type=positive_int, default=None, help=(
        "calibration windows: the seed draws K of the pool (--pool-size, default all windows); default: the "
        "whole pool" if phase == 2 else "use the first K windows (default: all)"))
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"windows per forward pass (default: {DEFAULT_BATCH_SIZE[phase]})")


def default_out_dir(args: argparse.Namespace, what: str) -> str:
    """outputs/<model name>/<what> when --out-dir is not given (the runbook omits it at times)."""
    name = Path(str(args.model).rstrip("/")).name.replace(":", "-") or "model"
    return str(Path("outputs") / name / what)


def model_section(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's model section from the flags that were given."""
    return given(id=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
                 attention=args.attention, trust_remote_code=args.trust_remote_code)


def data_section(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's data section from the flags that were given."""
    return given(dataset=args.dataset, config=args.dataset_config, split=args.split, text_field=args.text_field,
                 seq_len=args.seq_len, max_samples=args.max_samples, batch_size=args.batch_size)


def build_manifest(phase: int, args: argparse.Namespace, out_dir: str, **sections: Any) -> Manifest:
    """The typed manifest of these flags: flags > defaults, checked like a manifest file."""
    doc = {"phase": phase, "model": model_section(args), "data": data_section(args),
           **given(experiment=getattr(args, "experiment", None), seed=getattr(args, "seed", None)),
           **sections}
    doc["outputs"] = {**doc.get("outputs", {}), "dir": out_dir}
    return Manifest.from_dict(doc, source="the command line", partial=True)
