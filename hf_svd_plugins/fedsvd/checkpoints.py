"""The LoRA A file that :class:`~hf_svd_plugins.fedsvd.FedSVDCallback` saves with every checkpoint, and the run id
that ties it to its checkpoint.

transformers' DeepSpeed checkpoint of a PEFT model (and its ZeRO-3 adapter save) leaves frozen parameters out, so the
refactorized frozen ``A`` of each pair goes into its own safetensors file, and comes back from it on resume.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_svd_plugins.distributed import broadcast_int, process_rank
from hf_svd_plugins.lora import LoraPair, read_lora_weights

__all__ = ["LORA_A_FILE", "read_lora_A_file", "write_lora_A_file"]

LORA_A_FILE = "fedsvd_lora_A.safetensors"
"""What :class:`FedSVDCallback` writes into every checkpoint folder: each pair's current ``A (r, d_in)``, keyed
``<module name>.lora_A.weight``, with the step, the adapter name, the callback's run id and ``sum ||B||_F^2`` in the
safetensors metadata. transformers' DeepSpeed checkpoint leaves frozen parameters out, so without it a resume would
bring back the initial A."""


def _chunked_weights(pairs: Sequence[LoraPair], optimizer: object | None):
    """``{name: (A, B)}`` of consecutive chunks of ``pairs`` (the callback's bounded gathers), one chunk at a time."""
    from hf_svd_plugins.fedsvd.callback import _chunks  # the callback imports this module

    for chunk in _chunks(pairs):
        yield chunk, read_lora_weights(chunk, optimizer)


def lora_a_key(pair: LoraPair) -> str:
    return f"{pair.name}.lora_A.weight"


@torch.no_grad()
def write_lora_A_file(  # noqa: N802 - the paper's name
    pairs: Sequence[LoraPair], folder: str, step: int, optimizer: object | None = None, write: bool | None = None,
    run_id: str | None = None,
) -> str | None:
    """Write every pair's full ``A (r, d_in)`` to ``folder/`` :data:`LORA_A_FILE` (safetensors; the step, ``run_id``
    and ``sum ||B||_F^2`` in its metadata).

    Every rank must call it (ZeRO-3 and FSDP2 gather, in chunks of at most ~4.2M entries); ``write`` (default: rank 0)
    says which rank writes. Returns the file's path on the writing rank, else None.
    """
    values, b_sum = gather_lora_A(pairs, optimizer, keep=write)
    if values is None:
        return None
    return save_lora_A_file(values, folder, step, pairs[0].adapter if pairs else "", b_sum, run_id)


@torch.no_grad()
def gather_lora_A(  # noqa: N802
    pairs: Sequence[LoraPair], optimizer: object | None = None, keep: bool | None = None
) -> tuple[dict[str, torch.Tensor] | None, float]:
    """``({key: whole A on the CPU} on the ranks that ``keep`` (default: rank 0), else None, sum ||B||_F^2)``; every
    rank must call it (gathered chunk by chunk)."""
    keep = process_rank() == 0 if keep is None else keep
    values: dict[str, torch.Tensor] = {}
    b_sum_of_squares = 0.0
    for chunk, weights in _chunked_weights(pairs, optimizer):
        b_sum_of_squares += sum(float(weights[p.name][1].double().square().sum()) for p in chunk)
        if keep:
            values.update({lora_a_key(p): weights[p.name][0].detach().to("cpu").contiguous() for p in chunk})
    return (values if keep else None), b_sum_of_squares


def save_lora_A_file(  # noqa: N802
    values: dict[str, torch.Tensor], folder: str, step: int, adapter_name: str, b_sum_of_squares: float,
    run_id: str | None,
) -> str:
    """Write :func:`gather_lora_A`'s values to ``folder/`` :data:`LORA_A_FILE` (this process only); its path."""
    from safetensors.torch import save_file

    path = os.path.join(folder, LORA_A_FILE)
    metadata = {"format": "pt", "global_step": str(step), "adapter_name": adapter_name,
                "lora_B_sum_of_squares": repr(b_sum_of_squares), "fedsvd_run_id": run_id or ""}
    # a temporary name of this process alone (save_on_each_node on a shared filesystem: one writer per node), renamed:
    # a run killed while writing leaves no half-written file under the real name
    tmp = f"{path}.{process_rank()}-{os.getpid()}.tmp"
    save_file(values, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_lora_A_file(  # noqa: N802
    folder: str, step: int, b_sum_of_squares: float | None = None, run_id: str | None = None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``({key: A}, "")`` from ``folder/`` :data:`LORA_A_FILE` if it exists, was written at ``step`` and by the run
    ``run_id``, else ``(None, why not)``.

    ``run_id``: the id :class:`FedSVDCallback` recorded in the resumed checkpoint's ``trainer_state.json`` (None for a
    checkpoint from before run ids: then only files without an id are accepted). A file of another run (a stale
    ``checkpoint-N`` folder with the same step; two runs that differ only by their seed have B sums 0.6% apart) is
    refused. With ``b_sum_of_squares`` (``sum ||B||_F^2`` over the pairs of the model after the checkpoint was loaded),
    a file whose B had another sum (relative difference above 1e-2; 16-bit rounding stays far below) is refused too.
    """
    path = os.path.join(folder, LORA_A_FILE)
    if not os.path.isfile(path):
        return None, f"{path} does not exist"
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    saved_step, saved_b = metadata.get("global_step"), metadata.get("lora_B_sum_of_squares")
    if saved_step != str(step):
        return None, f"{path} was written at step {saved_step}, not at the resumed step {step}"
    saved_id = metadata.get("fedsvd_run_id") or None
    if saved_id != run_id:
        return None, (f"{path} was written by another run (FedSVD run id {saved_id} there, {run_id} in the resumed "
                      "Trainer state)")
    if b_sum_of_squares is not None and saved_b is not None:
        saved = float(saved_b)
        if abs(saved - b_sum_of_squares) > 1e-2 * max(abs(saved), abs(b_sum_of_squares), 1e-30):
            return None, (f"{path} was written by another run (sum of B^2 {saved:.6g} there, {b_sum_of_squares:.6g} "
                          "in the loaded checkpoint)")
    return load_file(path), ""


def lora_b_sum_of_squares(pairs: Sequence[LoraPair], optimizer: object | None) -> float:
    """``sum ||B||_F^2`` over ``pairs`` (read like :func:`write_lora_A_file` does; every rank must call)."""
    total = 0.0
    for chunk, weights in _chunked_weights(pairs, optimizer):
        total += sum(float(weights[p.name][1].double().square().sum()) for p in chunk)
    return total


def new_run_id() -> str:
    """A random id, rank 0's on every rank (every rank must call). From ``secrets``, not ``random``: the Trainer seeds
    ``random`` with ``args.seed``, and two runs with the same seed must get different ids."""
    return f"{broadcast_int(secrets.randbits(63)):016x}"


def recorded_run_id(stateful_callbacks: dict | None, class_name: str, adapter_name: str | None) -> str | None:
    """The ``run_id`` that the callback named ``class_name`` for ``adapter_name`` exported into a Trainer state's
    ``stateful_callbacks`` (the last one if the Trainer appended several), or None."""
    entry = (stateful_callbacks or {}).get(class_name)
    entries = entry if isinstance(entry, list) else [entry] if isinstance(entry, dict) else []
    for e in reversed(entries):
        if e.get("args", {}).get("adapter_name") == adapter_name:
            return e.get("attributes", {}).get("run_id") or None
    return None


def checkpoint_mismatch(folder: str, step: int, class_name: str, adapter_name: str | None, run_id: str | None) -> str:
    """Why ``folder`` is not the checkpoint the Trainer just saved at ``step`` for the run ``run_id`` ("" if it is):
    its ``trainer_state.json`` must exist and record that step and run id."""
    from transformers.trainer import TRAINER_STATE_NAME

    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return f"{path} not found"
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("global_step") != step:
        return f"{path} records step {saved.get('global_step')}, not the saved step {step}"
    saved_id = recorded_run_id(saved.get("stateful_callbacks"), class_name, adapter_name)
    if saved_id != run_id:
        return f"{path} records FedSVD run id {saved_id}, not this run's {run_id}"
    return ""


def resume_folders(args, state) -> list[str]:
    """Where the checkpoint being resumed can be: ``TrainingArguments.resume_from_checkpoint`` (set by HF and TRL
    example scripts; ``Trainer.train(resume_from_checkpoint=...)`` does not reach callbacks), then
    ``{output_dir}/checkpoint-{global_step}`` (what ``resume_from_checkpoint=True`` picks)."""
    folders = []
    hint = getattr(args, "resume_from_checkpoint", None)
    if isinstance(hint, str) and hint:
        folders.append(hint)
    default = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if all(os.path.abspath(f) != os.path.abspath(default) for f in folders):
        folders.append(default)
    return folders
