"""Deterministic data stream: augmentation per (seed, epoch, sample index), shuffle order per (seed, epoch).

timm seeds each DataLoader worker once (``base_seed + worker_id``), so which random crop a sample gets depends
on which worker loads it, on the number of workers, on the number of processes, and, with persistent
workers, on every earlier epoch (a resumed run's workers start from a fresh seed). Here:

* ``EpochSeededDataset(dataset, seed)`` seeds Python ``random``, numpy's global RNG and torch's CPU generator
  from ``(seed, epoch, index)`` right before ``dataset[index]`` runs its transform. ``index`` is the index into
  the wrapped dataset, so a sample is augmented the same way whichever worker or rank loads it. In the main
  process (``--workers 0``) the previous RNG states are restored afterwards, so data loading never changes the
  training randomness (dropout, mixup, HE-DA draws); worker processes own their RNGs and skip the restore.
  CUDA generators are never touched (only torch's CPU default generator is seeded).
* The epoch lives in a one-element int64 tensor in shared memory: ``set_epoch`` in the main process is seen by
  every worker, persistent ones included (they hold a copy of the dataset object but the same memory), as long
  as it is called before the epoch's iterator is created (``for batch in loader``).
* ``seed_loader_epoch(loader, seed, epoch)`` does that and also makes the shuffle order a function of
  ``(seed, epoch)`` only: it gives timm's ``RandomSampler`` a fresh generator seeded from ``(seed, epoch)``, sets
  ``DistributedSampler`` (``seed``, ``set_epoch``), and sets the DataLoader's own ``generator`` so that creating
  the iterator draws nothing from torch's global RNG (a first ``iter()`` draws the workers' base seed from it,
  a persistent worker's later ``iter()`` does not: a resumed run would otherwise continue with another global
  RNG stream than the uninterrupted run).

Not covered: ``--use-multi-epochs-loader`` (timm's ``MultiEpochsDataLoader`` keeps one iterator for the whole
run, so workers prefetch the next epoch before ``set_epoch`` can run; see ``loader_is_exact``) and streaming
(iterable) datasets, which have no sample index.

Usage (what the trainer does)::

    dataset_train = EpochSeededDataset(dataset_train, seed=args.seed)
    loader = create_loader(dataset_train, ...)
    for epoch in range(start_epoch, num_epochs):
        seed_loader_epoch(loader, args.seed, epoch)   # before iterating
        for x, y in loader: ...
"""
import random
from typing import Optional

import numpy as np
import torch
import torch.utils.data as tud

__all__ = ['sample_seed', 'EpochSeededDataset', 'seed_loader_epoch', 'loader_is_exact', 'find_epoch_seeded',
           'CALIBRATION_EPOCH']

_MASK64 = (1 << 64) - 1

# epoch value for the calibration pass (its own stream, distinct from every training epoch)
CALIBRATION_EPOCH = -1

# stream ids, so the per-sample, sampler and loader seeds of one (seed, epoch) never coincide
_SAMPLE, _SAMPLER, _LOADER = 0, 1, 2


def _entropy(seed: int, epoch: int, index: int, stream: int):
    # SeedSequence wants non-negative integers; epoch -1 (calibration) maps to 0, training epochs to 1, 2, ...
    return [int(seed) & _MASK64, stream, int(epoch) + 1, int(index) & _MASK64]


def sample_seed(seed: int, epoch: int, index: int, stream: int = _SAMPLE) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, index)`` (numpy ``SeedSequence`` hashing: nearby
    inputs give unrelated seeds)."""
    state = np.random.SeedSequence(_entropy(seed, epoch, index, stream)).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


class EpochSeededDataset(tud.Dataset):
    """Map-style dataset wrapper whose ``__getitem__(i)`` runs with every CPU RNG seeded from
    ``(seed, epoch, i)``; see the module docstring. ``transform`` is forwarded (timm's ``create_loader`` sets
    it); other attributes (``reader``, ``targets``, ``classes``...) are read from the wrapped dataset."""

    def __init__(self, dataset: tud.Dataset, seed: int = 0, epoch: int = 0):
        if isinstance(dataset, tud.IterableDataset):
            raise ValueError('EpochSeededDataset needs a map-style dataset (indexable), not a streaming one')
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.full((1,), int(epoch), dtype=torch.int64).share_memory_()

    # -- epoch (shared with worker processes) --
    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    # -- forwarding --
    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, t):
        self.dataset.transform = t

    def __getattr__(self, name):
        # only called for names not found normally; never for the wrapper's own fields (unpickling, copy)
        if name.startswith('__') or name in ('dataset', 'seed', '_epoch'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        s = sample_seed(self.seed, int(self._epoch[0]), int(index))
        in_worker = tud.get_worker_info() is not None
        if not in_worker:
            saved = (random.getstate(), np.random.get_state(), torch.random.default_generator.get_state())
        try:
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.random.default_generator.manual_seed(s)  # CPU only: CUDA generators are left alone
            return self.dataset[index]
        finally:
            if not in_worker:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.random.default_generator.set_state(saved[2])


def find_epoch_seeded(dataset) -> Optional[EpochSeededDataset]:
    """The ``EpochSeededDataset`` in a chain of wrappers (``TransformSubset``, ``Subset``), or None."""
    for _ in range(8):
        if isinstance(dataset, EpochSeededDataset):
            return dataset
        inner = dataset.__dict__.get('dataset') if hasattr(dataset, '__dict__') else None
        if inner is None:
            return None
        dataset = inner
    return None


def loader_is_exact(loader) -> bool:
    """False for timm's ``MultiEpochsDataLoader`` (``--use-multi-epochs-loader``): it keeps one iterator for
    the whole run, so its workers prefetch the first batches of the next epoch before ``set_epoch`` runs, and
    how many they prefetch depends on timing. Its stream is then not a function of (seed, epoch)."""
    dl = getattr(loader, 'loader', loader)
    return type(dl).__name__ != 'MultiEpochsDataLoader'


def seed_loader_epoch(loader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make ``loader``'s next epoch a function of ``(seed, epoch)`` (and ``rank`` for the workers' base seed):
    the dataset's epoch (``EpochSeededDataset``), the shuffle order and the DataLoader's generator. Call it
    before ``iter(loader)`` / ``for batch in loader``. Accepts timm's ``PrefetchLoader`` (``.loader``)."""
    dl = getattr(loader, 'loader', loader)  # timm PrefetchLoader wraps the DataLoader
    ds = find_epoch_seeded(getattr(dl, 'dataset', None))
    if ds is not None:
        ds.set_epoch(epoch)
    sampler = getattr(dl, 'sampler', None)
    if isinstance(sampler, tud.RandomSampler):
        sampler.generator = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, _SAMPLER))
    elif isinstance(sampler, tud.distributed.DistributedSampler):
        sampler.seed = int(seed)  # timm builds it with seed 0: the order would ignore --seed
        sampler.set_epoch(epoch)
    elif hasattr(sampler, 'set_epoch'):  # e.g. timm's RepeatAugSampler, OrderedDistributedSampler
        sampler.set_epoch(epoch)
    if isinstance(dl, tud.DataLoader):
        # the workers' base seed comes from this generator, not from torch's global RNG
        dl.generator = torch.Generator().manual_seed(sample_seed(seed, epoch, rank, _LOADER))
