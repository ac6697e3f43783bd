"""Length-grouped batching that is a pure function of (seed, epoch): exact resume needs that."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler"]


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort within mega-batches by length, so a batch holds similar lengths.

    Padding waste falls with little loss of randomness (the megabatch trick of the transformers
    sampler of the same name). Unlike that one, the order depends only on ``seed`` and the epoch
    set by ``set_epoch``, never on global RNG state, so a resumed run replays the same order.
    The longest batch comes first, so an out-of-memory error shows at step 1, not at hour 3.

    Args:
        lengths: token length of every sample.
        batch_size: samples per step on one process times the number of processes.
        seed: order seed.
        megabatch_mult: batches per sorted group.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_mult: int = 50,
                 group: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        if not self.group:
            return perm
        size = self.batch_size * self.megabatch_mult
        megabatches = [sorted(perm[i:i + size], key=lambda j: -self.lengths[j])
                       for i in range(0, len(perm), size)]
        if megabatches and len(megabatches[0]) > 0:
            # Move the longest sample of all to the front (into the first batch).
            longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
            megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        return [j for mb in megabatches for j in mb]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))
