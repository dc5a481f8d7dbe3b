"""Read a timm training output folder (args.yaml, checkpoints, summary.csv) and export the student from it."""
import csv
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .export import OPTIONAL_FILES, export_for_hub
from .record import RunRecord

__all__ = ['load_training_output', 'export_from_training_output', 'read_summary_metrics', 'record_for_output']

_logger = logging.getLogger(__name__)

_CHECKPOINT_NAMES = ('model_best.pth.tar', 'last.pth.tar')


def _find_thresholds(state: Any) -> Optional[Dict[str, Any]]:
    """Energy thresholds saved in a checkpoint's task_state (``thresholds`` dict or low/high at top)."""
    if not isinstance(state, dict):
        return None
    for cand in (state.get('thresholds'), state, *(v for v in state.values() if isinstance(v, dict))):
        if isinstance(cand, dict) and 'low' in cand and 'high' in cand:
            return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in cand.items()
                    if isinstance(v, (int, float, str, torch.Tensor)) and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
    return None


def _summary_rows(path: Path) -> List[Dict[str, str]]:
    if not Path(path).is_file():
        return []
    with Path(path).open(newline='') as f:
        return list(csv.DictReader(f))


def read_summary_metrics(path: Union[str, Path], epoch: Optional[int], ema: bool = False) -> Optional[Dict[str, Any]]:
    """top1 / top5 / loss of one epoch from a timm ``summary.csv`` (``None`` when absent).

    Args:
        path: the ``summary.csv`` file.
        epoch: the epoch (checkpoint's ``epoch``) whose row to read.
        ema: read the EMA model's columns (``eval_ema_top1``... as train_energykd.py writes them) instead
            of ``eval_top1``...
    """
    if epoch is None:
        return None
    row = next((r for r in _summary_rows(Path(path))
                if r.get('epoch') not in (None, '') and int(float(r['epoch'])) == int(epoch)), None)
    if row is None:
        return None
    prefix = 'eval_ema_' if ema else 'eval_'
    out = {}
    for key in ('top1', 'top5', 'loss'):
        try:
            out[key] = float(row[prefix + key])
        except (KeyError, TypeError, ValueError):
            pass
    if out:
        out['epoch'] = int(epoch)
    return out or None


def load_training_output(source: Union[str, Path], weights: str = 'auto'):
    """Read a timm output folder (or one checkpoint in it): the student state dict, run_info and metrics.

    Args:
        source: output folder holding ``args.yaml`` and ``model_best.pth.tar`` / ``last.pth.tar``, or a
            checkpoint file (its folder is searched for ``args.yaml`` and ``summary.csv``).
        weights: ``'auto'``: the weights the run evaluated in ``eval_top1`` and picked its best
            checkpoint by: the EMA when the checkpoint has one and summary.csv has no ``eval_ema_*``
            columns (timm's train.py), else the plain model (train_energykd.py logs the EMA separately
            as ``eval_ema_*``); or ``'model'`` / ``'ema'``.

    Returns:
        ``(state_dict, run_info, metrics, weights_used)``; metrics is None when summary.csv has no row for
        the checkpoint's epoch (or when plain weights are chosen while the run evaluated the EMA).
    """
    import yaml
    if weights not in ('auto', 'model', 'ema'):
        raise ValueError(f"--weights must be one of auto, model, ema (got {weights!r})")
    source = Path(source)
    if source.is_dir():
        ckpt_path = next((source / n for n in _CHECKPOINT_NAMES if (source / n).is_file()), None)
        if ckpt_path is None:
            raise FileNotFoundError(f'{source} holds neither {" nor ".join(_CHECKPOINT_NAMES)}')
        folder = source
    elif source.is_file():
        ckpt_path, folder = source, source.parent
    else:
        raise FileNotFoundError(f'checkpoint or output folder {source} does not exist')
    args_path = folder / 'args.yaml'
    if not args_path.is_file():
        raise FileNotFoundError(f'{args_path} not found: the export needs the run arguments (timm writes args.yaml)')
    run_info = yaml.safe_load(args_path.read_text()) or {}
    if not isinstance(run_info, dict):
        raise ValueError(f'{args_path} does not hold a mapping of arguments')

    # weights_only=True: tensors and plain containers only (plus the argparse.Namespace timm's checkpoint
    # saver stores as 'args'); no arbitrary objects are unpickled
    from ..files import load_checkpoint_file
    ckpt = load_checkpoint_file(ckpt_path, flag='export source')
    if not isinstance(ckpt, dict):
        raise ValueError(f'{ckpt_path} is not a timm checkpoint (expected a dict)')
    has_ema = isinstance(ckpt.get('state_dict_ema'), dict)
    if weights == 'ema' and not has_ema:
        raise ValueError(f'--weights ema: {ckpt_path} has no state_dict_ema')
    summary = folder / 'summary.csv'
    rows = _summary_rows(summary)
    # train_energykd.py logs the EMA's metrics in separate eval_ema_* columns and picks its best checkpoint
    # by the plain model; timm's train.py logs (and picks by) the EMA's metrics in eval_* when EMA is on.
    ema_columns = bool(rows) and any(k.startswith('eval_ema_') for k in rows[0])
    use_ema = weights == 'ema' or (weights == 'auto' and has_ema and not ema_columns)
    state_dict = ckpt['state_dict_ema'] if use_ema else ckpt.get('state_dict', ckpt)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'{ckpt_path} has no usable state_dict')
    state_dict = {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}

    task_state = ckpt.get('task_state')
    thresholds = _find_thresholds(task_state)
    if thresholds:  # the values the run actually used win over anything in args.yaml
        run_info['thresholds'] = thresholds
    he_thresholds = _find_thresholds(task_state.get('he_da_thresholds')) if isinstance(task_state, dict) else None
    if he_thresholds:
        run_info['he_da_thresholds'] = he_thresholds
    metrics = None
    if ema_columns:
        metrics = read_summary_metrics(summary, ckpt.get('epoch'), ema=use_ema)
    elif use_ema == has_ema:  # timm's train.py: eval_* are the EMA's metrics when EMA is on
        metrics = read_summary_metrics(summary, ckpt.get('epoch'))
    elif weights == 'model':
        _logger.warning('Exporting the non-EMA weights: summary.csv holds the EMA metrics, so none are recorded.')
    return state_dict, run_info, metrics, ('ema' if use_ema else 'model')


def export_from_training_output(
        source: Union[str, Path],
        export_dir: Union[str, Path],
        *,
        weights: str = 'auto',
        label_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
) -> Path:
    """Rebuild the student from a timm output folder / checkpoint and ``export_for_hub`` it."""
    import timm  # our architectures are registered by importing the timm_energykd package (done already)
    state_dict, run_info, metrics, used = load_training_output(source, weights)
    name = model_name or run_info.get('model')
    if not name:
        raise ValueError('no model name: args.yaml has no "model"; pass --model')
    # the architecture-shaping arguments timm's train.py passes to create_model (dropout etc. don't matter)
    kwargs = dict(run_info.get('model_kwargs') or {})
    if run_info.get('in_chans'):
        kwargs['in_chans'] = int(run_info['in_chans'])
    if run_info.get('gp'):
        kwargs['global_pool'] = run_info['gp']
    model = timm.create_model(name, pretrained=False, num_classes=run_info.get('num_classes') or 1000, **kwargs)
    if not run_info.get('num_classes'):
        # args.yaml without num_classes: size the head from the checkpoint's classifier
        clf = model.pretrained_cfg.get('classifier')
        w = state_dict.get(f'{clf}.weight') if isinstance(clf, str) else None
        if w is not None:
            model = timm.create_model(name, pretrained=False, num_classes=w.shape[0], **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f'checkpoint {source} does not match {name}: {first}') from None
    run_info.setdefault('model_ema', used == 'ema')
    run_info['exported_weights'] = used
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    record = record_for_output(run_info, metrics, folder)
    return export_for_hub(model, export_dir, run_info=run_info, record=record, label_names=label_names)


def record_for_output(run_info: Dict[str, Any], metrics: Optional[Dict[str, Any]], output_dir: Union[str, Path],
                      repo_id: Optional[str] = None) -> RunRecord:
    """``RunRecord`` of a run plus what its output folder holds for the card: ``training_curves.png``,
    ``energy_bins.png`` / ``energy_bins.csv`` (the per-energy-bin report, quoted as a table).

    The trainer's ``--export-hub`` and ``python -m timm_energykd.hub export`` both build the card this way.
    """
    from ..energy_report import read_energy_bin_csv
    folder = Path(output_dir)
    figures = {name: str(folder / name) for name in OPTIONAL_FILES if (folder / name).is_file()}
    rows = read_energy_bin_csv(folder / 'energy_bins.csv') if 'energy_bins.csv' in figures else None
    return RunRecord.from_run_info(run_info, metrics, energy_bins=rows, figures=figures, repo_id=repo_id)
