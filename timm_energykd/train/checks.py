"""Checks of every flag before any work: one-line errors that name the flag and what was expected.

``validate_args(args)`` runs right after parsing, before a model, a dataset or a teacher is built, so a bad
value never fails after calibration or training. It checks: timm flags we refuse (``UNSUPPORTED``, only when
set to a non-default value), every float flag finite, ranges, names, and the files and folders named.
"""
import argparse
import logging
import math
import os
import re
from typing import Dict, List, Optional

import timm

from ..data import TransformSubset
from ..files import check_image_files, check_writable_dir

from . import args as A

__all__ = ['validate_args', 'check_trainer_args', 'check_dataset_images', 'UNSUPPORTED', 'FOLDER_DATASETS']

_logger = logging.getLogger(__name__)

FOLDER_DATASETS = ('', 'folder', 'imagefolder', 'image_folder')

_SCHEDULED_SIZES = 'scheduled image / batch sizes (variable-batch training) are not implemented; train at one size'
_NAFLEX = 'NaFlex batches (variable sequence length) are not supported'
_WANDB = 'wandb logging is not wired in; use summary.csv'

# timm flags the trainer cannot honour: dest -> reason. Refused only when set to a value other than timm's
# default; every other timm flag is used with timm's meaning (tests/test_flag_parity.py enforces this).
UNSUPPORTED: Dict[str, str] = {
    'kd_distill_type': 'only logit distillation; energy KD works on logits',
    'kd_loss_type': "only 'kl'; choose the loss with --distill-loss",
    'kd_student_feature_dim': 'feature distillation is not implemented',
    'kd_teacher_feature_dim': 'feature distillation is not implemented',
    'kd_token_distill_type': 'token distillation is not implemented',
    'torchscript': 'a distillation task with a teacher cannot be scripted; use --torchcompile',
    'fuser': 'TorchScript fusers are unused without --torchscript',
    'split_bn': 'split BatchNorm needs augmentation splits, not supported',
    'aug_splits': 'augmentation splits would send several views through the teacher, not supported',
    'jsd_loss': 'the JSD loss needs augmentation splits, not supported',
    'drop_connect': "timm's train.py ignores it too (deprecated); use --drop-path",
    'naflex_loader': _NAFLEX, 'naflex_train_seq_lens': _NAFLEX, 'naflex_max_seq_len': _NAFLEX,
    'naflex_patch_sizes': _NAFLEX, 'naflex_patch_size_probs': _NAFLEX, 'naflex_loss_scale': _NAFLEX,
    'naflex_patchify_channels_first': _NAFLEX,
    'train_img_sizes': _SCHEDULED_SIZES, 'train_batch_sizes': _SCHEDULED_SIZES, 'train_size_probs': _SCHEDULED_SIZES,
    'train_size_schedule': _SCHEDULED_SIZES, 'train_size_schedule_spread': _SCHEDULED_SIZES,
    'train_size_random_mix': _SCHEDULED_SIZES, 'variable_batch_loss_scale': _SCHEDULED_SIZES,
    'train_batches_per_epoch': 'a fixed number of batches per epoch is not implemented; every epoch sees the data once',
    'tta': "timm's train.py averages consecutive validation outputs, which needs a loader that repeats each image",
    'log_wandb': _WANDB, 'wandb_project': _WANDB, 'wandb_tags': _WANDB, 'wandb_resume_id': _WANDB,
}


def _check_finite(args: argparse.Namespace) -> None:
    """Every float flag (timm's and ours) must be a finite number: inf / nan would train NaN weights."""
    for action in A.build_parser()._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and not math.isfinite(v):
                raise ValueError(f'{action.option_strings[-1]} must be a finite number, got {v}')



def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-') if dest != 'local_rank' else '--local_rank'


def _in_half_open(x: float, lo: float, hi: float) -> bool:
    return lo < x <= hi


def _known_losses() -> List[str]:
    from .. import losses  # the package registers every loss on import
    return losses.list_distill_losses()


# The library's own checks, reported with the flag names: constructor argument -> flag.
_POLICY_FLAGS = {'base': '--kd-temperature', 'delta_low': '--temp-delta-low', 'delta_high': '--temp-delta-high',
                 'low_temperature': '--temp-low', 'high_temperature': '--temp-high', 't_min': '--temp-min',
                 't_max': '--temp-max', 'num_bins': '--gradation-bins', 'direction': '--temp-direction',
                 'rule': '--energykd-rules'}
_MIXER_FLAGS = {'mode': '--he-da', 'alpha': '--he-da-alpha', 'selection': '--he-da-selection', 'rate': '--he-da-rate',
                'rule': '--energykd-rules'}
_RATE_FLAGS = {'energy_rate': '--energy-rate', 'he_da_rate': '--he-da-rate'}


def _built_by_library(what: str, build, flags: Dict[str, str]):
    """Build a library object from flag values; its ValueError becomes one line naming the flag."""
    try:
        return build()
    except ValueError as e:
        msg = str(e).strip().splitlines()[0]
        key = re.match(r"(\w+)=", msg)
        flag = flags.get(key.group(1)) if key else None
        raise ValueError(f'{flag or what}: {msg}') from None


def _check_policies(g) -> None:
    """Both temperature policies as the task would build them (every flag of either must be usable)."""
    from ..temperature import create_temperature_policy
    rule = g('energykd_rules', 'paper')
    _built_by_library('--temp-policy two_bin', lambda: create_temperature_policy(
        'two_bin', base=g('kd_temperature', 4.0), delta_low=g('temp_delta_low', 2.0),
        delta_high=g('temp_delta_high', -2.0), direction=g('temp_direction', 'paper'),
        low_temperature=g('temp_low'), high_temperature=g('temp_high'), rule=rule), _POLICY_FLAGS)
    _built_by_library('--temp-policy gradation', lambda: create_temperature_policy(
        'gradation', t_min=g('temp_min', 2.0), t_max=g('temp_max', 6.0), num_bins=g('gradation_bins', 10),
        direction=g('temp_direction', 'paper')), _POLICY_FLAGS)


def _check_mixer(g) -> None:
    """HE-DA's mixer as the trainer builds it, and its selection rate as a threshold rate."""
    from ..energy import check_rate
    from ..mixing import HighEnergyMix
    _built_by_library('--he-da-rate', lambda: check_rate(g('he_da_rate', 0.3), name='he_da_rate'), _RATE_FLAGS)
    mode = g('he_da', 'off')
    selection = g('he_da_selection', 'threshold')
    _built_by_library('--he-da', lambda: HighEnergyMix(
        mode=mode if mode != 'off' else 'cutmix', alpha=g('he_da_alpha', 1.0), selection=selection,
        rate=g('he_da_rate', 0.3) if selection == 'topk' else None, rule=g('energykd_rules', 'paper')),
        _MIXER_FLAGS)


def validate_args(args: argparse.Namespace) -> None:
    """Fast checks before any model or data is built.

    Raises ValueError (or FileNotFoundError for missing files) with one line naming the flag and the
    expected value. Distillation flags given without a teacher only warn.
    """
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 (Namespaces built by hand may lack keys)
    _check_finite(args)

    # timm flags we cannot honour
    timm_defaults = A.timm_defaults()
    for dest, reason in UNSUPPORTED.items():
        value = g(dest, timm_defaults.get(dest))
        if value is not None and value is not False and value != timm_defaults.get(dest):  # null / off: not set
            raise ValueError(f'{_flag(dest)} is not supported by train_energykd.py ({reason}), got {value!r}')

    teacher, kd_name = g('teacher'), g('kd_model_name')
    if teacher is not None and kd_name is not None and teacher != kd_name:
        raise ValueError(
            f"--teacher and --kd-model-name name different teachers ('{teacher}' vs '{kd_name}'); give one of them")
    teacher = teacher or kd_name

    from ..energy import check_rate
    _built_by_library('--energy-rate', lambda: check_rate(g('energy_rate', 0.2), name='energy_rate'), _RATE_FLAGS)
    t_e = g('energy_temperature', 4.0)
    if not t_e > 0:
        raise ValueError(f'--energy-temperature must be > 0, got {t_e}')

    loss = g('distill_loss')
    if loss is not None:
        known = _known_losses()
        if loss not in known:
            raise ValueError(f"--distill-loss '{loss}' is unknown; expected one of: {', '.join(known) or '(none registered)'}")

    base = g('kd_temperature', 4.0)
    if not base > 0:
        raise ValueError(f'--kd-temperature must be > 0, got {base}')
    from ..losses import uses_energy_temperature
    if loss is None or uses_energy_temperature(loss):
        _check_policies(g)
    mom = g('running_momentum', 0.9)
    if not 0.0 <= mom < 1.0:
        raise ValueError(f'--running-momentum must be in [0, 1), got {mom}')

    if g('energykd_rules', 'paper') == 'authors':
        # the authors' rules are those of their dataset pass; the online estimators have only the paper's
        if g('calibration', 'dataset') != 'dataset':
            raise ValueError(f"--energykd-rules authors needs --calibration dataset (the authors' thresholds come "
                             f"from one teacher pass), got --calibration {g('calibration')}")
        if g('he_da', 'off') != 'off' and g('he_da_selection', 'threshold') != 'threshold':
            raise ValueError("--energykd-rules authors selects HE-DA samples by threshold; "
                             f"--he-da-selection {g('he_da_selection')} is ours")

    he_da = g('he_da', 'off')
    _check_mixer(g)
    if not g('he_da_weight', 1.0) >= 0:
        raise ValueError(f"--he-da-weight must be >= 0, got {g('he_da_weight')}")
    if he_da != 'off':
        bs = g('batch_size', 128)
        if bs < 2:
            raise ValueError(f'--he-da needs --batch-size >= 2 (it mixes pairs of samples), got {bs}')
        if g('mixup', 0.0) > 0 or g('cutmix', 0.0) > 0 or g('cutmix_minmax') is not None:
            raise ValueError(
                '--he-da cannot be combined with timm --mixup/--cutmix/--cutmix-minmax '
                '(they mix before the teacher sees the batch); set them to 0')

    amount = g('teacher_prune_amount', 0.0)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f'--teacher-prune-amount must be in [0, 1) (fraction of each weight pruned), got {amount}')
    blend = g('teacher_blend_weight', 0.7)
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f'--teacher-blend-weight must be in [0, 1] (weight of the unpruned teacher), got {blend}')

    for name in ('dkd_alpha', 'dkd_beta'):
        if not g(name, 1.0) >= 0:
            raise ValueError(f'{_flag(name)} must be >= 0, got {g(name)}')
    if g('dkd_warmup', 20) < 0:
        raise ValueError(f"--dkd-warmup must be >= 0 epochs, got {g('dkd_warmup')}")

    factor = g('imbalance_factor')
    if factor is not None and not _in_half_open(factor, 0.0, 1.0):
        raise ValueError(f'--imbalance-factor must be in (0, 1] (n_min / n_max, 0.01 = ratio 100), got {factor}')

    # files and folders
    ckpt = g('teacher_checkpoint')
    if ckpt and not os.path.isfile(ckpt):
        raise FileNotFoundError(f'--teacher-checkpoint: file not found: {ckpt}')
    resume = g('resume', '')
    if resume == 'auto' and not os.path.isfile(resume):
        raise ValueError('--resume auto (timm 1.0.31) is not supported by train_energykd.py yet; give a checkpoint path')
    if resume and not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume: file not found: {resume}')
    init_ckpt = g('initial_checkpoint', '')
    if init_ckpt and not os.path.isfile(init_ckpt):
        raise FileNotFoundError(f'--initial-checkpoint: file not found: {init_ckpt}')
    if not g('demo', False) and str(g('dataset', '') or '').lower() in FOLDER_DATASETS:
        data_dir = g('data_dir') or g('data')
        if not data_dir:
            raise ValueError('a data directory is required (positional DIR or --data-dir), or use --demo')
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f'--data-dir: folder not found: {data_dir}')

    # distillation flags without a teacher: harmless, but probably a mistake
    if teacher is None:
        defaults = A.energykd_defaults()
        ignored = [
            _flag(d) for d in A.energykd_flag_dests()
            if d not in _NOT_DISTILL and g(d, defaults[d]) != defaults[d]
        ]
        if ignored:
            _logger.warning(f"no --teacher given: ignoring distillation flags {', '.join(ignored)}")


# Our flags that mean something without a teacher.
_NOT_DISTILL = {
    'teacher', 'imbalance_factor', 'imbalance_seed', 'demo', 'push_to_hub', 'hub_private', 'hub_revision', 'export_hub',
}


def check_trainer_args(args) -> None:
    """Trainer settings (fast, before anything is built); one-line ValueError naming the flag."""
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {args.amp_dtype!r}")
    if args.model_dtype and args.model_dtype not in ('float32', 'float16', 'bfloat16'):
        raise ValueError(f"--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype!r}")
    if args.amp and args.model_dtype not in (None, '', 'float32'):
        raise ValueError(f'--amp needs a float32 model (--model-dtype {args.model_dtype} given), as in timm')
    if args.pretrained_path:
        if not args.pretrained:
            raise ValueError('--pretrained-path is loaded as the pretrained weights: add --pretrained (as in timm)')
        if not os.path.isfile(args.pretrained_path):
            raise FileNotFoundError(f'--pretrained-path: file not found: {args.pretrained_path}')
    for name, low in (('log_interval', 1), ('checkpoint_hist', 1), ('val_interval', 1), ('recovery_interval', 0),
                      ('workers', 0)):
        if getattr(args, name) < low:
            raise ValueError(f'{_flag(name)} must be >= {low}, got {getattr(args, name)}')
    if getattr(args, 'grad_accum_steps', 1) < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {args.epochs}')
    if args.teacher is None and (args.teacher_checkpoint or args.teacher_pretrained):
        raise ValueError('--teacher-checkpoint / --teacher-pretrained need --teacher NAME')
    if args.teacher is not None and args.he_da != 'off' and args.distill_loss is None:
        raise ValueError('--he-da needs a distillation loss (--distill-loss)')
    if not timm.is_model(args.model) and not str(args.model).startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f"--model: '{args.model}' is not a timm model name (see timm.list_models())")
    if args.teacher is not None and not timm.is_model(args.teacher) \
            and not str(args.teacher).startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f"--teacher: '{args.teacher}' is not a timm model name (see timm.list_models())")
    check_writable_dir(args.output or './output/train', '--output')
    _check_output_paths(args)
    _check_teacher_weights(args)


def _check_output_paths(args) -> None:
    """Everything the run writes at its end (cache, export, push) is checked now, not after training."""
    cache = args.calibration_cache
    if cache:
        if os.path.isdir(cache):
            raise ValueError(f'--calibration-cache: {cache} is a folder; expected a JSON file path')
        if os.path.isfile(cache):
            if not os.access(cache, os.R_OK):
                raise ValueError(f'--calibration-cache: {cache} is not readable')
        else:
            check_writable_dir(os.path.dirname(os.path.abspath(cache)), '--calibration-cache')
    if args.export_hub:
        export = os.path.abspath(args.export_hub)
        base = os.path.abspath(args.output or './output/train')
        if args.experiment and export == os.path.join(base, args.experiment):
            raise ValueError(f'--export-hub: {args.export_hub} is the run\'s own output folder; export to another '
                             'folder (the default is <output folder>/hub)')
        if export == base:
            raise ValueError(f'--export-hub: {args.export_hub} is the --output folder; choose a folder of its own')
        if os.path.isdir(export) and any(os.path.exists(os.path.join(export, f)) for f in
                                         ('summary.csv', 'last.pth.tar', 'model_best.pth.tar')):
            raise ValueError(f'--export-hub: {args.export_hub} holds a training run; choose an empty or new folder')
        check_writable_dir(export, '--export-hub')
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise ValueError(f'--push-to-hub: {args.push_to_hub!r} is not a Hub repo id (expected USER/NAME): '
                             f'{str(e).splitlines()[0]}') from None
        if '/' not in args.push_to_hub:
            raise ValueError(f'--push-to-hub: {args.push_to_hub!r}: expected USER/NAME or ORG/NAME')


def _check_teacher_weights(args) -> None:
    """A teacher without weights would distil from noise: refuse unless the user asks for it by name."""
    from ..teacher import has_pretrained_weights
    if args.teacher is None or args.teacher_checkpoint or args.teacher_pretrained is False:
        return
    if not has_pretrained_weights(args.teacher):
        raise ValueError(f'--teacher {args.teacher}: timm has no pretrained weights for it; give '
                         '--teacher-checkpoint PATH (or --no-teacher-pretrained to distil from a random teacher)')


# Up to this many train/val images get their header checked at startup (~1 s for 50k on a local disk); larger
# sets rely on timm's dataset, which skips an unreadable image with a warning and stops after repeated failures.
_MAX_IMAGES_CHECKED = 50_000


def _image_paths(dataset) -> Optional[List[str]]:
    """File paths of a timm folder dataset (None for other kinds, e.g. torchvision CIFAR or streaming)."""
    indices = None
    if isinstance(dataset, TransformSubset):
        dataset, indices = dataset.dataset, dataset.indices
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if samples is None:
        return None
    paths = [s[0] for s in samples]
    return paths if indices is None else [paths[i] for i in indices]


def check_dataset_images(dataset, flag: str = '--data-dir') -> None:
    """Unreadable images fail here, with the file named, instead of hours into calibration or training."""
    paths = _image_paths(dataset)
    if paths is None:
        return
    if len(paths) > _MAX_IMAGES_CHECKED:
        _logger.info(f'{len(paths)} images: skipping the startup image check (limit {_MAX_IMAGES_CHECKED}); '
                     f'unreadable images are skipped with a warning during training')
        return
    check_image_files(paths, flag)
