"""Command-line arguments of ``train_energykd.py``: every flag of timm's ``train.py`` plus ours.

Users already train with timm, so a timm command line, a timm ``--config`` YAML and a timm ``args.yaml``
work here unchanged (same flag names, dest names and defaults, same argument groups). Our distillation
flags are added in their own groups.

Two-stage parse as in timm: ``-c/--config FILE.yaml`` is read first, its keys (argparse dest names such as
``kd_model_name``) become the parser defaults, then the command line is parsed so flags override the file.

    args, args_text = parse_args()     # sys.argv[1:]
    validate_args(args)                # fast checks, one-line ValueError / FileNotFoundError

``validate_args`` runs before any model or data is built. Flags of timm's ``train.py`` that
``train_energykd.py`` cannot honour are listed in ``UNSUPPORTED`` and rejected only when set to a value
other than timm's default.
"""
import argparse
import difflib
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import yaml

__all__ = [
    'build_parser', 'parse_args', 'validate_args', 'args_to_yaml', 'load_config',
    'timm_flag_dests', 'energykd_flag_dests', 'UNSUPPORTED', 'RUNTIME_KEYS',
]

_logger = logging.getLogger(__name__)


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=x`` -> ``{'a': 1, 'b': 'x'}`` (values read as Python literals, else strings).

    Same behaviour as timm's ``timm.utils.ParseKwargs``; kept here so building the parser does not import
    torch (``--help`` and config checks stay instant).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        kw = {}
        for item in values:
            if not item:
                continue
            if '=' not in item:
                parser.error(f'{option_string}: expected KEY=VALUE, got {item!r}')
            key, value = item.split('=', 1)
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


# ---------------------------------------------------------------------------------------------------------
# timm train.py flags, as a table: (group title, [(flags, kwargs), ...]).
# Names, dests, types and defaults follow timm's train.py (the 2026 version with the timm.task KD flags);
# help strings are short paraphrases. kwargs key 'mutex' puts flags in one mutually exclusive group.
# ---------------------------------------------------------------------------------------------------------
_f, _i, _s = float, int, str

TIMM_GROUPS: Tuple[Tuple[str, Tuple[Tuple[Tuple[str, ...], Dict[str, Any]], ...]], ...] = (
    ('Dataset parameters', (
        (('--data-dir',), dict(metavar='DIR', help='path to dataset (root dir)')),
        (('--dataset',), dict(metavar='NAME', default='', help='dataset type + name ("<type>/<name>"); ImageFolder/ImageTar if empty')),
        (('--train-split',), dict(metavar='NAME', default='train', help='dataset train split')),
        (('--val-split',), dict(metavar='NAME', default='validation', help='dataset validation split')),
        (('--train-num-samples',), dict(type=_i, default=None, metavar='N', help='number of train samples (iterable datasets)')),
        (('--val-num-samples',), dict(type=_i, default=None, metavar='N', help='number of validation samples (iterable datasets)')),
        (('--dataset-download',), dict(action='store_true', default=False, help='allow download of torch/ and tfds/ datasets')),
        (('--class-map',), dict(type=_s, default='', metavar='FILENAME', help='class to index mapping file')),
        (('--input-img-mode',), dict(type=_s, default=None, help='image conversion mode of input images')),
        (('--input-key',), dict(type=_s, default=None, help='dataset key of input images')),
        (('--target-key',), dict(type=_s, default=None, help='dataset key of target labels')),
        (('--dataset-trust-remote-code',), dict(action='store_true', default=False, help='allow HF datasets to run remote code')),
    )),
    ('Model parameters', (
        (('--model',), dict(type=_s, default='resnet50', metavar='MODEL', help='student model name')),
        (('--pretrained',), dict(action='store_true', default=False, help='start the student from pretrained weights')),
        (('--pretrained-path',), dict(type=_s, default=None, help='checkpoint loaded as pretrained weights (with head adaptation)')),
        (('--initial-checkpoint',), dict(type=_s, default='', metavar='PATH', help='checkpoint loaded into the student after init')),
        (('--resume',), dict(type=_s, default='', metavar='PATH', help='resume model + optimizer state from checkpoint')),
        (('--no-resume-opt',), dict(action='store_true', default=False, help='do not resume optimizer state')),
        (('--num-classes',), dict(type=_i, default=None, metavar='N', help='number of classes (model default if None)')),
        (('--gp',), dict(type=_s, default=None, metavar='POOL', help='global pool type (model default if None)')),
        (('--img-size',), dict(type=_i, default=None, metavar='N', help='image size (model default if None)')),
        (('--in-chans',), dict(type=_i, default=None, metavar='N', help='input channels (3 if None)')),
        (('--input-size',), dict(type=_i, nargs=3, default=None, metavar='N', help='input dims C H W (model default if None)')),
        (('--crop-pct',), dict(type=_f, default=None, metavar='N', help='validation center crop fraction')),
        (('--mean',), dict(type=_f, nargs='+', default=None, metavar='MEAN', help='override dataset mean')),
        (('--std',), dict(type=_f, nargs='+', default=None, metavar='STD', help='override dataset std')),
        (('--interpolation',), dict(type=_s, default='', metavar='NAME', help='resize interpolation (overrides model)')),
        (('-b', '--batch-size'), dict(type=_i, default=128, metavar='N', help='training batch size')),
        (('-vb', '--validation-batch-size'), dict(type=_i, default=None, metavar='N', help='validation batch size')),
        (('--channels-last',), dict(action='store_true', default=False, help='channels_last memory layout')),
        (('--fuser',), dict(type=_s, default='', help="jit fuser ('', 'te', 'old', 'nvfuser')")),
        (('--grad-accum-steps',), dict(type=_i, default=1, metavar='N', help='gradient accumulation steps')),
        (('--grad-checkpointing',), dict(action='store_true', default=False, help='gradient checkpointing in the student')),
        (('--fast-norm',), dict(action='store_true', default=False, help='experimental fast-norm')),
        (('--model-kwargs',), dict(nargs='*', default={}, action=ParseKwargs, help='extra student kwargs KEY=VALUE')),
        (('--head-init-scale',), dict(type=_f, default=None, help='head init scale')),
        (('--head-init-bias',), dict(type=_f, default=None, help='head init bias value')),
        (('--torchcompile-mode',), dict(type=_s, default=None, help='torch.compile mode')),
        (('--torchscript',), dict(dest='torchscript', action='store_true', mutex='scripting', help='torch.jit.script the model')),
        (('--torchcompile',), dict(nargs='?', type=_s, default=None, const='inductor', mutex='scripting',
                                   help='torch.compile with this backend (default: inductor)')),
    )),
    ('Device parameters', (
        (('--device',), dict(type=_s, default='cuda', help='device (accelerator) to use')),
        (('--amp',), dict(action='store_true', default=False, help='mixed precision training')),
        (('--amp-dtype',), dict(type=_s, default='float16', help='AMP dtype (float16 or bfloat16)')),
        (('--model-dtype',), dict(type=_s, default=None, help='model dtype override (non-AMP)')),
        (('--no-ddp-bb',), dict(action='store_true', default=False, help='no DDP buffer broadcast')),
        (('--synchronize-step',), dict(action='store_true', default=False, help='synchronize the device after each step')),
        (('--local_rank',), dict(type=_i, default=0)),
        (('--device-modules',), dict(type=_s, nargs='+', default=None, help='python modules imported for device backends')),
    )),
    ('Optimizer parameters', (
        (('--opt',), dict(type=_s, default='sgd', metavar='OPTIMIZER', help='optimizer')),
        (('--opt-eps',), dict(type=_f, default=None, metavar='EPSILON', help='optimizer epsilon')),
        (('--opt-betas',), dict(type=_f, nargs='+', default=None, metavar='BETA', help='optimizer betas')),
        (('--momentum',), dict(type=_f, default=0.9, metavar='M', help='optimizer momentum')),
        (('--weight-decay',), dict(type=_f, default=2e-5, help='weight decay')),
        (('--clip-grad',), dict(type=_f, default=None, metavar='NORM', help='gradient clipping value (off if None)')),
        (('--clip-mode',), dict(type=_s, default='norm', help='gradient clipping mode (norm, value, agc)')),
        (('--layer-decay',), dict(type=_f, default=None, help='layer-wise lr decay')),
        (('--layer-decay-min-scale',), dict(type=_f, default=0, help='layer-wise lr decay minimum scale')),
        (('--layer-decay-no-opt-scale',), dict(type=_f, default=None, help='layer-wise lr decay no-optimization scale')),
        (('--opt-kwargs',), dict(nargs='*', default={}, action=ParseKwargs, help='extra optimizer kwargs KEY=VALUE')),
    )),
    ('Learning rate schedule parameters', (
        (('--sched',), dict(type=_s, default='cosine', metavar='SCHEDULER', help='LR scheduler')),
        (('--sched-on-updates',), dict(action='store_true', default=False, help='step the scheduler per update, not per epoch')),
        (('--lr',), dict(type=_f, default=None, metavar='LR', help='learning rate (overrides --lr-base)')),
        (('--lr-base',), dict(type=_f, default=0.1, metavar='LR', help='base lr: lr = lr_base * global_batch / lr_base_size')),
        (('--lr-base-size',), dict(type=_i, default=256, metavar='DIV', help='batch size of --lr-base')),
        (('--lr-base-scale',), dict(type=_s, default='', metavar='SCALE', help='lr vs batch scaling (linear, sqrt; by opt if empty)')),
        (('--lr-noise',), dict(type=_f, nargs='+', default=None, metavar='pct, pct', help='lr noise on/off epoch fractions')),
        (('--lr-noise-pct',), dict(type=_f, default=0.67, metavar='PERCENT', help='lr noise limit')),
        (('--lr-noise-std',), dict(type=_f, default=1.0, metavar='STDDEV', help='lr noise std-dev')),
        (('--lr-cycle-mul',), dict(type=_f, default=1.0, metavar='MULT', help='lr cycle length multiplier')),
        (('--lr-cycle-decay',), dict(type=_f, default=0.5, metavar='MULT', help='lr decay per cycle')),
        (('--lr-cycle-limit',), dict(type=_i, default=1, metavar='N', help='lr cycle limit')),
        (('--lr-k-decay',), dict(type=_f, default=1.0, help='lr k-decay for cosine/poly')),
        (('--warmup-lr',), dict(type=_f, default=1e-5, metavar='LR', help='warmup learning rate')),
        (('--min-lr',), dict(type=_f, default=0, metavar='LR', help='lower lr bound')),
        (('--epochs',), dict(type=_i, default=300, metavar='N', help='number of epochs')),
        (('--epoch-repeats',), dict(type=_f, default=0., metavar='N', help='dataset repeats per epoch')),
        (('--start-epoch',), dict(type=_i, default=None, metavar='N', help='manual start epoch')),
        (('--decay-milestones',), dict(type=_i, nargs='+', default=[90, 180, 270], metavar='MILESTONES', help='multistep decay epochs')),
        (('--decay-epochs',), dict(type=_f, default=90, metavar='N', help='epoch interval of step decay')),
        (('--warmup-epochs',), dict(type=_i, default=5, metavar='N', help='warmup epochs')),
        (('--warmup-prefix',), dict(action='store_true', default=False, help='exclude warmup from the decay schedule')),
        (('--cooldown-epochs',), dict(type=_i, default=0, metavar='N', help='cooldown epochs at min_lr')),
        (('--patience-epochs',), dict(type=_i, default=10, metavar='N', help='plateau scheduler patience')),
        (('--decay-rate', '--dr'), dict(type=_f, default=0.1, metavar='RATE', help='LR decay rate')),
    )),
    ('Augmentation and regularization parameters', (
        (('--no-aug',), dict(action='store_true', default=False, help='disable all training augmentation')),
        (('--train-crop-mode',), dict(type=_s, default=None, help='training crop mode')),
        (('--scale',), dict(type=_f, nargs='+', default=[0.08, 1.0], metavar='PCT', help='random resize scale')),
        (('--ratio',), dict(type=_f, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO', help='random resize aspect ratio')),
        (('--hflip',), dict(type=_f, default=0.5, help='horizontal flip probability')),
        (('--vflip',), dict(type=_f, default=0., help='vertical flip probability')),
        (('--color-jitter',), dict(type=_f, default=0.4, metavar='PCT', help='color jitter factor')),
        (('--color-jitter-prob',), dict(type=_f, default=None, metavar='PCT', help='color jitter probability')),
        (('--grayscale-prob',), dict(type=_f, default=None, metavar='PCT', help='random grayscale probability')),
        (('--gaussian-blur-prob',), dict(type=_f, default=None, metavar='PCT', help='gaussian blur probability')),
        (('--aa',), dict(type=_s, default=None, metavar='NAME', help='AutoAugment policy')),
        (('--aug-repeats',), dict(type=_f, default=0, help='augmentation repeats (distributed only)')),
        (('--aug-splits',), dict(type=_i, default=0, help='augmentation splits (0 or >= 2)')),
        (('--jsd-loss',), dict(action='store_true', default=False, help='Jensen-Shannon + CE loss (with --aug-splits)')),
        (('--bce-loss',), dict(action='store_true', default=False, help='BCE task loss')),
        (('--bce-sum',), dict(action='store_true', default=False, help='sum BCE over classes')),
        (('--bce-target-thresh',), dict(type=_f, default=None, help='binarize soft BCE targets at this threshold')),
        (('--bce-pos-weight',), dict(type=_f, default=None, help='BCE positive weight')),
        (('--reprob',), dict(type=_f, default=0., metavar='PCT', help='random erase probability')),
        (('--remode',), dict(type=_s, default='pixel', help='random erase mode')),
        (('--recount',), dict(type=_i, default=1, help='random erase count')),
        (('--resplit',), dict(action='store_true', default=False, help='no random erase on the first (clean) split')),
        (('--mixup',), dict(type=_f, default=0.0, help='mixup alpha (on if > 0)')),
        (('--cutmix',), dict(type=_f, default=0.0, help='cutmix alpha (on if > 0)')),
        (('--cutmix-minmax',), dict(type=_f, nargs='+', default=None, help='cutmix min/max ratio')),
        (('--mixup-prob',), dict(type=_f, default=1.0, help='probability of mixup or cutmix')),
        (('--mixup-switch-prob',), dict(type=_f, default=0.5, help='probability of cutmix when both are on')),
        (('--mixup-mode',), dict(type=_s, default='batch', help='mixup mode (batch, pair, elem)')),
        (('--mixup-off-epoch',), dict(type=_i, default=0, metavar='N', help='turn mixup off at this epoch (0: never)')),
        (('--smoothing',), dict(type=_f, default=0.1, help='label smoothing')),
        (('--train-interpolation',), dict(type=_s, default='random', help='training interpolation')),
        (('--drop',), dict(type=_f, default=0.0, metavar='PCT', help='dropout rate')),
        (('--drop-connect',), dict(type=_f, default=None, metavar='PCT', help='drop connect rate (deprecated, use --drop-path)')),
        (('--drop-path',), dict(type=_f, default=None, metavar='PCT', help='drop path rate')),
        (('--drop-block',), dict(type=_f, default=None, metavar='PCT', help='drop block rate')),
    )),
    ('Batch norm parameters', (
        (('--bn-momentum',), dict(type=_f, default=None, help='BatchNorm momentum override')),
        (('--bn-eps',), dict(type=_f, default=None, help='BatchNorm epsilon override')),
        (('--sync-bn',), dict(action='store_true', help='synchronized BatchNorm')),
        (('--dist-bn',), dict(type=_s, default='reduce', help='distribute BN stats after each epoch (broadcast, reduce, "")')),
        (('--split-bn',), dict(action='store_true', help='separate BN per augmentation split')),
    )),
    ('Model exponential moving average parameters', (
        (('--model-ema',), dict(action='store_true', default=False, help='track an EMA of the student weights')),
        (('--model-ema-force-cpu',), dict(action='store_true', default=False, help='keep the EMA on CPU (no EMA validation)')),
        (('--model-ema-decay',), dict(type=_f, default=0.9998, help='EMA decay')),
        (('--model-ema-warmup',), dict(action='store_true', help='EMA decay warmup')),
    )),
    ('Miscellaneous parameters', (
        (('--seed',), dict(type=_i, default=42, metavar='S', help='random seed')),
        (('--worker-seeding',), dict(type=_s, default='all', help='worker seed mode')),
        (('--log-interval',), dict(type=_i, default=50, metavar='N', help='batches between log lines')),
        (('--val-interval',), dict(type=_i, default=1, metavar='N', help='epochs between validation and checkpointing')),
        (('--recovery-interval',), dict(type=_i, default=0, metavar='N', help='batches between recovery checkpoints')),
        (('--checkpoint-hist',), dict(type=_i, default=10, metavar='N', help='number of checkpoints to keep')),
        (('-j', '--workers'), dict(type=_i, default=4, metavar='N', help='data loader workers')),
        (('--save-images',), dict(action='store_true', default=False, help='save input batch images for debugging')),
        (('--pin-mem',), dict(action='store_true', default=False, help='pin CPU memory in the DataLoader')),
        (('--no-prefetcher',), dict(action='store_true', default=False, help='disable the fast prefetcher')),
        (('--output',), dict(type=_s, default='', metavar='PATH', help='output folder (default: ./output)')),
        (('--experiment',), dict(type=_s, default='', metavar='NAME', help='experiment name (output sub-folder)')),
        (('--eval-metric',), dict(type=_s, default='top1', metavar='EVAL_METRIC', help='metric for the best checkpoint')),
        (('--tta',), dict(type=_i, default=0, metavar='N', help='test-time augmentation factor')),
        (('--use-multi-epochs-loader',), dict(action='store_true', default=False, help='multi-epochs data loader')),
        (('--log-wandb',), dict(action='store_true', default=False, help='log metrics to wandb')),
        (('--wandb-project',), dict(type=_s, default=None, help='wandb project name')),
        (('--wandb-tags',), dict(type=_s, nargs='+', default=[], help='wandb tags')),
        (('--wandb-resume-id',), dict(type=_s, default='', metavar='ID', help='wandb run id to resume')),
        (('--naflex-loader',), dict(action='store_true', default=False, help='NaFlex loader (NaFlex models only)')),
        (('--naflex-train-seq-lens',), dict(type=_i, nargs='+', default=[128, 256, 576, 784, 1024], help='NaFlex train sequence lengths')),
        (('--naflex-max-seq-len',), dict(type=_i, default=576, help='NaFlex validation sequence length')),
        (('--naflex-patch-sizes',), dict(type=_i, nargs='+', default=None, help='NaFlex variable patch sizes')),
        (('--naflex-patch-size-probs',), dict(type=_f, nargs='+', default=None, help='NaFlex patch size probabilities')),
        (('--naflex-loss-scale',), dict(type=_s, default='linear', help='NaFlex loss scaling (none, sqrt, linear)')),
    )),
    ('Knowledge distillation parameters (timm)', (
        (('--kd-model-name',), dict(type=_s, default=None, help='teacher model name (synonym of --teacher)')),
        (('--kd-distill-type',), dict(type=_s, default='logit', choices=['logit', 'feature', 'token'], help='distillation type')),
        (('--kd-loss-type',), dict(type=_s, default='kl', help='logit distillation loss (kl)')),
        (('--distill-loss-weight',), dict(type=_f, default=None, help='weight of the distillation loss')),
        (('--task-loss-weight',), dict(type=_f, default=None, help='weight of the task (CE) loss')),
        (('--kd-temperature',), dict(type=_f, default=4.0, help='base distillation temperature T')),
        (('--kd-student-feature-dim',), dict(type=_i, default=None, help='student feature dim (feature KD)')),
        (('--kd-teacher-feature-dim',), dict(type=_i, default=None, help='teacher feature dim (feature KD)')),
        (('--kd-token-distill-type',), dict(type=_s, default='soft', choices=['soft', 'hard'], help='token distillation type')),
    )),
    # Flags added by timm 1.0.31's train.py (its release notes and tests name them; defaults are "off").
    ('timm 1.0.31 training control', (
        (('--stop-epoch',), dict(type=_i, default=None, metavar='N', help='stop after N epochs without changing the schedule')),
        (('--save-epochs',), dict(type=_i, nargs='+', default=None, metavar='N', help='keep milestone-N.pth.tar snapshots')),
        (('--lr-decay-fn',), dict(type=_s, default=None, help='decay function of the WSD scheduler')),
        (('--lr-stable-timescale',), dict(type=_f, default=None, help='stable-phase timescale of the WSD scheduler')),
        (('--pretrained-cfg-overlay',), dict(nargs='*', default={}, action=ParseKwargs, help='student pretrained_cfg overlay KEY=VALUE')),
    )),
)

# ---------------------------------------------------------------------------------------------------------
# Our flags. Paper mapping (Kim et al.): r = --energy-rate, T_E = --energy-temperature,
# T(+) = --temp-delta-low (low-energy samples), T(-) = --temp-delta-high (high-energy samples).
# ---------------------------------------------------------------------------------------------------------
ENERGYKD_GROUPS: Tuple[Tuple[str, Tuple[Tuple[Tuple[str, ...], Dict[str, Any]], ...]], ...] = (
    ('Energy distillation parameters', (
        (('--teacher',), dict(type=_s, default=None, metavar='NAME', help='teacher model name, hf-hub:ORG/NAME or local-dir:PATH')),
        (('--teacher-pretrained',), dict(action=argparse.BooleanOptionalAction, default=None,
                                         help="timm's pretrained teacher weights (default: on when the model has "
                                              'them and no --teacher-checkpoint is given, as timm\'s KD does)')),
        (('--teacher-checkpoint',), dict(type=_s, default=None, metavar='PATH', help='teacher checkpoint (its own head)')),
        (('--teacher-prune-amount',), dict(type=_f, default=0.0, metavar='P',
                                           help='R2KD teacher: blend the teacher with a copy whose conv / linear weights '
                                                'are P L1-pruned (0 = off; 0.1 published)')),
        (('--teacher-blend-weight',), dict(type=_f, default=0.7, metavar='W',
                                           help='weight of the unpruned teacher in the --teacher-prune-amount blend '
                                                '(0.7 published)')),
        (('--distill-loss',), dict(type=_s, default=None, metavar='NAME', help='distillation loss (default: energy_kd with a teacher)')),
        (('--distill-loss-kwargs',), dict(nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                                          help='extra constructor arguments of the distillation loss, e.g. k=3 for rekd')),
        (('--energy-rate',), dict(type=_f, default=0.2, metavar='R', help='fraction r of low- and of high-energy samples, in (0, 0.5]')),
        (('--energy-temperature',), dict(type=_f, default=4.0, metavar='T_E', help='temperature T_E of the energy score')),
        (('--temp-delta-low',), dict(type=_f, default=2.0, help='T(+): added to T for low-energy samples')),
        (('--temp-delta-high',), dict(type=_f, default=-2.0, help='T(-): added to T for high-energy samples')),
        (('--temp-low',), dict(type=_f, default=None, help='explicit low-energy temperature (overrides T + T(+))')),
        (('--temp-high',), dict(type=_f, default=None, help='explicit high-energy temperature (overrides T + T(-))')),
        (('--temp-direction',), dict(type=_s, default='paper', choices=['paper', 'reverse'],
                                     help="'paper': low-energy gets T+T(+); 'reverse': swapped (authors' code)")),
        (('--temp-policy',), dict(type=_s, default='two_bin', choices=['two_bin', 'gradation'], help='temperature policy')),
        (('--gradation-bins',), dict(type=_i, default=10, metavar='N', help='energy bins of the gradation policy (>= 2)')),
        (('--temp-min',), dict(type=_f, default=2.0, help='lowest temperature of the gradation policy')),
        (('--temp-max',), dict(type=_f, default=6.0, help='highest temperature of the gradation policy')),
        (('--calibration',), dict(type=_s, default='dataset', choices=['dataset', 'batch', 'running'],
                                  help='energy thresholds from a teacher pass over the train set, each batch, or a running estimate')),
        (('--calibration-cache',), dict(type=_s, default=None, metavar='PATH',
                                        help='threshold cache JSON (default: <output dir>/energy_thresholds.json)')),
        (('--running-momentum',), dict(type=_f, default=0.9, help='momentum of --calibration running')),
    )),
    ('High-energy data augmentation (HE-DA)', (
        (('--he-da',), dict(type=_s, default='off', choices=['off', 'cutmix', 'mixup'], help='mix only high-energy samples')),
        (('--he-da-rate',), dict(type=_f, default=0.3, help='fraction of high-energy samples mixed, in (0, 0.5]')),
        (('--he-da-alpha',), dict(type=_f, default=1.0, help='Beta(alpha, alpha) of the mixing ratio')),
        (('--he-da-weight',), dict(type=_f, default=1.0, help='weight of the HE-DA distillation term')),
        (('--he-da-selection',), dict(type=_s, default='threshold', choices=['threshold', 'topk'], help='select by energy threshold or top-k')),
    )),
    ('Decoupled KD parameters', (
        (('--dkd-alpha',), dict(type=_f, default=1.0, help='DKD target-class (TCKD) weight')),
        (('--dkd-beta',), dict(type=_f, default=8.0, help='DKD non-target-class (NCKD) weight')),
        (('--dkd-warmup',), dict(type=_i, default=20, metavar='EPOCHS', help='DKD linear warm-up epochs')),
    )),
    ('Long-tailed data', (
        (('--imbalance-factor',), dict(type=_f, default=None, metavar='F',
                                       help='long-tailed train subset with n_min/n_max = F in (0, 1] (0.01: ratio 100)')),
        (('--imbalance-seed',), dict(type=_i, default=0, help='seed of the long-tailed subset')),
    )),
    ('Demo and Hub', (
        (('--demo',), dict(action='store_true', default=False, help='run the built-in offline demo')),
        (('--push-to-hub',), dict(type=_s, default=None, metavar='REPO_ID', help='push the trained student to this Hub repo')),
        (('--hub-private',), dict(action='store_true', default=False, help='create the Hub repo private')),
        (('--hub-revision',), dict(type=_s, default=None, metavar='REV', help='Hub branch / revision to push to')),
        (('--export-hub',), dict(type=_s, default=None, metavar='DIR', help='export safetensors + config.json + card to DIR')),
    )),
)

# Keys timm's train.py (or a trainer) sets on args at run time; tolerated in a --config YAML, never parsed.
RUNTIME_KEYS: Set[str] = {
    'rank', 'world_size', 'distributed', 'prefetcher', 'local_rank', 'device_id', 'is_master', 'config',
}

# timm flags train_energykd.py cannot honour: dest -> reason. Rejected only when set to a non-default value.
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
    'naflex_loader': 'NaFlex batches (variable sequence length) are not supported',
    'naflex_train_seq_lens': 'NaFlex batches (variable sequence length) are not supported',
    'naflex_max_seq_len': 'NaFlex batches (variable sequence length) are not supported',
    'naflex_patch_sizes': 'NaFlex batches (variable sequence length) are not supported',
    'naflex_patch_size_probs': 'NaFlex batches (variable sequence length) are not supported',
    'naflex_loss_scale': 'NaFlex batches (variable sequence length) are not supported',
    'log_wandb': 'wandb logging is not wired in; use summary.csv',
    'stop_epoch': 'timm 1.0.31 feature not implemented yet',
    'save_epochs': 'timm 1.0.31 feature not implemented yet',
}

FOLDER_DATASETS = ('', 'folder', 'imagefolder', 'image_folder')


def _add_table(parser: argparse.ArgumentParser, groups, suppress: bool = False) -> None:
    for title, entries in groups:
        group = parser.add_argument_group(title)
        mutex_groups: Dict[str, Any] = {}
        for flags, kwargs in entries:
            kwargs = dict(kwargs)
            mutex = kwargs.pop('mutex', None)
            if suppress:
                kwargs['default'] = argparse.SUPPRESS
            target = group
            if mutex is not None:
                if mutex not in mutex_groups:
                    mutex_groups[mutex] = group.add_mutually_exclusive_group()
                target = mutex_groups[mutex]
            target.add_argument(*flags, **kwargs)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The full parser: timm's train.py flags (same names, dests, defaults, groups) plus ours.

    Args:
        suppress_defaults: every default becomes ``argparse.SUPPRESS`` so the namespace holds only the flags
            given on the command line (used to tell which values came from the user).
    """
    parser = argparse.ArgumentParser(
        prog='train_energykd.py',
        description='Energy-based knowledge distillation with timm (accepts every timm train.py flag).',
    )
    parser.add_argument(
        '-c', '--config', type=str, metavar='FILE', default=argparse.SUPPRESS if suppress_defaults else '',
        help='YAML file of default arguments (argparse dest names, e.g. a timm args.yaml)')
    # Positional like timm (deprecated there in favour of --data-dir, kept for compatibility).
    parser.add_argument(
        'data', nargs='?', metavar='DIR', const=None, default=argparse.SUPPRESS if suppress_defaults else None,
        help='path to dataset (positional is deprecated, use --data-dir)')
    _add_table(parser, TIMM_GROUPS, suppress_defaults)
    _add_table(parser, ENERGYKD_GROUPS, suppress_defaults)
    return parser


def _dests(groups) -> List[str]:
    out = []
    for _, entries in groups:
        for flags, kwargs in entries:
            long_flag = next((f for f in flags if f.startswith('--')), flags[0])
            out.append(kwargs.get('dest', long_flag.lstrip('-').replace('-', '_')))
    return out


def timm_flag_dests() -> List[str]:
    """Dest names of the timm train.py option flags (excluding ``-c/--config`` and positional ``data``)."""
    return _dests(TIMM_GROUPS)


def energykd_flag_dests() -> List[str]:
    """Dest names of our own flags."""
    return _dests(ENERGYKD_GROUPS)


# ---------------------------------------------------------------------------------------------------------
# --config YAML
# ---------------------------------------------------------------------------------------------------------

def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Check / convert one YAML value like the command line would; raises ValueError with one line."""
    where = f"--config {path}: key '{key}'"
    if value is None:
        # a null flag means "off", as on the command line
        return False if isinstance(action, argparse._StoreTrueAction) else None
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise ValueError(f'{where} expects a mapping, got {value!r}')
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f'{where} expects true/false, got {value!r}')
        return value
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{where} expects a list, got {value!r}')
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ValueError(f'{where} expects {action.nargs} values, got {len(value)}')
        items = list(value)
    else:
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(f'{where} expects a single value, got {value!r}')
        items = [value]
    conv = action.type or str  # argparse's type None means a string
    out = []
    for item in items:
        bad = isinstance(item, bool) and conv is not str
        bad = bad or (conv is int and isinstance(item, float) and not item.is_integer())
        bad = bad or (conv is not str and not isinstance(item, (str, int, float)))
        if bad:
            raise ValueError(f'{where} expects {conv.__name__}, got {item!r}')
        try:
            # YAML 1.1 reads 3e-4 as a string: numeric strings are converted like command-line values.
            item = conv(item)
        except (TypeError, ValueError):
            raise ValueError(f'{where} expects {conv.__name__}, got {item!r}') from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


def load_config(path: str, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """Read a YAML config (argparse dest names) into checked parser defaults.

    Runtime keys timm's train.py adds (``rank``, ``world_size``, ``distributed``, ``prefetcher``, ...) are
    dropped silently; other unknown keys are dropped with a warning naming them (and the closest known key,
    so a misspelt flag of ours does not pass unnoticed). Values are checked like command-line values.
    """
    parser = parser or build_parser()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--config: file not found: {path}')
    with open(path, 'r') as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'--config {path}: expected a mapping of argument names to values, got {type(cfg).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    out = {}
    for key, value in cfg.items():
        if key in actions:
            out[key] = _convert(actions[key], key, value, path)
        elif key in RUNTIME_KEYS:
            continue
        else:
            close = difflib.get_close_matches(str(key), list(actions), n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            _logger.warning(f"--config {path}: ignoring unknown key '{key}'{hint}")
    return out


# ---------------------------------------------------------------------------------------------------------
# parse / dump
# ---------------------------------------------------------------------------------------------------------

def _explicit_dests(argv: Sequence[str]) -> Set[str]:
    """Dests given on the command line (defaults suppressed); empty if the command line does not parse."""
    quiet = build_parser(suppress_defaults=True)
    try:
        ns, _ = quiet.parse_known_args(list(argv))
    except SystemExit:
        return set()
    return set(vars(ns))


def _finalize(args: argparse.Namespace, cli: Set[str]) -> argparse.Namespace:
    """Resolve synonyms and implied defaults after parsing (values only, no checks)."""
    # timm's train.py takes the positional dir when --data-dir is not given.
    if args.data and not args.data_dir:
        args.data_dir = args.data
    # --kd-model-name (timm) and --teacher (ours) name the same model. The command line wins over the YAML;
    # two different names at the same level are left for validate_args to report.
    if args.teacher is None and args.kd_model_name is not None:
        args.teacher = args.kd_model_name
    elif args.kd_model_name is None and args.teacher is not None:
        args.kd_model_name = args.teacher
    elif args.teacher != args.kd_model_name:
        if 'teacher' in cli and 'kd_model_name' not in cli:
            args.kd_model_name = args.teacher
        elif 'kd_model_name' in cli and 'teacher' not in cli:
            args.teacher = args.kd_model_name
    if args.teacher is not None and args.distill_loss is None:
        args.distill_loss = 'energy_kd'
    return args


def args_to_yaml(args: argparse.Namespace) -> str:
    """YAML text of ``vars(args)`` as written to ``args.yaml`` (readable back with ``--config``)."""
    d = {k: v for k, v in vars(args).items() if k != 'config'}
    # tuples (e.g. set programmatically) are not safe_dump-able; lists are what argparse produces anyway
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return yaml.safe_dump(d, default_flow_style=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse like timm's train.py: ``--config`` YAML sets defaults, the command line overrides them.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        ``(args, args_text)``; ``args_text`` is the YAML of the final args, for ``args.yaml``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
    cfg_args, _ = config_parser.parse_known_args(argv)

    parser = build_parser()
    if cfg_args.config:
        try:
            defaults = load_config(cfg_args.config, parser)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args = _finalize(args, _explicit_dests(argv))
    return args, args_to_yaml(args)


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------

def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-') if dest != 'local_rank' else '--local_rank'


def _timm_defaults() -> Dict[str, Any]:
    return {dest: kw.get('default', False if kw.get('action') == 'store_true' else None)
            for dest, (_, kw) in zip(timm_flag_dests(), (e for _, es in TIMM_GROUPS for e in es))}


def _energykd_defaults() -> Dict[str, Any]:
    return {dest: kw.get('default', False if kw.get('action') == 'store_true' else None)
            for dest, (_, kw) in zip(energykd_flag_dests(), (e for _, es in ENERGYKD_GROUPS for e in es))}


def _in_half_open(x: float, lo: float, hi: float) -> bool:
    return lo < x <= hi


def _known_losses() -> List[str]:
    from .. import losses  # the package registers every loss on import
    return losses.list_distill_losses()


def _check_policy_temperatures(g, base: float) -> None:
    """Every temperature the energy policy can produce must be > 0 (only for losses that use the policy)."""
    for explicit, delta in (('temp_low', 'temp_delta_low'), ('temp_high', 'temp_delta_high')):
        t = g(explicit)
        if t is not None:
            if not t > 0:
                raise ValueError(f'{_flag(explicit)} must be > 0, got {t}')
        else:
            d = g(delta, 0.0)
            if not base + d > 0:
                raise ValueError(
                    f'--kd-temperature + {_flag(delta)} must be > 0, got {base} + ({d}) = {base + d}')
    t_min, t_max = g('temp_min', 2.0), g('temp_max', 6.0)
    for name, t in (('temp_min', t_min), ('temp_max', t_max)):
        if not t > 0:
            raise ValueError(f'{_flag(name)} must be > 0, got {t}')
    if t_min > t_max:
        raise ValueError(f'--temp-min must be <= --temp-max, got {t_min} > {t_max}')
    bins = g('gradation_bins', 10)
    if bins < 2:
        raise ValueError(f'--gradation-bins must be >= 2, got {bins}')


def validate_args(args: argparse.Namespace) -> None:
    """Fast checks before any model or data is built.

    Raises ValueError (or FileNotFoundError for missing files) with one line naming the flag and the
    expected value. Distillation flags given without a teacher only warn.
    """
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 (Namespaces built by hand may lack keys)

    # timm flags we cannot honour
    timm_defaults = _timm_defaults()
    for dest, reason in UNSUPPORTED.items():
        value = g(dest, timm_defaults.get(dest))
        if value is not None and value is not False and value != timm_defaults.get(dest):  # null / off: not set
            raise ValueError(f'{_flag(dest)} is not supported by train_energykd.py ({reason}), got {value!r}')

    teacher, kd_name = g('teacher'), g('kd_model_name')
    if teacher is not None and kd_name is not None and teacher != kd_name:
        raise ValueError(
            f"--teacher and --kd-model-name name different teachers ('{teacher}' vs '{kd_name}'); give one of them")
    teacher = teacher or kd_name

    rate = g('energy_rate', 0.2)
    if not _in_half_open(rate, 0.0, 0.5):
        raise ValueError(f'--energy-rate must be in (0, 0.5], got {rate}')
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
        _check_policy_temperatures(g, base)
    mom = g('running_momentum', 0.9)
    if not 0.0 <= mom < 1.0:
        raise ValueError(f'--running-momentum must be in [0, 1), got {mom}')

    he_da = g('he_da', 'off')
    he_rate = g('he_da_rate', 0.3)
    if not _in_half_open(he_rate, 0.0, 0.5):
        raise ValueError(f'--he-da-rate must be in (0, 0.5], got {he_rate}')
    if not g('he_da_alpha', 1.0) > 0:
        raise ValueError(f"--he-da-alpha must be > 0, got {g('he_da_alpha')}")
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
        defaults = _energykd_defaults()
        ignored = [
            _flag(d) for d in energykd_flag_dests()
            if d not in _NOT_DISTILL and g(d, defaults[d]) != defaults[d]
        ]
        if ignored:
            _logger.warning(f"no --teacher given: ignoring distillation flags {', '.join(ignored)}")


# Our flags that mean something without a teacher.
_NOT_DISTILL = {
    'teacher', 'imbalance_factor', 'imbalance_seed', 'demo', 'push_to_hub', 'hub_private', 'hub_revision', 'export_hub',
}
