"""Data order: a pure function of (seed, step), so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import torch


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's index lists, micro-batch after micro-batch, from optimizer step `start_step` on.

    The global order is a fresh permutation of the dataset every epoch (seeded by seed and epoch). Each
    optimizer step consumes `global_batch` consecutive positions of that order; process r of R takes its
    slice of every micro-batch, so processes never see the same image in a step and the data position
    after a resume is known from the step alone.

    With `keys` set (`core.data.train_loader` sets it for datasets whose items depend on the step, such as
    random-resized crops), the lists hold `(index, seed, step)` tuples instead of plain indices, so that a
    dataset can draw its augmentation from (seed, step, index) alone.
    """

    keys = False

    def __init__(self, num_items: int, global_batch: int, *, seed: int, rank: int, world_size: int,
                 grad_accum: int = 1, start_step: int = 0, total_steps: int | None = None):
        if num_items < 1:
            raise ValueError("the dataset is empty")
        per_update = world_size * grad_accum
        if global_batch % per_update:
            raise ValueError(f"batch_size {global_batch} must be divisible by processes x grad_accum "
                             f"= {world_size} x {grad_accum}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro = global_batch // per_update
        self.start_step, self.total_steps = start_step, total_steps
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=gen), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """All indices of optimizer step `step`, in the order they are split across micro-batches/processes."""
        start = step * self.global_batch
        positions = torch.arange(start, start + self.global_batch)
        epochs = positions // self.num_items
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self._permutation(epoch)[positions[sel] % self.num_items]
        return out

    def local_indices(self, step: int, micro_step: int) -> list[int]:
        chunk = self.global_indices(step).view(self.grad_accum, self.world_size, self.micro)
        return chunk[micro_step, self.rank].tolist()

    def __iter__(self):
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            for micro_step in range(self.grad_accum):
                indices = self.local_indices(step, micro_step)
                yield [(i, self.seed, step) for i in indices] if self.keys else indices
            step += 1

    def __len__(self):
        if self.total_steps is None:
            raise TypeError("an endless sampler has no length")
        return (self.total_steps - self.start_step) * self.grad_accum


def step_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """A CPU generator for per-step augmentation: the same on a resumed run as on an uninterrupted one."""
    mixed = ((seed * 1_000_003 + step) * 1_009 + micro_step) * 10_007 + rank
    return torch.Generator().manual_seed(mixed % (2**63))
