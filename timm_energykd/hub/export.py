"""Export a student in timm's Hub layout with timm's ``save_for_hf``, atomically, safetensors only.

The folder holds ``model.safetensors`` and ``config.json`` (both written by ``timm.models.save_for_hf``),
the model card ``README.md`` and, when the run made them, the figures the card links
(``training_curves.png``, ``energy_bins.png``) and ``energy_bins.csv``. It is built in a temporary
sibling and renamed into place, so it is always absent, the previous complete export or the new one.
"""
import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

from ..files import apply_umask
from .card import build_model_card
from .record import RunRecord

__all__ = ['export_for_hub', 'find_pickles', 'WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'EXPORT_FILES',
           'OPTIONAL_FILES']

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
OPTIONAL_FILES = ('training_curves.png', 'energy_bins.png', 'energy_bins.csv')
# Anything that would be read with pickle: the export must never hold one (loading must not unpickle).
_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.tar', '.pkl', '.pickle', '.ckpt', '.npy', '.npz')
# pretrained_cfg fields describing the architecture's *source* weights (e.g. an ImageNet tag), not this
# student: dropped so the config does not claim a provenance the student lacks.
_SOURCE_CFG_KEYS = (
    'tag', 'license', 'origin_url', 'paper_ids', 'paper_name', 'notes', 'url', 'hf_hub_id',
    'hf_hub_filename', 'file', 'source', 'state_dict', 'test_input_size', 'test_crop_pct',
    'test_pool_size', 'label_offset', 'label_descriptions',
)
_DATA_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


def find_pickles(folder: Union[str, Path]) -> List[str]:
    """Files under ``folder`` that would be read with pickle (``.bin .pth .pt .tar ...``)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                  if p.is_file() and p.name.lower().endswith(_PICKLE_SUFFIXES))


def _resolve_data_config(model: nn.Module, run_info: Dict[str, Any], data_config: Optional[Dict[str, Any]]):
    from timm.data import resolve_data_config
    if data_config is not None:
        return resolve_data_config(args=dict(data_config), model=model)
    # the same call timm's train.py makes with vars(args): the preprocessing the student was trained with
    return resolve_data_config(args={k: run_info[k] for k in _DATA_KEYS if k in run_info}, model=model)


def _save_for_hf(model: nn.Module, folder: Path, label_names, data_cfg: Dict[str, Any]) -> None:
    """timm's ``save_for_hf`` (safetensors only); the shim for timm 1.0.29, which has no ``data_config``."""
    from timm.models import save_for_hf
    model_config = {'label_names': list(label_names)} if label_names else None
    if 'data_config' in inspect.signature(save_for_hf).parameters:  # timm >= 1.0.31
        save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=dict(data_cfg))
        return
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True)
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text(encoding='utf-8'))
    cfg = config.get('pretrained_cfg', {})
    if cfg.get('num_classes') != model.num_classes:
        cfg.pop('label_names', None)  # source labels (e.g. ImageNet) do not fit this head
    src_size = tuple(model.pretrained_cfg.get('input_size', ())[1:])
    for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'):
        if data_cfg.get(key) is not None:
            cfg[key] = list(data_cfg[key]) if isinstance(data_cfg[key], tuple) else data_cfg[key]
    if tuple(cfg.get('input_size', ())[1:]) != src_size:
        cfg['pool_size'] = None  # the architecture's default pool size belongs to another resolution
    cfg['num_classes'] = model.num_classes  # 1.0.29 leaves the source value (e.g. 1000) here
    cfg['custom_load'] = False
    config['num_classes'] = model.num_classes
    config['pretrained_cfg'] = cfg
    path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')


def _describe_student(folder: Path, license_: Optional[str]) -> Dict[str, Any]:
    """Drop the source weights' provenance from config.json's pretrained_cfg; returns the config."""
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text(encoding='utf-8'))
    cfg = {k: v for k, v in config.get('pretrained_cfg', {}).items() if k not in _SOURCE_CFG_KEYS}
    if license_:
        cfg['license'] = license_
    config['pretrained_cfg'] = {k: v for k, v in cfg.items() if v is not None or k == 'pool_size'}
    path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    return config


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f'export output_dir {output_dir} exists and is not a folder')
        entries = {p.name for p in output_dir.iterdir()}
        # replace only an earlier export (or an empty folder), never an unrelated folder
        if entries and not (CONFIG_NAME in entries and entries <= set(EXPORT_FILES + OPTIONAL_FILES)):
            raise FileExistsError(
                f'export output_dir {output_dir} exists and is not an earlier export (holds {sorted(entries)[:5]}); '
                'choose a new or empty folder')


def export_for_hub(
        model: nn.Module,
        output_dir: Union[str, Path],
        *,
        run_info: Optional[Dict[str, Any]] = None,
        record: Optional[RunRecord] = None,
        metrics: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json``, the model card and the record's figures to ``output_dir``.

    Args:
        model: the student (best or EMA weights); DDP / EMA / torch.compile wrappers are unwrapped. Its
            architecture must be in timm's registry (native or registered by timm_energykd).
        output_dir: the export folder; an existing one is replaced only when empty or an earlier export.
        run_info: flat dict of run settings (``vars(args)`` plus ``thresholds``); also the source of the
            preprocessing keys (``input_size``, ``mean``, ...) when ``data_config`` is not given.
        record: the run record for the card; default ``RunRecord.from_run_info(run_info, metrics)``.
        metrics: final metrics (``top1``/``top5``, optional ``epoch``) when the record is built here.
        label_names: one name per class (classifier order); length must equal ``num_classes``.
        data_config: preprocessing to record; default: resolved from ``run_info`` and the model exactly as
            timm's train.py does.
        repo_id: Hub repository named in the card's usage block (default: the record's).

    Returns:
        The export folder.
    """
    from timm.utils import unwrap_model
    if run_info is not None and not isinstance(run_info, dict):
        raise ValueError(f'export_for_hub: run_info must be a dict of run settings, got {type(run_info).__name__}')
    run_info = dict(run_info or {})
    record = record if record is not None else RunRecord.from_run_info(run_info, metrics, repo_id=repo_id)
    model = unwrap_model(model)
    if 'architecture' not in (getattr(model, 'pretrained_cfg', None) or {}):
        raise ValueError('export_for_hub: model has no pretrained_cfg["architecture"]; build it with timm.create_model')
    num_classes = int(model.num_classes)
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise ValueError(f'export_for_hub: label_names has {len(label_names)} entries, the model has {num_classes} classes')
    for name, src in record.figures.items():
        if name not in OPTIONAL_FILES or not Path(src).is_file():
            raise ValueError(f'export_for_hub: figure {name} -> {src}: expected one of {OPTIONAL_FILES}, an existing file')
    output_dir = Path(output_dir).expanduser().resolve()
    _check_output_dir(output_dir)
    data_cfg = _resolve_data_config(model, run_info, data_config)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.tmp-', dir=output_dir.parent))
    try:
        # safetensors refuses non-contiguous tensors (e.g. --channels-last weights) and wants host memory:
        # export a contiguous CPU copy, leaving the caller's (maybe still training) model untouched.
        export_model = copy.deepcopy(model)._apply(lambda t: t.detach().to('cpu').contiguous())
        _save_for_hf(export_model, tmp, label_names, data_cfg)
        config = _describe_student(tmp, record.license)
        for name, src in record.figures.items():
            shutil.copyfile(src, tmp / name)
        card = build_model_card(
            record, architecture=config['architecture'], num_classes=num_classes,
            pretrained_cfg=config['pretrained_cfg'], label_names=label_names, local_dir=str(output_dir),
            repo_id=repo_id)
        (tmp / CARD_NAME).write_text(card, encoding='utf-8')
        stray = find_pickles(tmp)
        if stray:  # a timm version that ignored safe_serialization would land here
            raise RuntimeError(f'export_for_hub: refusing to publish pickle files {stray}')
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700 folders, safetensors 0600 files: as any new file
            apply_umask(path)
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.old-', dir=output_dir.parent))
            os.replace(output_dir, old / 'x')
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info(f'Exported {config["architecture"]} for the Hub to {output_dir}')
    return output_dir
