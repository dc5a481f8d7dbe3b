"""The run record: the explicit, publishable account of how a student was made (the model card's input).

A trainer's ``vars(args)`` holds ~200 keys, most of which do not change the weights (logging, workers,
``naflex_*``, paths). ``RunRecord.from_run_info`` keeps only the settings that shape the result
(``RESULT_SETTINGS``), drops credentials and local paths, and resolves what the card states as facts with
the library's public API: whether the loss uses the energy temperatures (``uses_energy_temperature``),
the temperatures the policy applies (``create_temperature_policy``), and the loss's own options.
"""
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['RunRecord', 'RESULT_SETTINGS', 'RECIPE_SETTINGS', 'public_value']

# settings the card shows in its own sections (see card.CARD_KEYS for the labels)
RESULT_SETTINGS = (
    'model', 'teacher', 'teacher_checkpoint',
    'distill_loss', 'kd_temperature', 'task_loss_weight', 'distill_loss_weight', 'distill_loss_kwargs',
    'dkd_alpha', 'dkd_beta', 'dkd_warmup',
    'energy_temperature', 'energy_rate', 'temp_direction', 'temp_policy', 'temp_delta_low', 'temp_delta_high',
    'temp_low', 'temp_high', 'gradation_bins', 'temp_min', 'temp_max', 'calibration', 'energykd_rules',
    'he_da', 'he_da_rate', 'he_da_selection', 'he_da_alpha', 'he_da_weight',
    'dataset', 'imbalance_factor', 'imbalance_seed', 'epochs', 'batch_size', 'lr', 'opt', 'sched',
    'weight_decay', 'model_ema', 'seed', 'exported_weights',
)
# timm training flags that change the weights; shown collapsed under "Training recipe"
RECIPE_SETTINGS = (
    'momentum', 'opt_eps', 'opt_betas', 'grad_accum_steps', 'clip_grad', 'clip_mode', 'layer_decay',
    'warmup_epochs', 'warmup_lr', 'min_lr', 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate',
    'sched_on_updates', 'lr_base', 'lr_base_size', 'smoothing', 'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob',
    'mixup_mode', 'aa', 'reprob', 'remode', 'recount', 'scale', 'ratio', 'hflip', 'vflip', 'color_jitter',
    'train_interpolation', 'drop', 'drop_path', 'drop_block', 'bce_loss', 'model_ema_decay', 'amp', 'amp_dtype',
    'pretrained', 'teacher_pretrained', 'img_size', 'input_size', 'channels_last', 'sync_bn', 'world_size',
)
_SECRET_KEY_RE = re.compile(r'token|secret|password|passwd|api_?key|credential|auth', re.IGNORECASE)
_BASENAME_KEYS = ('teacher_checkpoint',)
_THRESHOLD_FIELDS = ('low', 'high', 'rate', 'energy_temperature', 'num_samples')
# trainer flag -> the loss constructor argument it feeds (a loss that declares all of them takes them)
_TWO_BIN_KEYS = ('temp_delta_low', 'temp_delta_high', 'temp_low', 'temp_high')
_GRADATION_KEYS = ('gradation_bins', 'temp_min', 'temp_max')
_DKD_OPTIONS = (('dkd_alpha', 'alpha'), ('dkd_beta', 'beta'), ('dkd_warmup', 'warmup_epochs'))


def public_value(value: Any) -> Any:
    """A value safe to publish: tensors as numbers, absolute paths reduced to their file name."""
    if hasattr(value, 'tolist'):
        value = value.tolist()
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): public_value(v) for k, v in value.items() if not _SECRET_KEY_RE.search(str(k))}
    return value


def _present(value: Any) -> bool:
    if isinstance(value, (dict, list, tuple)) and not value:
        return False
    return value is not None and value != '' and not (isinstance(value, float) and math.isnan(value))


def _he_da_enabled(value: Any) -> bool:
    # the trainer stores --he-da as 'off' / 'cutmix' / 'mixup'; library callers may pass a bool
    return value not in (None, False, 0, '', 'off', 'none', 'False', 'false')


def _recipe_in_use(recipe: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Drop timm flags that the run's other flags switch off (e.g. step-decay knobs of a cosine schedule)."""
    unused = set()
    if not recipe.get('amp'):
        unused.add('amp_dtype')
    if not recipe.get('clip_grad'):
        unused.add('clip_mode')
    sched = settings.get('sched')
    if sched not in ('step', 'multistep', 'plateau'):
        unused |= {'decay_epochs', 'decay_milestones', 'decay_rate'}
    elif sched == 'step':
        unused.add('decay_milestones')
    elif sched == 'multistep':
        unused.add('decay_epochs')
    if 'lr' in settings:  # timm derives lr from lr_base only when --lr is not given
        unused |= {'lr_base', 'lr_base_size'}
    if not (recipe.get('mixup') or recipe.get('cutmix') or recipe.get('cutmix_minmax')):
        unused |= {'mixup_prob', 'mixup_mode', 'cutmix_minmax'}
    if not recipe.get('reprob'):
        unused |= {'remode', 'recount'}
    if not settings.get('model_ema'):
        unused.add('model_ema_decay')
    return {k: v for k, v in recipe.items() if k not in unused}


def _loss_facts(name: Optional[str]):
    """(uses energy temperatures, the trainer flags the loss takes as options) from the public registry."""
    from ..losses import is_distill_loss, loss_options, uses_energy_temperature
    if not name or not is_distill_loss(name):
        return ('energy' in str(name or '').lower()), ()
    return uses_energy_temperature(name), tuple(loss_options(name))


def _group_temperatures(s: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Temperatures the run's policy applies, built with ``create_temperature_policy`` (direction included)."""
    from ..temperature import create_temperature_policy
    policy = s.get('temp_policy', 'two_bin')
    try:
        if policy == 'gradation':
            p = create_temperature_policy('gradation', t_min=float(s['temp_min']), t_max=float(s['temp_max']),
                                          num_bins=int(s['gradation_bins']), direction=s.get('temp_direction', 'paper'))
            return {'bins': [round(float(t), 6) for t in p.bin_temperatures.tolist()]}
        p = create_temperature_policy(
            'two_bin', base=float(s['kd_temperature']), delta_low=float(s.get('temp_delta_low', 2.0)),
            delta_high=float(s.get('temp_delta_high', -2.0)), direction=s.get('temp_direction', 'paper'),
            low_temperature=s.get('temp_low'), high_temperature=s.get('temp_high'))
    except (KeyError, TypeError, ValueError):
        return None
    return {'low': p.low_group_temperature, 'high': p.high_group_temperature}


def _thresholds(value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if hasattr(value, 'to_dict'):
        value = value.to_dict()
    if not isinstance(value, dict):
        return None
    out = {k: public_value(value[k]) for k in _THRESHOLD_FIELDS if _present(value.get(k))}
    return out or None


@dataclass
class RunRecord:
    """How a student was made, in publishable form; ``build_model_card`` renders it.

    Attributes:
        settings: the result-shaping settings the run has (``RESULT_SETTINGS``), paths reduced to file names.
        recipe: timm training flags that change the weights (``RECIPE_SETTINGS``).
        thresholds: ``low``, ``high``, ``rate``, ``energy_temperature``, ``num_samples`` of the calibration.
        he_da_thresholds: HE-DA's own thresholds (its wider rate), when used.
        metrics: ``top1`` / ``top5`` (percent), optional ``epoch`` and ``split``.
        energy_loss: the loss takes the energy policy's per-sample temperatures.
        loss_options: trainer flags that are options of this loss (e.g. DKD's alpha / beta / warm-up).
        temperatures: what the policy applies: ``{'low', 'high'}`` (two bins) or ``{'bins': [...]}``.
        he_da: HE-DA mode (``'cutmix'`` / ``'mixup'`` / ``'enabled'``), ``'disabled'``, or None when unknown.
        energy_bins: rows of the per-energy-bin report (``timm_energykd.energy_report``), if any.
        figures: file name in the export -> local PNG to copy there (training curves, per-bin figure).
        license: the user's license for the weights (never chosen for them).
        repo_id: Hub repository the student is pushed to, when known.
    """
    settings: Dict[str, Any] = field(default_factory=dict)
    recipe: Dict[str, Any] = field(default_factory=dict)
    thresholds: Optional[Dict[str, Any]] = None
    he_da_thresholds: Optional[Dict[str, Any]] = None
    metrics: Optional[Dict[str, Any]] = None
    energy_loss: bool = False
    loss_options: Sequence[str] = ()
    temperatures: Optional[Dict[str, Any]] = None
    he_da: Optional[str] = None
    energy_bins: Optional[List[Dict[str, Any]]] = None
    figures: Dict[str, str] = field(default_factory=dict)
    license: Optional[str] = None
    repo_id: Optional[str] = None

    @classmethod
    def from_run_info(
            cls,
            run_info: Optional[Dict[str, Any]],
            metrics: Optional[Dict[str, Any]] = None,
            *,
            energy_bins: Optional[List[Dict[str, Any]]] = None,
            figures: Optional[Dict[str, str]] = None,
            repo_id: Optional[str] = None,
    ) -> 'RunRecord':
        """Record from a flat run dict (``vars(args)`` plus ``thresholds`` / ``he_da_thresholds``).

        Keys outside ``RESULT_SETTINGS`` / ``RECIPE_SETTINGS`` are not recorded; neither are credentials,
        local paths (only ``teacher_checkpoint``'s file name), ``None`` or empty values.
        """
        info = dict(run_info or {})
        if info.get('dataset') in ('', None) and (info.get('data_dir') or info.get('data')):
            info['dataset'] = 'image folder'  # timm: an empty --dataset means an ImageFolder under --data-dir

        def pick(keys):
            out = {}
            for key in keys:
                value = info.get(key)
                if _present(value) and not _SECRET_KEY_RE.search(key):
                    value = Path(str(value)).name if key in _BASENAME_KEYS else public_value(value)
                    if _present(value):
                        out[key] = value
            return out

        settings = pick(RESULT_SETTINGS)
        recipe = _recipe_in_use(pick(RECIPE_SETTINGS), settings)
        loss = settings.get('distill_loss')
        energy_loss, options = _loss_facts(loss) if loss else (None, ())
        settings.update(pick([flag for flag in options if flag not in settings]))  # the loss's own options
        if 'imbalance_factor' not in settings:
            settings.pop('imbalance_seed', None)
        if loss:
            for flag, _ in _DKD_OPTIONS:  # DKD's flags are in every run's args: only a DKD-type loss takes them
                if flag not in options:
                    settings.pop(flag, None)
        else:  # a library caller's record without a loss name: energy settings mean an energy run
            energy_loss = any(k in settings for k in ('energy_temperature', 'energy_rate'))
            options = tuple(flag for flag, _ in _DKD_OPTIONS if flag in settings)
        he_da = None
        if 'he_da' in settings:
            value = settings['he_da']
            he_da = ('enabled' if value is True else str(value)) if _he_da_enabled(value) else 'disabled'
        # every run's args hold every policy's and HE-DA's flags: keep only those this run used
        unused = set()
        if not energy_loss:
            unused |= set(_TWO_BIN_KEYS + _GRADATION_KEYS + ('temp_direction', 'temp_policy'))
            if he_da in (None, 'disabled'):
                unused |= {'energy_temperature', 'energy_rate', 'calibration', 'energykd_rules'}
        elif settings.get('temp_policy', 'two_bin') == 'gradation':
            unused |= set(_TWO_BIN_KEYS)
        else:
            unused |= set(_GRADATION_KEYS)
        if he_da in (None, 'disabled'):
            unused |= {k for k in settings if k.startswith('he_da_')}
        settings = {k: v for k, v in settings.items() if k not in unused}
        m = {k: public_value(v) for k, v in (metrics or {}).items() if _present(v)}
        for src, dst in (('eval_top1', 'top1'), ('eval_top5', 'top5')):
            if src in m and dst not in m:
                m[dst] = m.pop(src)
        repo = repo_id or info.get('push_to_hub') or info.get('hub_repo_id')
        return cls(
            settings=settings, recipe=recipe, thresholds=_thresholds(info.get('thresholds')),
            he_da_thresholds=_thresholds(info.get('he_da_thresholds')), metrics=m or None,
            energy_loss=bool(energy_loss), loss_options=tuple(options),
            temperatures=_group_temperatures(settings) if energy_loss else None, he_da=he_da,
            energy_bins=[dict(r) for r in energy_bins] if energy_bins else None, figures=dict(figures or {}),
            license=info.get('license') or None, repo_id=repo if isinstance(repo, str) and repo else None)
