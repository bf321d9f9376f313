"""Poisson sampling of logical batches, split into micro-batches (gradient accumulation) and rank shares.

Every rank draws the *same* Poisson sample from the same seed, then takes its own share, so the union over ranks and
micro-batches of one optimizer step is exactly one Poisson-sampled logical batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from hf_svd_plugins.dp.batch import check_one_row_per_example


def poisson_sample(num_examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices ``(k,)`` (int64, ascending) of the examples included, each independently with probability ``q``.

    ``k`` is Binomial(N, q) and may be 0.
    """
    mask = torch.rand(num_examples, generator=generator) < sample_rate
    return mask.nonzero().flatten()


def split_logical_batch(
    indices: torch.Tensor, num_micro_batches: int, world_size: int = 1, rank: int = 0
) -> list[list[int]]:
    """This rank's ``num_micro_batches`` micro-batches of a logical batch ``indices (k,)``.

    The batch is cut into ``world_size`` contiguous shares (sizes differ by at most one), the share of ``rank`` into
    ``num_micro_batches`` contiguous micro-batches. Micro-batches may be empty.
    """
    share = torch.tensor_split(indices, world_size)[rank]
    return [chunk.tolist() for chunk in torch.tensor_split(share, num_micro_batches)]


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding, per optimizer step, this rank's ``gradient_accumulation_steps`` micro-batches of a
    Poisson-sampled logical batch (expected size ``q * N``).

    The sample of step ``t`` of epoch ``e`` depends only on ``(seed, e, t)``: resuming from a checkpoint and skipping
    the first batches of the epoch reproduces the same batches.

    Args:
        num_examples: ``N``.
        sample_rate: ``q``.
        steps_per_epoch: optimizer steps per epoch (usually ``int(1 / q)``).
        gradient_accumulation_steps: micro-batches per optimizer step on each rank.
        world_size, rank: this process' share.
        seed: base seed, identical on every rank.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        steps_per_epoch: int,
        gradient_accumulation_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
        if steps_per_epoch < 1 or gradient_accumulation_steps < 1:
            raise ValueError("steps_per_epoch and gradient_accumulation_steps must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.gradient_accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + self.epoch) % 2**64)
        for _ in range(self.steps_per_epoch):
            idx = poisson_sample(self.num_examples, self.sample_rate, gen)
            yield from split_logical_batch(idx, self.gradient_accumulation_steps, self.world_size, self.rank)


EMPTY_BATCH_KEY = "dp_empty_batch"


class PrivateCollator:
    """Wrap a collator for private batches: an empty micro-batch becomes ``{EMPTY_BATCH_KEY: tensor(0)}`` instead
    of an error, and a batch that is not one row per example drawn is refused
    (:func:`~.batch.check_one_row_per_example`), before any gradient is taken from it."""

    def __init__(self, collate_fn) -> None:
        self.collate_fn = collate_fn

    def __call__(self, features: list) -> dict:
        if len(features) == 0:
            return {EMPTY_BATCH_KEY: torch.zeros(1)}
        batch = self.collate_fn(features)
        check_one_row_per_example(batch, len(features), self.collate_fn)
        return batch


def is_empty_batch(inputs: dict) -> bool:
    return isinstance(inputs, dict) and EMPTY_BATCH_KEY in inputs


class PoissonDataLoader(DataLoader):
    """A DataLoader over a :class:`PoissonBatchSampler` that forwards ``set_epoch`` (the Trainer calls it)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


def poisson_dataloader(dataset, collate_fn, sample_rate: float, steps_per_epoch: int, args, seed: int) -> PoissonDataLoader:
    """This rank's loader of Poisson-sampled logical batches for ``TrainingArguments`` ``args`` (micro-batches per
    ``gradient_accumulation_steps``, shares per ``world_size``/``process_index``); empty micro-batches collate to
    :data:`EMPTY_BATCH_KEY`, other batches must have one row per example drawn."""
    sampler = PoissonBatchSampler(
        num_examples=len(dataset),
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=max(1, args.world_size),
        rank=args.process_index,
        seed=seed,
    )
    return PoissonDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=PrivateCollator(collate_fn),
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
    )
