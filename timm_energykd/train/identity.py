"""The run's identity: every setting that changes the result, compared on ``--resume``.

A resumed run must continue the same experiment: the same student, data (including a content fingerprint),
teacher weights (sha256, not a path), loss, temperatures, thresholds and HE-DA. Settings that a timm user
changes on purpose when resuming (epochs, LR schedule, logging, output, workers) are not part of it.
The identity is stored in every checkpoint (``args.run_identity``); a mismatch is one line listing what differs.
"""
import hashlib
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from ..data import dataset_fingerprint
from .args import energykd_flag_dests

__all__ = ['run_identity', 'identity_differences', 'sha256_file']

# timm flags that shape what is learned from what (data, model, targets, KD weights)
_TIMM_KEYS = ('model', 'num_classes', 'dataset', 'train_split', 'seed', 'kd_temperature', 'distill_loss_weight',
              'task_loss_weight', 'smoothing', 'mixup', 'cutmix', 'bce_loss')
# our flags that do not change the result (output, Hub, demo) or are replaced by a content hash
_NOT_IDENTITY = {'demo', 'push_to_hub', 'hub_private', 'hub_revision', 'export_hub', 'calibration_cache',
                 'teacher_checkpoint', 'teacher_cache', 'teacher_cache_limit_gb'}


def sha256_file(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def run_identity(args, dataset_train) -> Dict[str, Any]:
    """What this run's result depends on, as plain JSON-able values."""
    out = OrderedDict((k, getattr(args, k, None)) for k in _TIMM_KEYS)
    out['data_dir'] = os.path.abspath(args.data_dir) if args.data_dir else None
    out['input_size'] = list(args._data_config['input_size'])
    out['data_fingerprint'] = dataset_fingerprint(dataset_train)
    for dest in energykd_flag_dests():
        if dest not in _NOT_IDENTITY:
            out[dest] = getattr(args, dest, None)
    out['teacher_checkpoint_sha256'] = sha256_file(args.teacher_checkpoint)
    if args.teacher is None:  # plain training: no distillation setting shapes the result
        for dest in energykd_flag_dests():
            if dest not in ('imbalance_factor', 'imbalance_seed'):
                out.pop(dest, None)
    return dict(out)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 24 else s[:21] + '...'


def identity_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``['energy_rate 0.2 -> 0.3', ...]`` for every key whose value differs (missing counts as None)."""
    keys = list(old) + [k for k in new if k not in old]
    return [f'{k} {_short(old.get(k))} -> {_short(new.get(k))}' for k in keys if old.get(k) != new.get(k)]
