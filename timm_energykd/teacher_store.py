"""Teacher replay's store: record the teacher's outputs once, train many students from them (issue 19).

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
from typing import Any, Dict, List, Optional, Sequence

import torch

from .files import save_checkpoint_atomic, write_atomic

__all__ = ['STORE_VERSION', 'HE_DA_STREAM', 'TeacherStore', 'estimate_bytes', 'row_bytes', 'compress_topk',
           'expand_topk', 'pack_logits', 'cat_packed', 'take_rows', 'format_size']

_logger = logging.getLogger(__name__)

STORE_VERSION = 1
HE_DA_STREAM = 3  # replay.sample_seed stream id of HE-DA's per-step generator (0-2 are replay's)
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


def pack_logits(logits: torch.Tensor, fmt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    logits = logits.detach().cpu()
    dt = _DTYPES[fmt['dtype']]
    if fmt.get('topk'):
        v, i, e = compress_topk(logits, int(fmt['topk']), float(fmt['energy_temperature']), dt)
        return {'values': v, 'classes': i, 'energy': e}
    return {'logits': logits.to(dt)}


def cat_packed(parts: List[Dict[str, torch.Tensor]], fmt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    keys = ('values', 'classes', 'energy') if fmt.get('topk') else ('logits',)
    if not parts:
        c = int(fmt['num_classes'])
        k = int(fmt.get('topk') or 0)
        empty = {'logits': torch.zeros(0, c, dtype=_DTYPES[fmt['dtype']]),
                 'values': torch.zeros(0, k, dtype=_DTYPES[fmt['dtype']]),
                 'classes': torch.zeros(0, k, dtype=torch.int16), 'energy': torch.zeros(0)}
        return {key: empty[key] for key in keys}
    return {key: torch.cat([p[key] for p in parts]) for key in keys}


def take_rows(packed: Dict[str, torch.Tensor], rows: torch.Tensor, fmt: Dict[str, Any]):
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

def format_size(n: float) -> str:
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
