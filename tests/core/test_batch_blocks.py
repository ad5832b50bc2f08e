"""The loader's reused shared-memory batch blocks (`core.data.BatchBlocks`): a worker writes a batch into one of its
blocks only once the training process holds no tensor on that block, and the training loop sees every batch as it
was made, however long it keeps it.

Why blocks are reused: filling fresh shared memory costs the kernel a page fault per page (docs/data.md,
"Where a loader worker's time goes"). The tests below rely on two PyTorch behaviours, checked on the versions
the suite runs on: a storage's Python object lives as long as any tensor uses the storage (so a finalizer on it
fires only when the last view is gone), and a storage received from a worker keeps the descriptor of its
shared-memory file (so `_share_fd_cpu_` names the block it came from).
"""

import gc
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # registers how tensors pickle between processes

from core.data import SPARE_BLOCKS, BatchBlocks, load_dataset, train_loader
from core.order import StepBatchSampler


class Numbered:
    """Item i is an 8 x 8 image whose pixels are all (i, i // 2, 255 - i): any mix-up between batches shows."""

    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def train_item(self, key):
        i = int(key)
        return np.broadcast_to(np.array([i, i // 2, 255 - i], np.uint8), (8, 8, 3)).copy(), i


def expected(labels: torch.Tensor) -> torch.Tensor:
    colour = torch.stack([labels, labels // 2, 255 - labels], 1).to(torch.uint8)  # (b, 3)
    return colour[:, :, None, None].expand(-1, -1, 8, 8)


def block_of(images: torch.Tensor) -> int:
    """The shared-memory file (its inode) that a batch received from a worker lives in."""
    fd, _ = images.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def test_workers_reuse_their_blocks_while_kept_batches_stay_intact():
    steps, workers = 60, 2
    sampler = StepBatchSampler(64, 4, seed=0, rank=0, world_size=1, total_steps=steps)
    loader = train_loader(Numbered(), sampler, num_workers=workers, pin_memory=False, seed=0)
    kept, files = [], []
    for step, (x, y) in enumerate(loader):
        assert torch.equal(x, expected(y)), step
        files.append(block_of(x))
        if step % 6 == 0:  # the loop keeps a view of some batches to the end (as a list of recent images would)
            kept.append((x[1:3], y[1:3].clone()))
    for view, labels in kept:  # never overwritten by a later batch
        assert torch.equal(view, expected(labels))
    # dropped batches' blocks came back: far fewer files than batches, though the kept ones forced fresh blocks
    per_worker = loader.dataset.blocks.per_worker
    assert per_worker == 2 + SPARE_BLOCKS  # prefetch_factor 2
    assert len(set(files)) <= workers * per_worker + len(kept) < steps


def test_worker_batches_equal_the_training_process_own_for_in_memory_data():
    ds = load_dataset("shapes", 8, "test")  # items are tensors, not decoded pixels: the other kind of block
    batches = {}
    for workers in (0, 2):
        sampler = StepBatchSampler(len(ds), 16, seed=1, rank=0, world_size=1, total_steps=12)
        batches[workers] = [(x.clone(), y) for x, y in train_loader(ds, sampler, num_workers=workers,
                                                                      pin_memory=False, seed=1)]
    assert len(batches[0]) == len(batches[2]) == 12
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_a_block_comes_back_only_when_no_tensor_uses_its_storage():
    blocks = BatchBlocks(num_workers=1, per_worker=3)
    blocks.flags[:] = 1  # all three handed out by the worker
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8).share_memory_()  # as received from a worker
    blocks.received(images, 0)
    view = images[1:3]
    alias = torch.empty(0, dtype=torch.uint8).set_(images.untyped_storage())  # shares the storage, no ._base
    del images
    gc.collect()
    assert blocks.flags.tolist() == [1, 1, 1]
    del view
    gc.collect()
    assert blocks.flags.tolist() == [1, 1, 1]
    del alias
    gc.collect()
    assert blocks.flags.tolist() == [0, 1, 1]

    blocks.received(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), 2)  # a pinned copy: the block was read already
    assert blocks.flags.tolist() == [0, 1, 0]
    blocks.received(torch.zeros(4, 3, 2, 2, dtype=torch.uint8).share_memory_(), -1)  # a fresh block: nothing
    assert blocks.flags.tolist() == [0, 1, 0]


def test_blocks_travel_to_spawned_workers_with_their_flags_shared():
    blocks = BatchBlocks(num_workers=2, per_worker=4)
    blocks._mine = ["a worker's storages"]
    copy = pickle.loads(ForkingPickler.dumps(blocks))  # how a spawn or forkserver worker receives the dataset
    assert copy._mine is None and copy.per_worker == 4
    copy.flags[5] = 1
    assert blocks.flags[5] == 1  # the same shared memory
