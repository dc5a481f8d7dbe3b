"""``--teacher-cache DIR``: the trainer's side of teacher replay (identity from the flags, size checks)."""
import logging
import os
import shutil
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch.utils.data as tud

from ..teacher import resolve_teacher_pretrained
from ..teacher_source import TeacherCacheSource
from ..teacher_store import TeacherStore, estimate_bytes, format_size

__all__ = ['store_identity', 'check_store_args', 'setup_teacher_cache']

_logger = logging.getLogger('train')


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
    dc = args._data_config
    out = OrderedDict((k, getattr(args, k, None)) for k in _STREAM_KEYS)
    out['teacher_checkpoint_sha256'] = args.run_identity['teacher_checkpoint_sha256']  # hashed once a run
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
        _logger.info(f'Recording teacher outputs to {store.root}: about {format_size(need)} '
                     f'({args.teacher_cache_dtype}{f", top-{args.teacher_cache_topk}" if args.teacher_cache_topk else ""}), '
                     f'{format_size(free)} free')
    if args.teacher_cache_limit_gb is not None and need > args.teacher_cache_limit_gb * 1e9:
        raise ValueError(f'--teacher-cache {store.root}: the store needs about {format_size(need)}, above '
                         f'--teacher-cache-limit-gb {args.teacher_cache_limit_gb}; use float16 or --teacher-cache-topk')
    if need > free:
        raise ValueError(f'--teacher-cache {store.root}: the store needs about {format_size(need)}, the disk has '
                         f'{format_size(free)} free')
    store.write_meta()
    return TeacherCacheSource(store, 'record', args.seed)
