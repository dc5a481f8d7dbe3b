"""Teacher replay: record the teacher's outputs once, train many students from them (issue 19).

A distillation run with ``--teacher-cache DIR`` records, as it trains, what the teacher produced:

* the logits of every training sample, per (epoch, sample index), one shard per epoch per rank;
* the logits of the HE-DA mixed images of every step (they depend on the teacher's energies);
* the calibration pass (the thresholds are recomputed from it, so ``r``, the rule or the gradation bins may
  change between runs).

A later run whose identity matches (``store_identity``: teacher weights sha256, data fingerprint, transform
settings, seed, epochs, batch size, world size, precision, HE-DA mixing settings) reads them back and never
builds the teacher. The image stream is a function of (seed, epoch, sample index) (``timm_energykd.replay``),
so step k of epoch e has known sample indices (``epoch_batches`` reads them from the seeded sampler without
disturbing it); HE-DA's random draws come from a generator seeded per (seed, epoch, step, rank) in both the
recording and the replaying run, so they do not depend on how much randomness the student consumed.

Storage: ``float32`` (exact: a student trained from the store is bit-identical to the recording run),
``float16`` (half the size; the logits are rounded, relative error <= 2**-11), or ``topk=K`` (the K largest
logits in the storage dtype + their class indices + the exact float32 energy ``-T_E * logsumexp(f / T_E)``;
the other classes get one shared value that keeps ``logsumexp(f / T_E)`` equal, so energies, thresholds,
temperatures and HE-DA selection stay exact and only the distillation target's tail is approximated).

Writes are atomic per shard (temp file + ``os.replace``); an interrupted recording keeps its finished epochs
and a rerun records only what is missing. The store is complete when every rank has written its
``complete.json`` marker. Layout::

    DIR/meta.json                      identity and storage format
    DIR/rank{r}/calibration.pt         the calibration pass, batch by batch
    DIR/rank{r}/epoch{e:05d}.pt        indices [M] int64, logits (or top-k) [M, ...], HE-DA rows per step
    DIR/rank{r}/complete.json          written when the recording run finished all its epochs
"""
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data as tud

from .files import save_checkpoint_atomic, write_atomic
from .replay import sample_seed, seed_loader_epoch

__all__ = ['STORE_VERSION', 'TeacherStore', 'TeacherCacheSource', 'StoredTeacher', 'epoch_batches',
           'estimate_bytes', 'row_bytes', 'compress_topk', 'expand_topk', 'store_identity', 'check_store_args',
           'setup_teacher_cache']

_logger = logging.getLogger(__name__)

STORE_VERSION = 1
_HE_DA_STREAM = 3  # replay.sample_seed stream id of HE-DA's per-step generator (0-2 are replay's)
_DTYPES = {'float32': torch.float32, 'float16': torch.float16}


# ------------------------------------------------------------------------------------------------------------
# storage format
# ------------------------------------------------------------------------------------------------------------

def row_bytes(num_classes: int, dtype: str = 'float32', topk: Optional[int] = None) -> int:
    """Bytes one stored sample costs: its logits (or top-k values + class indices + float32 energy) and
    its int64 sample index."""
    b = 2 if dtype == 'float16' else 4
    if topk:
        idx = 2 if num_classes <= 32767 else 4
        return int(topk) * (b + idx) + 4 + 8
    return int(num_classes) * b + 8


def estimate_bytes(num_samples: int, num_classes: int, epochs: int, batch_size: int, world_size: int = 1,
                   dtype: str = 'float32', topk: Optional[int] = None, he_da_rate: Optional[float] = None) -> int:
    """Store size: ``(epochs * rows_per_epoch + N + he_da_rows) * row_bytes``, with rows_per_epoch the
    samples the training loader yields (full batches: ``floor(ceil(N / W) / B) * B * W``), N the calibration
    pass and, with HE-DA, about ``he_da_rate`` of every training batch again (the threshold selection is
    data dependent; its expected share is the rate)."""
    per_rank = math.ceil(num_samples / max(world_size, 1)) if world_size > 1 else num_samples
    rows_epoch = (per_rank // batch_size) * batch_size * max(world_size, 1)
    rows = epochs * rows_epoch + num_samples
    if he_da_rate:
        rows += int(math.ceil(epochs * rows_epoch * float(he_da_rate)))
    return rows * row_bytes(num_classes, dtype, topk)


def compress_topk(logits: torch.Tensor, k: int, energy_temperature: float, dtype: torch.dtype):
    """(values [M, k] in ``dtype``, indices [M, k], energy [M] float32 exact) of float logits [M, C]."""
    f = logits.float()
    values, indices = torch.topk(f, k, dim=-1)
    energy = -energy_temperature * torch.logsumexp(f / energy_temperature, dim=-1)
    idx_dtype = torch.int16 if f.shape[-1] <= 32767 else torch.int32
    return values.to(dtype), indices.to(idx_dtype), energy


def expand_topk(values: torch.Tensor, indices: torch.Tensor, energy: torch.Tensor, num_classes: int,
                energy_temperature: float) -> torch.Tensor:
    """Dense logits [M, C] from top-k: the stored classes keep their values, every other class gets the
    value ``c`` for which ``logsumexp(f / T_E)`` equals the stored one (``(C - k) exp(c / T_E)`` is the tail's
    mass), clamped to at most the smallest kept logit. Computed in float64, returned float32."""
    t = float(energy_temperature)
    v = values.double()
    k = v.shape[-1]
    lse = (-energy.double() / t)  # logsumexp(f / T_E)
    head = torch.logsumexp(v / t, dim=-1)
    # tail mass: exp(lse) - exp(head) = exp(lse) * (1 - exp(head - lse))
    frac = (-torch.expm1(head - lse)).clamp(min=1e-300)
    c = t * (lse + torch.log(frac) - math.log(max(num_classes - k, 1)))
    c = torch.minimum(c, v.min(dim=-1).values)
    out = c.unsqueeze(-1).expand(v.shape[0], num_classes).clone()
    out.scatter_(-1, indices.long(), v)
    return out.float()


def _pack(logits: torch.Tensor, fmt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    logits = logits.detach().cpu()
    dt = _DTYPES[fmt['dtype']]
    if fmt.get('topk'):
        v, i, e = compress_topk(logits, int(fmt['topk']), float(fmt['energy_temperature']), dt)
        return {'values': v, 'classes': i, 'energy': e}
    return {'logits': logits.to(dt)}


def _cat_packed(parts: List[Dict[str, torch.Tensor]], fmt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    keys = ('values', 'classes', 'energy') if fmt.get('topk') else ('logits',)
    if not parts:
        c = int(fmt['num_classes'])
        k = int(fmt.get('topk') or 0)
        empty = {'logits': torch.zeros(0, c, dtype=_DTYPES[fmt['dtype']]),
                 'values': torch.zeros(0, k, dtype=_DTYPES[fmt['dtype']]),
                 'classes': torch.zeros(0, k, dtype=torch.int16), 'energy': torch.zeros(0)}
        return {key: empty[key] for key in keys}
    return {key: torch.cat([p[key] for p in parts]) for key in keys}


def _rows(packed: Dict[str, torch.Tensor], rows: torch.Tensor, fmt: Dict[str, Any]):
    """(logits float32 [M, C], energy [M] float32 or None) of the given rows."""
    if fmt.get('topk'):
        e = packed['energy'].index_select(0, rows)
        logits = expand_topk(packed['values'].index_select(0, rows), packed['classes'].index_select(0, rows), e,
                             int(fmt['num_classes']), float(fmt['energy_temperature']))
        return logits, e
    return packed['logits'].index_select(0, rows).float(), None


# ------------------------------------------------------------------------------------------------------------
# the store on disk
# ------------------------------------------------------------------------------------------------------------

def _size(n: float) -> str:
    return f'{n / 1e9:.2f} GB' if n >= 1e8 else f'{n / 1e6:.3f} MB'


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + '...'


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = list(old) + [k for k in new if k not in old]
    return [f'{k} {_short(old.get(k))} -> {_short(new.get(k))}' for k in keys if old.get(k) != new.get(k)]


class TeacherStore:
    """One store folder: ``meta.json`` (identity + format) and per-rank shards (see the module docstring)."""

    def __init__(self, root: str, identity: Dict[str, Any], fmt: Dict[str, Any], rank: int = 0,
                 world_size: int = 1):
        self.root = os.path.abspath(root)
        self.identity = json.loads(json.dumps(identity, default=str))  # plain JSON values, compared as stored
        self.fmt = dict(fmt)
        self.rank = int(rank)
        self.world_size = int(world_size)

    # -- paths --
    def rank_dir(self, rank: Optional[int] = None) -> str:
        return os.path.join(self.root, f'rank{self.rank if rank is None else rank}')

    def shard_path(self, epoch: Optional[int], rank: Optional[int] = None) -> str:
        name = 'calibration.pt' if epoch is None else f'epoch{int(epoch):05d}.pt'
        return os.path.join(self.rank_dir(rank), name)

    def has_shard(self, epoch: Optional[int]) -> bool:
        return os.path.isfile(self.shard_path(epoch))

    @property
    def meta_path(self) -> str:
        return os.path.join(self.root, 'meta.json')

    # -- identity --
    def check_meta(self) -> bool:
        """True when ``meta.json`` exists and matches; raises ``ValueError`` (one line) when it differs."""
        if not os.path.isfile(self.meta_path):
            return False
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'--teacher-cache {self.root}: meta.json is unreadable ({e}); '
                             'delete the folder to record again') from None
        if meta.get('version') != STORE_VERSION:
            raise ValueError(f'--teacher-cache {self.root}: store version {meta.get("version")}, this library reads '
                             f'{STORE_VERSION}; record a new store')
        diff = _differences(meta.get('format', {}), self.fmt) + _differences(meta.get('identity', {}), self.identity)
        if diff:
            raise ValueError(f'--teacher-cache {self.root} was recorded for another run: ' + '; '.join(diff)
                             + ' (use another folder, or the settings it was recorded with)')
        return True

    def write_meta(self) -> None:
        if self.rank == 0:
            write_atomic(self.meta_path, json.dumps(
                {'version': STORE_VERSION, 'format': self.fmt, 'identity': self.identity}, indent=1) + '\n')

    def is_complete(self) -> bool:
        """Every rank finished recording (its ``complete.json``) and meta.json matches."""
        if not self.check_meta():
            return False
        return all(os.path.isfile(os.path.join(self.rank_dir(r), 'complete.json')) for r in range(self.world_size))

    def mark_complete(self, epochs: Sequence[int]) -> None:
        missing = [e for e in epochs if not self.has_shard(e)]
        if missing or not self.has_shard(None):
            _logger.warning(f'teacher cache {self.root}: not complete (missing epochs {missing[:5]}'
                            f'{"..." if len(missing) > 5 else ""}, calibration: {self.has_shard(None)})')
            return
        write_atomic(os.path.join(self.rank_dir(), 'complete.json'), json.dumps({'epochs': list(epochs)}) + '\n')

    # -- shards --
    def save_shard(self, epoch: Optional[int], shard: Dict[str, Any]) -> None:
        os.makedirs(self.rank_dir(), exist_ok=True)
        save_checkpoint_atomic(shard, self.shard_path(epoch))

    def load_shard(self, epoch: Optional[int]) -> Dict[str, Any]:
        path = self.shard_path(epoch)
        if not os.path.isfile(path):
            what = 'the calibration pass' if epoch is None else f'epoch {epoch}'
            raise ValueError(f'--teacher-cache {self.root}: {path} ({what}) is missing; record the store again')
        return torch.load(path, map_location='cpu', weights_only=True)


# ------------------------------------------------------------------------------------------------------------
# sample indices of each step
# ------------------------------------------------------------------------------------------------------------

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
            s = sample_seed(self.seed, epoch, step * 65536 + self.store.rank, _HE_DA_STREAM)
            he_da.generator = np.random.default_rng(s)
            he_da.torch_generator = torch.Generator().manual_seed(s)

    def end_epoch(self, epoch: int) -> None:
        if self._recording:
            fmt = self.store.fmt
            main = _cat_packed(self._main, fmt)
            mix = _cat_packed(self._mix, fmt)
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
                self._main.append(_pack(logits, self.store.fmt))
                self._main_idx.append(torch.tensor(self._batches[self._step], dtype=torch.int64))
                if len(self._batches[self._step]) != logits.shape[0]:
                    raise RuntimeError(f'teacher cache: step {self._step} has {logits.shape[0]} samples, its sampler '
                                       f'batch {len(self._batches[self._step])}; the sample indices are unknown')
            else:
                self._mix.append(_pack(logits, self.store.fmt))
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
            logits, energy = _rows(self._shard['main'], rows, fmt)
        else:
            off, n = self._mix_rows.get(self._step, (0, -1))
            if n != input.shape[0]:
                raise RuntimeError(f'teacher cache: epoch {self._epoch} step {self._step} mixes {input.shape[0]} '
                                   f'HE-DA images, the store holds {max(n, 0)}: the run differs from the recording')
            logits, energy = _rows(self._shard['mix'], torch.arange(off, off + n), fmt)
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
                logits, energy = _rows(shard['main'], torch.arange(off, off + n), fmt)
                batches.append((logits.to(dtype), energy))
                off += n
            return (lambda x: x), _CalibBatches(batches)
        self._calib: List[Dict[str, torch.Tensor]] = []
        self._calib_counts: List[int] = []
        self._calib_dtype = torch.float32

        def record(x):
            logits = task.teacher_logits(x)
            self._calib_dtype = logits.dtype
            self._calib.append(_pack(logits, self.store.fmt))
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
            'main': _cat_packed(self._calib, self.store.fmt),
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


# ------------------------------------------------------------------------------------------------------------
# trainer glue
# ------------------------------------------------------------------------------------------------------------

# flags that shape the image stream (with the student's data config) or the teacher's outputs
_STREAM_KEYS = (
    'dataset', 'train_split', 'seed', 'epochs', 'cooldown_epochs', 'batch_size', 'no_aug', 'scale', 'ratio',
    'hflip', 'vflip', 'color_jitter', 'color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob', 'aa',
    'reprob', 'remode', 'recount', 'resplit', 'train_crop_mode', 'train_interpolation', 'aug_repeats',
    'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch',
    'smoothing', 'imbalance_factor', 'imbalance_seed', 'amp', 'amp_dtype', 'model_dtype', 'channels_last',
    'teacher', 'teacher_prune_amount', 'teacher_blend_weight', 'teacher_cache_dtype', 'teacher_cache_topk',
)
# HE-DA's selection depends on the energies and the thresholds, so these shape the mixed images
_HE_DA_KEYS = ('he_da', 'he_da_rate', 'he_da_alpha', 'he_da_selection', 'energy_rate', 'energy_temperature',
               'calibration', 'running_momentum', 'energykd_rules')


def store_identity(args, dataset_train) -> Dict[str, Any]:
    """What the stored teacher outputs depend on: the image stream and the teacher, nothing student-side
    (student model, loss, r, temperatures, direction, policy, weights, optimizer) unless HE-DA makes the
    mixed images depend on it (then the threshold settings are part of it)."""
    from .train.identity import sha256_file
    dc = args._data_config
    out = OrderedDict((k, getattr(args, k, None)) for k in _STREAM_KEYS)
    out['teacher_checkpoint_sha256'] = sha256_file(args.teacher_checkpoint)
    out['teacher_pretrained'] = bool(args.teacher_pretrained)
    out['data_fingerprint'] = args.run_identity['data_fingerprint']
    out['num_samples'] = len(dataset_train)
    out['num_classes'] = args.num_classes
    out['world_size'] = args.world_size
    out['data_config'] = {k: dc.get(k) for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')}
    if args.he_da != 'off':
        out.update((k, getattr(args, k, None)) for k in _HE_DA_KEYS)
        if args.temp_policy == 'gradation':
            out['gradation_bins'] = args.gradation_bins
    if args.teacher_cache_topk:
        out['energy_temperature'] = args.energy_temperature  # the stored energies are at this T_E
    return dict(out)


def check_store_args(args) -> None:
    """One line for settings a store cannot serve."""
    if args.teacher_cache is None:
        for flag, dest, default in (('--teacher-cache-dtype', 'teacher_cache_dtype', 'float32'),
                                    ('--teacher-cache-topk', 'teacher_cache_topk', None),
                                    ('--teacher-cache-limit-gb', 'teacher_cache_limit_gb', None)):
            if getattr(args, dest) != default:
                raise ValueError(f'{flag} needs --teacher-cache DIR')
        return
    if args.teacher is None:
        raise ValueError('--teacher-cache needs --teacher (it stores the teacher\'s outputs)')
    if args.use_multi_epochs_loader:
        raise ValueError('--teacher-cache: --use-multi-epochs-loader prefetches across epochs, so the image stream '
                         'is not a function of (seed, epoch); drop it')
    if args.teacher_cache_topk is not None:
        k = int(args.teacher_cache_topk)
        if not (1 <= k < (args.num_classes or k + 1)):
            raise ValueError(f'--teacher-cache-topk {k}: expected 1 <= K < the class count ({args.num_classes})')
    if args.teacher_cache_limit_gb is not None and args.teacher_cache_limit_gb <= 0:
        raise ValueError(f'--teacher-cache-limit-gb {args.teacher_cache_limit_gb}: expected a positive size in GB')


def setup_teacher_cache(args, dataset_train) -> Optional[TeacherCacheSource]:
    """``--teacher-cache DIR``: None without it; else a source in ``replay`` mode when the store is complete and
    its identity matches, ``record`` mode when it is absent or incomplete. A store recorded for another run
    is refused with one line naming the difference; a new store's estimated size is logged and refused when
    it exceeds ``--teacher-cache-limit-gb`` or the free disk space."""
    check_store_args(args)
    if args.teacher_cache is None:
        return None
    if isinstance(getattr(dataset_train, 'dataset', dataset_train), tud.IterableDataset) \
            or isinstance(dataset_train, tud.IterableDataset):
        raise ValueError('--teacher-cache needs a map-style dataset (sample indices); streaming datasets have none')
    from .teacher import resolve_teacher_pretrained
    args.teacher_pretrained = resolve_teacher_pretrained(args.teacher, args.teacher_pretrained, args.teacher_checkpoint)
    fmt = {'dtype': args.teacher_cache_dtype, 'topk': args.teacher_cache_topk, 'num_classes': int(args.num_classes),
           'energy_temperature': float(args.energy_temperature) if args.teacher_cache_topk else None}
    store = TeacherStore(args.teacher_cache, store_identity(args, dataset_train), fmt, args.rank, args.world_size)
    if store.is_complete():
        if args.rank == 0:
            _logger.info(f'Teacher replay from {store.root}: the teacher is not built')
        return TeacherCacheSource(store, 'replay', args.seed)
    he_rate = args.he_da_rate if args.he_da != 'off' else None
    need = estimate_bytes(len(dataset_train), args.num_classes, args.epochs + (args.cooldown_epochs or 0),
                          args.batch_size, args.world_size, args.teacher_cache_dtype, args.teacher_cache_topk, he_rate)
    os.makedirs(store.root, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    if args.rank == 0:
        _logger.info(f'Recording teacher outputs to {store.root}: about {_size(need)} '
                     f'({args.teacher_cache_dtype}{f", top-{args.teacher_cache_topk}" if args.teacher_cache_topk else ""}), '
                     f'{_size(free)} free')
    if args.teacher_cache_limit_gb is not None and need > args.teacher_cache_limit_gb * 1e9:
        raise ValueError(f'--teacher-cache {store.root}: the store needs about {_size(need)}, above '
                         f'--teacher-cache-limit-gb {args.teacher_cache_limit_gb}; use float16 or --teacher-cache-topk')
    if need > free:
        raise ValueError(f'--teacher-cache {store.root}: the store needs about {_size(need)}, the disk has '
                         f'{_size(free)} free')
    store.write_meta()
    return TeacherCacheSource(store, 'record', args.seed)
