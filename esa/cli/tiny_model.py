"""`esa tiny-model`: a tiny model of a seed architecture with an offline-trained tokenizer."""

from __future__ import annotations

import argparse

from esa.cli.options import HELP_FORMATTER, add_logging_flags, positive_int

ARCH_CHOICES = ("llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("tiny-model", help="write a tiny model + tokenizer (save_pretrained)",
                       formatter_class=HELP_FORMATTER,
                       description="Write a tiny randomly initialised (optionally briefly trained) "
                       "model and a byte-level BPE tokenizer trained offline on the built-in corpus. "
                       "The same seed and step budget give the same model.")
    p.add_argument("--arch", required=True, help=f"one of {', '.join(ARCH_CHOICES)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training seed")
    p.add_argument("--train-steps", type=positive_int, default=None,
                   help="train this many AdamW steps on the built-in corpus (deterministic)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="train for at most this many seconds (machine-dependent step count)")
    p.add_argument("--vocab-size", type=positive_int, default=2048, help="BPE vocabulary size")
    p.add_argument("--hidden-size", type=positive_int, default=128, help="hidden width")
    p.add_argument("--layers", type=positive_int, default=4, help="transformer blocks")
    add_logging_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build and save the model."""
    from esa.core.errors import UserError
    from esa.model.tiny import ARCHS, TinySize, write_tiny_model

    if args.arch not in ARCHS:
        raise UserError(f"unknown architecture '{args.arch}'; choose one of {', '.join(ARCHS)}")
    if args.train_seconds is not None and args.train_seconds <= 0:
        raise UserError(f"--train-seconds must be positive (got {args.train_seconds})")
    size = TinySize(hidden=args.hidden_size, layers=args.layers,
                    intermediate=3 * args.hidden_size)
    out = write_tiny_model(args.arch, args.out, seed=args.seed, vocab_size=args.vocab_size,
                           train_steps=args.train_steps, train_seconds=args.train_seconds, size=size)
    if not args.quiet:
        print(f"wrote {out}")
    return 0
