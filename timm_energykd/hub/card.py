"""The model card (README.md): huggingface_hub's ``ModelCardData`` front matter, a body from a ``RunRecord``.

The front matter (tags, ``library_name: timm``, ``pipeline_tag``, the user's license if any, and a
``model-index`` with the measured top-1 / top-5 as ``EvalResult`` entries) is written by huggingface_hub,
so the Hub shows the results in its evaluation widget. The body states how the student was made, in
sections whose rows are the record's settings (``CARD_KEYS``), the per-energy-bin table and figures.
"""
from typing import Any, Dict, List, Optional, Sequence

from .record import RunRecord

__all__ = ['build_model_card', 'card_for_repo', 'CARD_KEYS', 'needs_plugin', 'TAGS']

TAGS = ['image-classification', 'timm', 'knowledge-distillation', 'timm-energykd']

# Model-card sections: (title, [(setting, label)]). Settings absent from the record are left out.
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
        ('distill_loss_kwargs', 'Loss options'),
    ],
    'DKD': [
        ('dkd_alpha', 'DKD alpha (TCKD weight)'),
        ('dkd_beta', 'DKD beta (NCKD weight)'),
        ('dkd_warmup', 'DKD warm-up epochs'),
        ('dkd_warmup_mode', 'DKD warm-up mode'),
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
        ('energykd_rules', "Rules (paper's text / authors' code)"),
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
        ('imbalance_seed', 'Long-tail subset seed'),
        ('epochs', 'Epochs'),
        ('batch_size', 'Batch size'),
        ('lr', 'Learning rate'),
        ('opt', 'Optimizer'),
        ('sched', 'LR schedule'),
        ('weight_decay', 'Weight decay'),
        ('model_ema', 'Model EMA'),
        ('seed', 'Seed'),
        ('exported_weights', 'Exported weights (model / EMA)'),
    ],
}
_THRESHOLD_LABELS = (
    ('low', 'Low-energy threshold'),
    ('high', 'High-energy threshold'),
    ('rate', 'Rate r'),
    ('energy_temperature', 'T_E used for calibration'),
    ('num_samples', 'Calibration samples N'),
)
# per-energy-bin table: (row key, column title, format)
_BIN_COLUMNS = (
    ('bin', 'bin', '{}'), ('group', 'group', '{}'), ('count', 'samples', '{}'),
    ('teacher_acc', 'teacher acc (%)', '{:.1f}'), ('teacher_conf', 'teacher conf (%)', '{:.1f}'),
    ('student_acc', 'student acc (%)', '{:.1f}'), ('student_conf', 'student conf (%)', '{:.1f}'),
    ('agreement', 'agreement (%)', '{:.1f}'),
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f'{value:.6g}'
    if isinstance(value, (list, tuple)):
        return ', '.join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ', '.join(f'{k}={_fmt(v)}' for k, v in value.items())
    return str(value).replace('\n', ' ').replace('|', '\\|')


def needs_plugin(architecture: str) -> bool:
    """True when the architecture is registered by timm_energykd rather than by timm itself."""
    try:
        from timm.models import model_entrypoint
        module = model_entrypoint(architecture).__module__
    except Exception:  # unknown to the registry right now: assume it is ours
        return True
    return not module.startswith('timm.')


_SHARE_LINE = ('Share it with `python -m timm_energykd.hub push EXPORT_DIR USER/REPO`, then load '
               "`timm.create_model('hf-hub:USER/REPO', pretrained=True)`.")


def card_for_repo(card: str, local_dir: str, repo_id: str) -> str:
    """The card of a local export as published to ``repo_id``: its usage block loads ``hf-hub:repo_id``
    instead of the local folder, so no local path reaches the Hub."""
    card = card.replace(f"'local-dir:{local_dir}'", f"'hf-hub:{repo_id}'").replace(_SHARE_LINE + '\n\n', '')
    return card.replace(f'local-dir:{local_dir}', f'hf-hub:{repo_id}')


def _number(metrics: Dict[str, Any], key: str) -> Optional[float]:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _card_data(record: RunRecord, name: str, top1, top5, where: str):
    from huggingface_hub import EvalResult, ModelCardData
    dataset = str(record.settings.get('dataset') or 'image folder')
    results = [
        EvalResult(task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                   dataset_split=where, metric_type=kind, metric_name=label, metric_value=round(value, 4))
        for kind, label, value in (('accuracy', 'top-1 accuracy', top1), ('top_5_accuracy', 'top-5 accuracy', top5))
        if value is not None]
    return ModelCardData(library_name='timm', pipeline_tag='image-classification', tags=list(TAGS),
                         license=record.license or None, model_name=name, eval_results=results or None)


def _bin_table(rows: List[Dict[str, Any]]) -> List[str]:
    cols = [c for c in _BIN_COLUMNS if any(c[0] in r for r in rows)]
    lines = ['| ' + ' | '.join(['energy range'] + [c[1] for c in cols]) + ' |',
             '|' + '---|' * (len(cols) + 1)]
    for r in rows:
        rng = f"({_fmt(r['energy_low'])}, {_fmt(r['energy_high'])}]" if 'energy_low' in r else ''
        cells = [c[2].format(r[c[0]]) if r.get(c[0]) is not None else '' for c in cols]
        lines.append('| ' + ' | '.join([rng] + cells) + ' |')
    return lines


def build_model_card(
        record: Any,
        metrics: Optional[Dict[str, Any]] = None,
        *,
        architecture: str,
        num_classes: int,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        local_dir: Optional[str] = None,
        repo_id: Optional[str] = None,
) -> str:
    """Model card text (README.md) for a student.

    Args:
        record: a ``RunRecord``, or a flat run dict turned into one with ``RunRecord.from_run_info``.
        metrics: with a dict ``record``: the final metrics (``top1``/``top5`` in percent, ``epoch``, ``split``).
        architecture: timm architecture name of the student.
        num_classes: classifier size.
        pretrained_cfg: the exported pretrained config (input size, mean, std, ...).
        label_names: the class names written to config.json (the card lists a few).
        local_dir: the export folder; the usage block loads from it when no Hub repository is known.
        repo_id: Hub repository for the usage block (overrides the record's).
    """
    if not isinstance(record, RunRecord):
        record = RunRecord.from_run_info(record, metrics, repo_id=repo_id)
    s, pcfg, m = record.settings, pretrained_cfg or {}, dict(record.metrics or {})
    repo = repo_id or record.repo_id
    name = repo.split('/')[-1] if repo else f'{architecture} (timm-energykd student)'
    top1, top5 = _number(m, 'top1'), _number(m, 'top5')
    where = str(m.get('split') or 'validation')

    from huggingface_hub import ModelCard
    lines = [f'# Model card for {name}', '']
    desc = f'A `{architecture}` image classifier'
    if s.get('teacher'):
        desc += f" distilled from the teacher `{s['teacher']}`"
    if s.get('distill_loss'):
        desc += f" with the `{s['distill_loss']}` loss"
    lines += [desc + ' using timm-energykd (energy-based knowledge distillation for timm).', '']

    lines += ['## Results', '']
    if top1 is None and top5 is None:
        lines += ['Not evaluated: no final metrics were recorded for this export.', '']
    else:
        at = f" at epoch {_fmt(m['epoch'])}" if 'epoch' in m else ''
        lines += [f'Measured by the training run on the {where} split of {_fmt(s.get("dataset", "its data"))}{at}:', '',
                  '| metric | value |', '|---|---|',
                  f"| top-1 (%) | {f'{top1:.2f}' if top1 is not None else 'not evaluated'} |",
                  f"| top-5 (%) | {f'{top5:.2f}' if top5 is not None else 'not evaluated'} |", '']
    if 'training_curves.png' in record.figures:
        lines += ['![Training curves](training_curves.png)', '',
                  'Training curves: train / eval loss, top-1, each loss term, the shares of low- and high-energy '
                  'samples and the mean temperature, per epoch.', '']
    if record.energy_bins:
        lines += ['## Per energy bin', '',
                  'The validation set split by the teacher\'s energy (low energy = confident teacher), for the student '
                  'at the end of training. Accuracy and '
                  'confidence (mean top softmax probability) of teacher and student, and how often the student\'s '
                  'prediction agrees with the teacher\'s, per bin:', '']
        lines += _bin_table(record.energy_bins) + ['']
        if 'energy_bins.png' in record.figures:
            lines += ['![Per-energy-bin report](energy_bins.png)', '']

    lines += ['## Model details', '', f'- **Architecture:** `{architecture}`', f'- **Classes:** {num_classes}']
    if label_names:
        shown = ', '.join(str(n) for n in list(label_names)[:10]) + (', ...' if len(label_names) > 10 else '')
        lines.append(f'- **Class names (config.json `label_names`):** {shown}')
    for key, label in (('input_size', 'Input size'), ('interpolation', 'Interpolation'),
                       ('crop_pct', 'Crop pct'), ('mean', 'Mean'), ('std', 'Std')):
        if pcfg.get(key) is not None:
            lines.append(f'- **{label}:** {_fmt(pcfg[key])}')
    lines.append('')

    for title, rows in CARD_KEYS.items():
        if title == 'Energy-based temperature' and not (record.energy_loss or any(k in s for k, _ in rows)):
            continue
        entries = [f"- **{label}:** {_fmt(record.he_da if key == 'he_da' else s[key])}"
                   for key, label in rows if key in s]
        temps = record.temperatures or {}
        if title == 'Distillation loss':  # options the loss declares beyond the labelled ones
            labelled = {k for rows_ in CARD_KEYS.values() for k, _ in rows_}
            entries += [f'- **Loss option `{flag}`:** {_fmt(s[flag])}' for flag in record.loss_options
                        if flag in s and flag not in labelled]
        if title == 'Energy-based temperature' and 'low' in temps:
            entries.append(f"- **Temperature of low-energy samples (E <= low):** {_fmt(temps['low'])}")
            entries.append(f"- **Temperature of high-energy samples (E > high):** {_fmt(temps['high'])}")
        if title == 'Energy-based temperature' and 'bins' in temps:
            entries.append(f"- **Temperature per energy bin (lowest energy first):** {_fmt(temps['bins'])}")
        if entries:
            lines += [f'## {title}', ''] + entries + ['']

    th = record.thresholds or {}
    entries = [f'- **{label}:** {_fmt(th[k])}' for k, label in _THRESHOLD_LABELS if th.get(k) is not None]
    he = record.he_da_thresholds or {}
    if record.he_da not in (None, 'disabled') and he.get('high') is not None:
        entries.append(f"- **HE-DA high threshold (rate {_fmt(he.get('rate'))}):** {_fmt(he['high'])}")
    if entries:
        lines += ['## Energy thresholds', '',
                  'Fixed for the whole run (samples with E <= low are low-energy, E > high high-energy).', ''] + entries + ['']

    if record.recipe:
        lines += ['<details>', '<summary>Training recipe (the other timm flags that shape the weights)</summary>', '']
        lines += [f'- `{k}`: {_fmt(v)}' for k, v in sorted(record.recipe.items())] + ['', '</details>', '']

    source = f'hf-hub:{repo}' if repo else f'local-dir:{local_dir}' if local_dir else 'local-dir:EXPORT_DIR'
    lines += ['## Usage', '', '```python', 'import timm']
    if needs_plugin(architecture):
        lines.append('import timm_energykd  # registers this architecture with timm')
    lines += [f"model = timm.create_model('{source}', pretrained=True).eval()",
              'data_config = timm.data.resolve_data_config(model=model)',
              'transform = timm.data.create_transform(**data_config, is_training=False)', '```', '']
    if not repo:
        lines += [_SHARE_LINE, '']
    export = 'python -m timm_energykd.hub export OUTPUT_DIR EXPORT_DIR'
    if label_names:
        export += ' --label-names config.json  # the class names stored in this export'
    lines += ['Re-export from the training output folder (same weights, card and class names):', '',
              '```bash', export, '```', '',
              '## Reference', '',
              'Kim et al., "Maximizing Discrimination Capability of Knowledge Distillation with Energy-based Score".', '']
    front = _card_data(record, name, top1, top5, where).to_yaml()
    return str(ModelCard(f'---\n{front}\n---\n\n' + '\n'.join(lines)))
