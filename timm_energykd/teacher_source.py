"""Teacher outputs from a store: the task's teacher source in ``record`` or ``replay`` mode (issue 19).

``TeacherCacheSource`` is what ``EnergyDistillationTask.teacher_source`` calls: in ``record`` mode it runs the
live teacher and keeps its outputs for the store; in ``replay`` mode it reads them back by (epoch, sample
index) and the teacher is never built (``StoredTeacher`` stands in for it). Storage: ``teacher_store``.
"""
import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .replay import sample_seed, seed_loader_epoch
from .teacher_store import HE_DA_STREAM, TeacherStore, cat_packed, pack_logits, take_rows

__all__ = ['TeacherCacheSource', 'StoredTeacher', 'epoch_batches']

_logger = logging.getLogger(__name__)


def epoch_batches(loader, seed: int, epoch: int, rank: int = 0) -> List[List[int]]:
    """The sample indices of every batch the loader's next epoch yields, in order.

    Reads them from the loader's batch sampler after ``seed_loader_epoch`` (the shuffle is a function of
    (seed, epoch)), then seeds the loader again so the epoch itself draws the same order."""
    seed_loader_epoch(loader, seed, epoch, rank)
    dl = getattr(loader, 'loader', loader)
    batch_sampler = getattr(dl, 'batch_sampler', None)
    if batch_sampler is None:
        raise ValueError('--teacher-cache needs a loader with a batch sampler (map-style dataset, automatic batching)')
    batches = [list(map(int, b)) for b in batch_sampler]
    seed_loader_epoch(loader, seed, epoch, rank)
    return batches


# ------------------------------------------------------------------------------------------------------------
# the task's teacher source
# ------------------------------------------------------------------------------------------------------------

class StoredTeacher(nn.Module):
    """Stands in for the teacher in a replaying run: never called (the task asks its teacher source)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.pretrained_cfg = {}

    def forward(self, x, *a, **kw):
        raise RuntimeError('this run replays the teacher from --teacher-cache; the teacher is not built')


class TeacherCacheSource:
    """What ``EnergyDistillationTask`` asks for teacher outputs (``task.teacher_source``): records the live
    teacher's logits (``mode='record'``) or returns the stored ones (``mode='replay'``).

    ``source(task, input, kind)`` -> ``(logits, energy or None)``; ``kind`` is ``'main'`` (the batch) or
    ``'mix'`` (HE-DA's mixed images of this step). The trainer calls ``start_epoch`` / ``set_step`` /
    ``end_epoch``; ``set_step`` also seeds HE-DA's generators for the step.
    """

    def __init__(self, store: TeacherStore, mode: str, seed: int):
        if mode not in ('record', 'replay'):
            raise ValueError(f"mode='{mode}'; expected 'record' or 'replay'")
        self.store = store
        self.mode = mode
        self.seed = int(seed)
        self.task = None
        self._epoch: Optional[int] = None
        self._batches: List[List[int]] = []
        self._step = -1
        self._recording = False
        self._main: List[Dict[str, torch.Tensor]] = []
        self._main_idx: List[torch.Tensor] = []
        self._mix: List[Dict[str, torch.Tensor]] = []
        self._mix_step: List[int] = []
        self._shard: Optional[Dict[str, Any]] = None
        self._offsets: List[int] = []
        self._dtype = torch.float32

    @property
    def replay(self) -> bool:
        return self.mode == 'replay'

    def attach(self, task) -> None:
        self.task = task
        task.teacher_source = self

    # -- epochs and steps --
    def start_epoch(self, epoch: int, loader, rank: int = 0) -> None:
        self._epoch = int(epoch)
        self._batches = epoch_batches(loader, self.seed, epoch, rank)
        self._step = -1
        self._main, self._main_idx, self._mix, self._mix_step = [], [], [], []
        self._recording = self.mode == 'record' and not self.store.has_shard(epoch)
        if self.replay:
            self._shard = self.store.load_shard(epoch)
            # rows are in step order; each step's indices are checked against the sampler's batch on use
            self._offsets = np.concatenate([[0], np.cumsum([len(b) for b in self._batches])]).tolist()
            self._mix_rows = {}
            off = 0
            for s, n in zip(self._shard['mix_steps'].tolist(), self._shard['mix_counts'].tolist()):
                self._mix_rows[s] = (off, n)
                off += n

    def set_step(self, epoch: int, step: int) -> None:
        if self._epoch != epoch:
            raise RuntimeError(f'teacher cache: step of epoch {epoch} but start_epoch({self._epoch}) was called')
        self._step = int(step)
        he_da = getattr(self.task, 'he_da', None)
        if he_da is not None:
            s = sample_seed(self.seed, epoch, step * 65536 + self.store.rank, HE_DA_STREAM)
            he_da.generator = np.random.default_rng(s)
            he_da.torch_generator = torch.Generator().manual_seed(s)

    def end_epoch(self, epoch: int) -> None:
        if self._recording:
            fmt = self.store.fmt
            main = cat_packed(self._main, fmt)
            mix = cat_packed(self._mix, fmt)
            self.store.save_shard(epoch, {
                'indices': torch.cat(self._main_idx) if self._main_idx else torch.zeros(0, dtype=torch.int64),
                'main': main, 'mix': mix,
                'mix_steps': torch.tensor(self._mix_step, dtype=torch.int64),
                'mix_counts': torch.tensor(self._mix_counts(), dtype=torch.int64),
                'logits_dtype': str(self._dtype).replace('torch.', ''),
            })
        self._recording = False
        self._shard = None

    def _mix_counts(self) -> List[int]:
        key = 'values' if self.store.fmt.get('topk') else 'logits'
        return [int(p[key].shape[0]) for p in self._mix]

    def finish(self, num_epochs: int) -> None:
        """After the last epoch of a recording run: mark this rank's part complete."""
        if self.mode == 'record':
            self.store.mark_complete(list(range(num_epochs)))

    # -- the task's call --
    def __call__(self, task, input: torch.Tensor, kind: str):
        if self._step < 0:
            raise RuntimeError('teacher cache: the trainer did not call set_step before the task ran')
        if self.replay:
            return self._read(input, kind)
        logits = task.teacher_logits(input)
        if self._recording:
            self._dtype = logits.dtype
            if kind == 'main':
                self._main.append(pack_logits(logits, self.store.fmt))
                self._main_idx.append(torch.tensor(self._batches[self._step], dtype=torch.int64))
                if len(self._batches[self._step]) != logits.shape[0]:
                    raise RuntimeError(f'teacher cache: step {self._step} has {logits.shape[0]} samples, its sampler '
                                       f'batch {len(self._batches[self._step])}; the sample indices are unknown')
            else:
                self._mix.append(pack_logits(logits, self.store.fmt))
                self._mix_step.append(self._step)
        return logits, None  # the recording run trains on the live logits; the replay on the stored ones

    def _read(self, input: torch.Tensor, kind: str):
        fmt = self.store.fmt
        dtype = getattr(torch, self._shard.get('logits_dtype', 'float32'))
        if kind == 'main':
            off, end = self._offsets[self._step], self._offsets[self._step + 1]
            want = torch.tensor(self._batches[self._step], dtype=torch.int64)
            got = self._shard['indices'][off:end]
            if not torch.equal(got, want) or want.numel() != input.shape[0]:
                raise RuntimeError(f'teacher cache: epoch {self._epoch} step {self._step} loads other samples than '
                                   'the recording run did (sampler order or batch size differs)')
            rows = torch.arange(off, end)
            logits, energy = take_rows(self._shard['main'], rows, fmt)
        else:
            off, n = self._mix_rows.get(self._step, (0, -1))
            if n != input.shape[0]:
                raise RuntimeError(f'teacher cache: epoch {self._epoch} step {self._step} mixes {input.shape[0]} '
                                   f'HE-DA images, the store holds {max(n, 0)}: the run differs from the recording')
            logits, energy = take_rows(self._shard['mix'], torch.arange(off, off + n), fmt)
        dev = input.device
        return logits.to(device=dev, dtype=dtype), (energy.to(dev) if energy is not None else None)

    # -- calibration --
    def calibration(self, task, loader):
        """(teacher_fn, loader) for ``calibrate_or_load``: recording wraps the live teacher, replay yields the
        stored batches through an identity function (no image is loaded)."""
        if self.replay:
            shard = self.store.load_shard(None)
            fmt = self.store.fmt
            dtype = getattr(torch, shard.get('logits_dtype', 'float32'))
            batches, off = [], 0
            for n in shard['counts'].tolist():
                logits, energy = take_rows(shard['main'], torch.arange(off, off + n), fmt)
                batches.append((logits.to(dtype), energy))
                off += n
            return (lambda x: x), _CalibBatches(batches)
        self._calib: List[Dict[str, torch.Tensor]] = []
        self._calib_counts: List[int] = []
        self._calib_dtype = torch.float32

        def record(x):
            logits = task.teacher_logits(x)
            self._calib_dtype = logits.dtype
            self._calib.append(pack_logits(logits, self.store.fmt))
            self._calib_counts.append(int(logits.shape[0]))
            return logits
        return record, loader

    def finish_calibration(self, teacher_fn, loader) -> None:
        """Recording: write the calibration shard; when the thresholds came from a JSON cache (no teacher pass
        ran), run the pass once now so the store can recompute thresholds for other settings."""
        if self.replay or self.store.has_shard(None):
            return
        if not hasattr(self, '_calib'):  # called without calibration(): nothing recorded yet
            teacher_fn, loader = self.calibration(self.task, loader)
        if not self._calib:
            with torch.no_grad():
                for batch in loader:
                    teacher_fn(batch[0] if isinstance(batch, (tuple, list)) else batch)
        self.store.save_shard(None, {
            'main': cat_packed(self._calib, self.store.fmt),
            'counts': torch.tensor(self._calib_counts, dtype=torch.int64),
            'logits_dtype': str(self._calib_dtype).replace('torch.', '')})
        self._calib = []


class _CalibBatches:
    """The stored calibration batches as a loader of ``(logits, None)``."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for logits, _ in self.batches:
            yield logits, None
