"""Export a distilled student in timm's Hugging Face Hub layout, write its model card, push it.

The export folder holds exactly three files, the layout ``timm.create_model('hf-hub:...')`` and
``timm.create_model('local-dir:...')`` read:

* ``model.safetensors``: the student's state dict (safetensors only, never a pickle),
* ``config.json``: written by ``timm.models.save_for_hf`` (architecture, num_classes, label names,
  model_args), with the ``pretrained_cfg`` rewritten to describe *this* student (input size, mean/std,
  interpolation and crop the run used; ImageNet-weight leftovers such as ``tag``/``license`` dropped),
* ``README.md``: a model card recording how the student was made (teacher, loss, energy settings,
  HE-DA, data, schedule, thresholds) and the top-1/top-5 passed in, nothing else.

Command line::

    python -m timm_energykd.hub export OUTPUT_DIR_OR_CHECKPOINT EXPORT_DIR [--weights auto|model|ema]
    python -m timm_energykd.hub push EXPORT_DIR REPO_ID [--private] [--revision R] [--token-env VAR]

See docs/HUB.md for the model-card keys and the trainer flags that call this module.
"""
import argparse
import copy
import csv
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'HubPushError', 'export_for_hub', 'push_to_hub', 'build_model_card', 'load_training_output',
    'export_from_training_output', 'read_summary_metrics', 'CARD_KEYS',
]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
_EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
# Anything that would be read with pickle: the export must never hold one (loading must not unpickle).
_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.tar', '.pkl', '.pickle', '.ckpt', '.npy', '.npz')

# pretrained_cfg fields that describe the *source* weights of the architecture (e.g. an ImageNet tag),
# not this student; dropped so the card and config do not claim a provenance the student lacks.
_SOURCE_CFG_KEYS = (
    'tag', 'license', 'origin_url', 'paper_ids', 'paper_name', 'notes', 'url', 'hf_hub_id',
    'hf_hub_filename', 'file', 'source', 'state_dict', 'test_input_size', 'test_crop_pct',
    'test_pool_size', 'label_offset', 'label_descriptions',
)
# run_info keys never written anywhere (credentials a trainer might carry in its args).
_SECRET_KEY_RE = re.compile(r'token|secret|password|passwd|api_?key|credential|auth', re.IGNORECASE)
# run_info keys holding local filesystem paths: not published (privacy), only their base name where
# the name itself says something (a teacher checkpoint file name).
_PATH_KEYS = ('data_dir', 'data', 'output', 'resume', 'initial_checkpoint', 'config', 'export_hub',
              'log_wandb', 'class_map', 'dataset_download', 'threshold_cache', 'energy_cache',
              'calibration_cache')
_BASENAME_KEYS = ('teacher_checkpoint',)

# Model-card sections: (title, [(run_info key, label)]). Keys absent from run_info are left out.
CARD_KEYS = {
    'Student and teacher': [
        ('model', 'Student architecture'),
        ('teacher', 'Teacher'),
        ('teacher_checkpoint', 'Teacher checkpoint (file name)'),
    ],
    'Distillation loss': [
        ('distill_loss', 'Distillation loss'),
        ('kd_temperature', 'KD temperature T'),
        ('task_loss_weight', 'Task (CE) loss weight'),
        ('distill_loss_weight', 'Distillation loss weight'),
    ],
    'DKD': [
        ('dkd_alpha', 'DKD alpha (TCKD weight)'),
        ('dkd_beta', 'DKD beta (NCKD weight)'),
        ('dkd_warmup', 'DKD warm-up epochs'),
    ],
    'Energy-based temperature': [
        ('energy_temperature', 'Energy temperature T_E'),
        ('energy_rate', 'Threshold rate r'),
        ('temp_direction', 'Temperature direction'),
        ('temp_policy', 'Temperature policy'),
        ('temp_delta_low', 'Delta for low-energy samples'),
        ('temp_delta_high', 'Delta for high-energy samples'),
        ('temp_low', 'Explicit low-energy temperature'),
        ('temp_high', 'Explicit high-energy temperature'),
        ('gradation_bins', 'Gradation bins'),
        ('temp_min', 'Minimum temperature'),
        ('temp_max', 'Maximum temperature'),
        ('calibration', 'Threshold calibration'),
    ],
    'High-energy data augmentation (HE-DA)': [
        ('he_da', 'HE-DA'),
        ('he_da_rate', 'HE-DA rate'),
        ('he_da_selection', 'HE-DA selection'),
        ('he_da_alpha', 'HE-DA Beta(alpha, alpha)'),
        ('he_da_weight', 'HE-DA loss weight'),
    ],
    'Training': [
        ('dataset', 'Dataset'),
        ('imbalance_factor', 'Long-tail imbalance factor'),
        ('epochs', 'Epochs'),
        ('batch_size', 'Batch size'),
        ('lr', 'Learning rate'),
        ('opt', 'Optimizer'),
        ('sched', 'LR schedule'),
        ('weight_decay', 'Weight decay'),
        ('model_ema', 'Model EMA'),
        ('seed', 'Seed'),
    ],
}
_THRESHOLD_KEYS = (
    ('low', 'Low-energy threshold'),
    ('high', 'High-energy threshold'),
    ('rate', 'Rate r'),
    ('energy_temperature', 'T_E used for calibration'),
    ('num_samples', 'Calibration samples N'),
)
# keys consumed elsewhere in the card (or deliberately unpublished); the rest go to "Other settings"
_HANDLED_KEYS = {k for rows in CARD_KEYS.values() for k, _ in rows} | {
    'thresholds', 'he_da_thresholds', 'push_to_hub', 'hub_repo_id', 'hub_private', 'hub_revision', 'license', 'num_classes',
    'input_size', 'img_size', 'in_chans', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode',
}


class HubPushError(RuntimeError):
    """Uploading an export folder to the Hugging Face Hub failed; the local export is untouched."""


# ---------------------------------------------------------------------------------------------------------
# helpers

def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / ModelEmaV3 (``.module``) and torch.compile (``._orig_mod``) wrappers hold the real student.
    from timm.utils import unwrap_model
    return unwrap_model(model)


def _public_run_info(run_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """run_info without credentials and with local paths reduced (see _PATH_KEYS / _BASENAME_KEYS)."""
    out = {}
    run_info = run_info or {}
    for key, value in run_info.items():
        key = str(key)
        if key == 'dataset' and value in ('', None) and (run_info.get('data_dir') or run_info.get('data')):
            value = 'image folder'  # timm: an empty --dataset means an ImageFolder under --data-dir
        if _SECRET_KEY_RE.search(key) or key in _PATH_KEYS or value is None or value == '':
            continue
        if key in _BASENAME_KEYS:
            value = Path(str(value)).name
            if not value:
                continue
        out[key] = value
    return out


def _is_energy_loss(name: Any) -> bool:
    from .losses import _DISTILL_LOSSES  # the registry knows which losses use per-sample temperatures
    cls = _DISTILL_LOSSES.get(str(name))
    if cls is not None and hasattr(cls, 'uses_energy_temperature'):
        return bool(cls.uses_energy_temperature)
    return 'energy' in str(name).lower()


def _he_da_enabled(value: Any) -> bool:
    # the trainer stores --he-da as 'off' / 'cutmix' / 'mixup'; library callers may pass a bool
    return value not in (None, False, 0, '', 'off', 'none', 'False', 'false')


def _group_temperatures(info: Dict[str, Any]) -> Optional[tuple]:
    """(low-energy group T, high-energy group T) the two-bin policy applied, direction included."""
    try:
        base = float(info['kd_temperature'])
        t_low = float(info['temp_low']) if info.get('temp_low') is not None else base + float(info['temp_delta_low'])
        t_high = float(info['temp_high']) if info.get('temp_high') is not None else base + float(info['temp_delta_high'])
    except (KeyError, TypeError, ValueError):
        return None
    if info.get('temp_direction') == 'reverse':
        t_low, t_high = t_high, t_low
    return t_low, t_high


def _is_dkd_loss(name: Any) -> bool:
    return 'dkd' in str(name).lower()


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return f'{value:.6g}'
    if isinstance(value, (list, tuple)):
        return ', '.join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ', '.join(f'{k}={_fmt(v)}' for k, v in value.items())
    text = str(value)
    if os.path.isabs(text):  # a path slipped through under an unknown key: publish its name only
        text = Path(text).name
    return text.replace('\n', ' ').replace('|', '\\|')


def _is_plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)) and len(value) <= 16:
        return all(isinstance(v, (bool, int, float, str)) for v in value)
    return False


def _metric(metrics: Dict[str, Any], *names: str) -> Optional[float]:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _needs_plugin(architecture: str) -> bool:
    """True when the architecture is registered by timm_energykd rather than by timm itself."""
    try:
        from timm.models import model_entrypoint
        module = model_entrypoint(architecture).__module__
    except Exception:  # unknown to the registry right now: assume it is ours
        return True
    return not module.startswith('timm.')


# ---------------------------------------------------------------------------------------------------------
# model card

def build_model_card(
        run_info: Optional[Dict[str, Any]],
        metrics: Optional[Dict[str, Any]] = None,
        *,
        architecture: str,
        num_classes: int,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> str:
    """Model card text (README.md with YAML front matter) from the run's settings and metrics.

    Args:
        run_info: flat dict of run settings (trainer's ``vars(args)`` plus ``thresholds``); unknown keys
            go to an "Other settings" list, missing keys are left out, credentials and local paths are
            never written.
        metrics: final evaluation metrics; ``top1``/``top5`` (or ``eval_top1``/``eval_top5``) in percent.
            Absent values are reported as "not evaluated", never estimated.
        architecture: timm architecture name of the student.
        num_classes: classifier size.
        pretrained_cfg: the exported pretrained config (input size, mean, std).
        repo_id: Hub repository for the usage snippet; a placeholder when unknown.
    """
    info = _public_run_info(run_info)
    metrics = dict(metrics or {})
    pcfg = pretrained_cfg or {}
    license_ = info.get('license')
    repo = repo_id or info.get('push_to_hub') or info.get('hub_repo_id')
    repo = repo if isinstance(repo, str) and repo else None
    name = repo.split('/')[-1] if repo else f'{architecture} (timm-energykd student)'
    teacher = info.get('teacher')
    loss = info.get('distill_loss')

    lines = ['---', 'tags:', '- image-classification', '- timm', '- knowledge-distillation', '- timm-energykd']
    lines += ['pipeline_tag: image-classification', 'library_name: timm']
    if license_:
        lines.append(f'license: {license_}')
    lines += ['---', f'# Model card for {name}', '']

    desc = f'A `{architecture}` image classifier'
    if teacher:
        desc += f' distilled from the teacher `{teacher}`'
    if loss:
        desc += f' with the `{loss}` loss'
    desc += ' using timm-energykd (energy-based knowledge distillation for timm).'
    lines += [desc, '']

    # results: only numbers that were passed in
    top1 = _metric(metrics, 'top1', 'eval_top1')
    top5 = _metric(metrics, 'top5', 'eval_top5')
    lines += ['## Results', '']
    where = metrics.get('split') or (f"evaluation split of {info['dataset']}" if 'dataset' in info else 'evaluation split')
    if top1 is None and top5 is None:
        lines += ['Not evaluated: no final metrics were recorded for this export.', '']
    else:
        lines += [f'Measured by the training run on the {_fmt(where)}'
                  + (f" at epoch {_fmt(metrics['epoch'])}" if 'epoch' in metrics else '') + ':', '']
        lines += ['| metric | value |', '|---|---|']
        lines.append(f"| top-1 (%) | {f'{top1:.2f}' if top1 is not None else 'not evaluated'} |")
        lines.append(f"| top-5 (%) | {f'{top5:.2f}' if top5 is not None else 'not evaluated'} |")
        lines.append('')

    lines += ['## Model details', '']
    lines.append(f'- **Architecture:** `{architecture}`')
    lines.append(f'- **Classes:** {num_classes}')
    for key, label in (('input_size', 'Input size'), ('interpolation', 'Interpolation'),
                       ('crop_pct', 'Crop pct'), ('mean', 'Mean'), ('std', 'Std')):
        if pcfg.get(key) is not None:
            lines.append(f'- **{label}:** {_fmt(pcfg[key])}')
    lines.append('')

    energy_run = _is_energy_loss(loss) if loss else any(k in info for k in ('energy_temperature', 'energy_rate'))
    he_da = _he_da_enabled(info.get('he_da'))
    gradation = info.get('temp_policy') == 'gradation'
    # rows of the policy that was not used are left out (every run's args hold both policies' flags)
    skip = {'gradation_bins', 'temp_min', 'temp_max'} if 'temp_policy' in info and not gradation else \
        {'temp_delta_low', 'temp_delta_high', 'temp_low', 'temp_high'} if gradation else set()
    for title, rows in CARD_KEYS.items():
        if title == 'DKD' and not _is_dkd_loss(loss):
            continue  # DKD's knobs are in every run's args; only meaningful for DKD losses
        if title == 'Energy-based temperature' and not energy_run:
            continue
        if title.startswith('High-energy') and not (he_da or 'he_da' in info):
            continue
        entries = []
        for key, label in rows:
            if key not in info or key in skip:
                continue
            if key.startswith('he_da_') and not he_da:
                continue
            value = info[key]
            if key == 'he_da':
                value = ('enabled' if value is True else value) if he_da else 'disabled'
            entries.append(f'- **{label}:** {_fmt(value)}')
        if title == 'Energy-based temperature' and not gradation and _group_temperatures(info):
            t_low, t_high = _group_temperatures(info)
            entries.append(f'- **Temperature of low-energy samples (E <= low):** {_fmt(t_low)}')
            entries.append(f'- **Temperature of high-energy samples (E > high):** {_fmt(t_high)}')
        if entries:
            lines += [f'## {title}', ''] + entries + ['']

    thresholds = (run_info or {}).get('thresholds')
    if isinstance(thresholds, dict) and thresholds:
        entries = [f'- **{label}:** {_fmt(thresholds[k])}' for k, label in _THRESHOLD_KEYS
                   if thresholds.get(k) is not None]
        he = (run_info or {}).get('he_da_thresholds')
        if he_da and isinstance(he, dict) and he.get('high') is not None:
            entries.append(f"- **HE-DA high threshold (rate {_fmt(he.get('rate'))}):** {_fmt(he['high'])}")
        if entries:
            lines += ['## Energy thresholds', '',
                      'Fixed for the whole run (samples with E <= low are low-energy, E > high high-energy).', '']
            lines += entries + ['']

    others = {k: v for k, v in info.items() if k not in _HANDLED_KEYS and _is_plain(v)}
    if others:
        lines += ['<details>', '<summary>Other settings</summary>', '']
        lines += [f'- `{k}`: {_fmt(v)}' for k, v in sorted(others.items())]
        lines += ['', '</details>', '']

    hub_id = repo or '<user>/<repo>'
    lines += ['## Usage', '', '```python', 'import timm']
    if _needs_plugin(architecture):
        lines.append('import timm_energykd  # registers this architecture with timm')
    lines += [f"model = timm.create_model('hf-hub:{hub_id}', pretrained=True).eval()",
              'data_config = timm.data.resolve_data_config(model=model)',
              'transform = timm.data.create_transform(**data_config, is_training=False)', '```', '']
    lines += ['## Reference', '',
              'Kim et al., "Maximizing Discrimination Capability of Knowledge Distillation with Energy-based Score".', '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------
# export

def _resolve_data_config(model: nn.Module, run_info: Dict[str, Any], data_config: Optional[Dict[str, Any]]):
    from timm.data import resolve_data_config
    if data_config is not None:
        return resolve_data_config(args=dict(data_config), model=model)
    # the same call timm's train.py makes with vars(args): the preprocessing the student was trained with
    keys = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
    return resolve_data_config(args={k: run_info[k] for k in keys if k in run_info}, model=model)


def _student_pretrained_cfg(cfg: Dict[str, Any], model: nn.Module, data_cfg: Dict[str, Any], license_):
    cfg = {k: v for k, v in cfg.items() if k not in _SOURCE_CFG_KEYS}
    if cfg.get('num_classes') != model.num_classes:
        cfg.pop('label_names', None)  # source labels (e.g. ImageNet) do not fit this head
    src_size = tuple(model.pretrained_cfg.get('input_size', ())[1:])
    for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'):
        if data_cfg.get(key) is not None:
            cfg[key] = list(data_cfg[key]) if isinstance(data_cfg[key], tuple) else data_cfg[key]
    if tuple(cfg.get('input_size', ())[1:]) != src_size:
        cfg['pool_size'] = None  # the architecture's default pool size belongs to another resolution
    cfg['num_classes'] = model.num_classes
    cfg['custom_load'] = False
    if license_:
        cfg['license'] = license_
    return {k: v for k, v in cfg.items() if v is not None}


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f'export output_dir {output_dir} exists and is not a folder')
        entries = {p.name for p in output_dir.iterdir()}
        # replace only an earlier export (or an empty folder), never an unrelated folder
        if entries and not (CONFIG_NAME in entries and entries <= set(_EXPORT_FILES)):
            raise FileExistsError(
                f'export output_dir {output_dir} exists and is not an earlier export (holds {sorted(entries)[:5]}); '
                'choose a new or empty folder')


def _find_pickles(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                  if p.is_file() and p.name.lower().endswith(_PICKLE_SUFFIXES))


def export_for_hub(
        model: nn.Module,
        output_dir: Union[str, Path],
        *,
        run_info: Dict[str, Any],
        metrics: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a model card ``README.md`` to ``output_dir``.

    The folder is built in a temporary sibling and renamed into place, so ``output_dir`` is always
    either absent, the previous complete export, or the new complete export. An existing ``output_dir``
    is replaced only when it is empty or an earlier export.

    Args:
        model: the student to export (the best or EMA weights); DDP / EMA / torch.compile wrappers are
            unwrapped. Its architecture must be in timm's registry (native or registered by timm_energykd).
        output_dir: the export folder.
        run_info: flat dict of run settings, e.g. ``vars(args)`` plus ``thresholds``; see ``CARD_KEYS``.
        metrics: final metrics (``top1``/``top5`` or ``eval_top1``/``eval_top5``, optional ``epoch``).
        label_names: one name per class (classifier index order); length must equal ``num_classes``.
        data_config: preprocessing to record (``input_size``, ``mean``, ``std``...); default: resolved from
            ``run_info`` and the model exactly as timm's train.py does.
        repo_id: Hub repository named in the card's usage snippet (default ``run_info['push_to_hub']``).

    Returns:
        The export folder.
    """
    from timm.models import save_for_hf

    if not isinstance(run_info, dict):
        raise ValueError(f'export_for_hub: run_info must be a dict of run settings, got {type(run_info).__name__}')
    model = _unwrap(model)
    if not hasattr(model, 'pretrained_cfg') or 'architecture' not in (model.pretrained_cfg or {}):
        raise ValueError('export_for_hub: model has no pretrained_cfg["architecture"]; build it with timm.create_model')
    num_classes = int(model.num_classes)
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise ValueError(f'export_for_hub: label_names has {len(label_names)} entries, the model has {num_classes} classes')
    output_dir = Path(output_dir).expanduser().resolve()
    _check_output_dir(output_dir)
    public = _public_run_info(run_info)
    data_cfg = _resolve_data_config(model, run_info, data_config)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.tmp-', dir=output_dir.parent))
    try:
        model_config = {'label_names': label_names} if label_names else None
        # safetensors refuses non-contiguous tensors (e.g. --channels-last weights) and wants host memory:
        # export a contiguous CPU copy, leaving the caller's (maybe still training) model untouched.
        export_model = copy.deepcopy(model)._apply(lambda t: t.detach().to('cpu').contiguous())
        # timm's own writer: safetensors only (safe_serialization=True never writes pytorch_model.bin)
        save_for_hf(export_model, tmp, model_config=model_config, safe_serialization=True)
        config = json.loads((tmp / CONFIG_NAME).read_text(encoding='utf-8'))
        config['num_classes'] = num_classes
        config['pretrained_cfg'] = _student_pretrained_cfg(
            config.get('pretrained_cfg', {}), model, data_cfg, public.get('license'))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
        card = build_model_card(
            run_info, metrics, architecture=config['architecture'], num_classes=num_classes,
            pretrained_cfg=config['pretrained_cfg'], repo_id=repo_id)
        (tmp / CARD_NAME).write_text(card, encoding='utf-8')
        stray = _find_pickles(tmp)
        if stray:  # a timm version that ignored safe_serialization would land here
            raise RuntimeError(f'export_for_hub: refusing to publish pickle files {stray}')
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
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


# ---------------------------------------------------------------------------------------------------------
# push

def _one_line(text: str, token: Optional[str]) -> str:
    text = ' '.join(str(text).split())
    if token:
        text = text.replace(token, '***')
    return text[:300]


def push_to_hub(
        folder: Union[str, Path],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: str = 'Upload timm-energykd student',
        create_pr: bool = False,
) -> str:
    """Upload an export folder to the Hub with ``HfApi`` (create_repo(exist_ok) + upload_folder).

    Args:
        folder: an export written by ``export_for_hub``; checked to hold config.json and
            model.safetensors and no pickle files before anything is sent.
        repo_id: ``user/name`` or ``org/name``.
        private: create the repository as private (an existing repository keeps its visibility).
        revision: branch to push to; created from the default branch when missing.
        token: Hub token; ``None`` lets huggingface_hub read ``HF_TOKEN`` / its stored login. Never
            written to disk or logged.
        commit_message: commit message on the Hub.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The repository URL (``https://huggingface.co/<repo_id>``).

    Raises:
        FileNotFoundError / ValueError: bad folder or repo id (before any network access).
        HubPushError: any failure of the Hub client (network, HTTP, auth, offline mode); the local
            folder is left as it was.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'push_to_hub: export folder {folder} does not exist')
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f'push_to_hub: {folder} is not a Hub export (missing {", ".join(missing)})')
    stray = _find_pickles(folder)
    if stray:
        raise ValueError(f'push_to_hub: {folder} holds pickle files {stray}; exports must be safetensors only')
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
        if '/' not in repo_id:
            raise ValueError('expected USER/NAME or ORG/NAME')
    except ValueError as e:
        raise ValueError(f'push_to_hub: invalid repo_id {repo_id!r}: {_one_line(e, token)}') from None
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f'push to {repo_id} failed: offline mode is on (HF_HUB_OFFLINE=1); local export kept at {folder}')

    from . import __version__
    try:
        api = HfApi(token=token, library_name='timm-energykd', library_version=__version__)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision and revision != 'main' and not create_pr:
            api.create_branch(full_id, branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=full_id, folder_path=str(folder), revision=revision, commit_message=commit_message,
            create_pr=create_pr, allow_patterns=list(_EXPORT_FILES))
    except Exception as e:
        secret = token
        if not secret:  # the client resolved HF_TOKEN / the stored login itself: mask that one too
            try:
                from huggingface_hub import get_token
                secret = get_token()
            except Exception:
                secret = None
        raise HubPushError(
            f'push to {repo_id} failed: {type(e).__name__}: {_one_line(e, secret)}; local export kept at {folder}'
        ) from None  # no chained traceback: it could carry request headers
    url = str(repo_url) if repo_url else f'https://huggingface.co/{full_id}'
    _logger.info(f'Pushed {folder} to {url}' + (f' (revision {revision})' if revision else ''))
    return url


# ---------------------------------------------------------------------------------------------------------
# export from a timm training output folder

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
    from .files import load_checkpoint_file
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
    return export_for_hub(model, export_dir, run_info=run_info, metrics=metrics, label_names=label_names)


# ---------------------------------------------------------------------------------------------------------
# command line

def _read_label_names(path: Optional[str]) -> Optional[List[str]]:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f'--label-names file {p} does not exist')
    text = p.read_text(encoding='utf-8')
    if p.suffix == '.json':
        names = json.loads(text)
        if not isinstance(names, list):
            raise ValueError(f'--label-names {p}: expected a JSON list of class names')
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_energykd.hub', description='Export / push timm-energykd students.')
    sub = parser.add_subparsers(dest='command', required=True)
    ex = sub.add_parser('export', help='export a timm training output folder or checkpoint in Hub layout')
    ex.add_argument('source', help='timm output folder (args.yaml + model_best.pth.tar/last.pth.tar) or a checkpoint')
    ex.add_argument('export_dir', help='folder to write model.safetensors, config.json, README.md')
    ex.add_argument('--weights', default='auto', choices=('auto', 'model', 'ema'),
                    help='auto (default): the weights the run picked its best checkpoint by (EMA for timm\'s train.py with '
                         'EMA on, the plain model for train_energykd.py)')
    ex.add_argument('--label-names', default=None, help='text file (one class name per line) or JSON list')
    ex.add_argument('--model', default=None, help='architecture when args.yaml lacks "model"')
    ps = sub.add_parser('push', help='upload an export folder to the Hugging Face Hub')
    ps.add_argument('folder', help='export folder (from `export` or the trainer\'s --export-hub)')
    ps.add_argument('repo_id', help='USER/NAME or ORG/NAME')
    ps.add_argument('--private', action='store_true', help='create the repository as private')
    ps.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    ps.add_argument('--token-env', default=None, metavar='VAR',
                    help='environment variable holding the token (default: huggingface_hub\'s HF_TOKEN / login)')
    ps.add_argument('--commit-message', default='Upload timm-energykd student')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        if args.command == 'export':
            out = export_from_training_output(
                args.source, args.export_dir, weights=args.weights,
                label_names=_read_label_names(args.label_names), model_name=args.model)
            print(f'Exported to {out}')
        else:
            token = None
            if args.token_env:
                token = os.environ.get(args.token_env)
                if not token:
                    raise ValueError(f'--token-env: environment variable {args.token_env} is not set or empty')
            url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                              token=token, commit_message=args.commit_message)
            print(f'Pushed to {url}')
    except (HubPushError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
