"""``hf-svd``: command-line entry point.

    hf-svd demo [--methods eva,dp,fedsvd,fwsvd,merge] [--quick]   (hf_svd_plugins.demo.cli)
    hf-svd compress ...   (hf_svd_plugins.fwsvd.cli)
    hf-svd merge ...      (hf_svd_plugins.merging.cli)

A method's verb lives in its own package: a module with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, listed in :data:`VERB_MODULES`. Those modules import torch only inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: verb -> module implementing it
VERB_MODULES = {
    "demo": "hf_svd_plugins.demo.cli",
    "compress": "hf_svd_plugins.fwsvd.cli",
    "merge": "hf_svd_plugins.merging.cli",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-svd", description="SVD-centred plugins for the Hugging Face Trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    verbs = {}
    for verb, module_name in VERB_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a method not built into this version; real import errors propagate
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        module.add_arguments(sub.add_parser(verb, help=module.HELP, description=module.HELP))
        verbs[verb] = module
    args = parser.parse_args(argv)
    return int(verbs[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
