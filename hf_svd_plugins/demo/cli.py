"""``hf-svd demo``: the suite's methods one after another on packaged real weights and text, offline.

    hf-svd demo [--methods eva,dp,fedsvd,fwsvd,merge] [--quick] [--output-dir hf_svd_demo] [--threads N]

torch is imported only inside :func:`run`.
"""

from __future__ import annotations

import argparse

from hf_svd_plugins.demo import STEP_MODULES

HELP = "run every method (EVA, DP, FedSVD, FWSVD, merging) on packaged MiniLM, reviews and digits, offline"


def parse_methods(value: str) -> list[str]:
    """``"eva,dp"`` -> ``["eva", "dp"]`` in the given order; unknown, empty or repeated names are refused."""
    names = [v.strip() for v in value.split(",")]
    if not value.strip() or any(not n for n in names):
        raise argparse.ArgumentTypeError(f"--methods needs a comma-separated list from {','.join(STEP_MODULES)}, "
                                         f"got {value!r}")
    unknown = [n for n in names if n not in STEP_MODULES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from "
                                         f"{','.join(STEP_MODULES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"--methods lists {', '.join(repeated)} more than once")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=parse_methods, default=list(STEP_MODULES),
                        help=f"comma-separated steps to run, in order (default {','.join(STEP_MODULES)})")
    parser.add_argument("--quick", action="store_true", help="shorter runs: the whole demo in a minute or two")
    parser.add_argument("--output-dir", default="hf_svd_demo", help="where report.md, plots and models go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by DPTrainer) warns on every start otherwise
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    from hf_svd_plugins.demo.common import DemoContext
    from hf_svd_plugins.demo.runner import run_demo

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the steps' own bars only
    logging.getLogger("hf_svd_plugins").setLevel(logging.ERROR)
    ctx = DemoContext(output_dir=args.output_dir, quick=args.quick, seed=args.seed)
    return run_demo(args.methods, ctx)
