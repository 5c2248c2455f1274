"""Batches: which samples each micro-batch holds, and the padded tensors it is made of.

- `BatchPlan` decides which samples each micro-batch holds, as a pure function of (seed, epoch,
  step), the same on every rank: the epoch's permutation is cut into global batches of
  ``batch_size * grad_accum * world`` samples (the last one filled up from the start of the
  permutation), each global batch sorted by length (less padding) and dealt out, micro-batch
  m of rank r taking slice ``m * world + r``. This is the distributed sampler, reshuffled per
  epoch; a resumed run continues at any step with no other state.
- `make_batch` pads to the longest sample of the micro-batch (right padding) and fetches the
  features of its rows (`trainer.features`): every video of every sample, in sample order, with
  how many each sample has, so a conversation about several videos is one more row or two.
- `BatchStream` yields them: DataLoader worker processes for ``disk`` features, the main process
  for cached ones. Workers use the ``forkserver`` (or ``spawn``) start method, never ``fork``:
  zarr 3 runs an event-loop thread that a forked child would inherit in a broken state.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from model.loss import IGNORE, n_targets
from trainer.errors import TrainerError
from trainer.examples import Example
from trainer.features import DiskFeatures, Features


@dataclass
class Batch:
    """A right-padded micro-batch."""

    input_ids: Tensor  # (B, L) long
    labels: Tensor  # (B, L) long, IGNORE on padding and prompts
    attention_mask: Tensor  # (B, L) bool, False on padding
    video: Tensor  # (V, F, T, D) float16, the videos of sample 0, then of sample 1, ...
    rows: Tensor  # (V,) store rows
    video_counts: Tensor  # (B,) long, videos per sample (V = their sum)

    def __reduce__(self) -> tuple:
        """Pickled by value, as numpy arrays: a DataLoader worker hands the batch to the training
        process as one message on its queue. torch's default would put each of the six tensors
        in a shared-memory file whose descriptor the receiver fetches over its own connection to
        the worker: 3 ms a batch in the training process (8% of a B=4 step on the 2-core box),
        against 0.6 ms for the copy."""
        return (_batch_of_arrays, tuple(t.numpy() for t in self._tensors()))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.input_ids, self.labels, self.attention_mask, self.video, self.rows, self.video_counts)

    @property
    def n_target_tokens(self) -> int:
        """Positions that contribute to the next-token loss."""
        return int(n_targets(self.labels))


def _batch_of_arrays(*arrays: np.ndarray) -> Batch:
    return Batch(*(torch.from_numpy(a) for a in arrays))


def make_batch(examples: Sequence[Example], features: Features | None, pad_id: int) -> Batch:
    """Right-padded ids and labels; ``features`` None gives an empty (B, 0) video (text only)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids)
        labels[i, :n] = torch.from_numpy(e.labels)
        mask[i, :n] = True
    rows = [row for e in examples for row in e.rows]
    video = features.fetch(rows) if features is not None else torch.empty(len(rows), 0, dtype=torch.float16)
    counts = torch.tensor([len(e.rows) for e in examples], dtype=torch.long)
    return Batch(ids, labels, mask, video, torch.tensor(rows, dtype=torch.long), counts)


class BatchDataset(Dataset):
    """``dataset[list of example indices]`` -> one collated `Batch` (built in the worker)."""

    def __init__(self, examples: Sequence[Example], features: Features, pad_id: int) -> None:
        self.examples = list(examples)
        self.features = features
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        return make_batch([self.examples[i] for i in indices], self.features, self.pad_id)


# --- the batch plan (distributed sampler) --------------------------------------------------------


class BatchPlan(Sampler[list[int]]):
    """Which examples each micro-batch of this rank holds; see the module docstring.

    Iterating yields this rank's micro-batches (lists of example indices) from the position set
    by `set_position` to the end of that epoch, ``grad_accum`` per optimizer step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        grad_accum: int = 1,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not lengths:
            raise TrainerError("no training samples: every sample was skipped (see the log)")
        self.lengths = list(lengths)
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.lengths) // self.global_batch))

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def step_batches(self, epoch: int, step: int, order: np.ndarray | None = None) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step`` of ``epoch``."""
        order = self._order(epoch) if order is None else order
        G, B = self.global_batch, self.batch_size
        picked = [int(order[(step * G + k) % len(order)]) for k in range(G)]
        picked.sort(key=lambda i: (self.lengths[i], i))
        return [picked[(m * self.world + self.rank) * B : (m * self.world + self.rank + 1) * B] for m in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            yield from self.step_batches(self.epoch, step, order)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum


def worker_context() -> multiprocessing.context.BaseContext:
    """Never ``fork`` (zarr's event-loop thread); ``forkserver`` where it exists, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class BatchStream:
    """Yields this rank's micro-batches of one epoch from a step on: through a DataLoader with
    worker processes for ``disk`` features, in the main process for cached ones."""

    def __init__(
        self,
        dataset: BatchDataset,
        plan: BatchPlan,
        workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.plan = dataset, plan
        self.loader: DataLoader | None = None
        if isinstance(dataset.features, DiskFeatures) and workers > 0:
            self.loader = DataLoader(
                dataset,
                batch_size=None,
                sampler=plan,
                num_workers=workers,
                multiprocessing_context=worker_context(),
                persistent_workers=True,
                prefetch_factor=4,
                pin_memory=pin_memory,
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.plan.set_position(epoch, start_step)
        if self.loader is not None:
            yield from self.loader
        else:
            for indices in self.plan:
                yield self.dataset[indices]
