"""Command-line arguments of the trainer: every flag of timm's ``train.py`` plus ours.

Users already train with timm, so a timm command line, a timm ``--config`` YAML and a timm ``args.yaml``
work here unchanged. timm's flags are not restated by hand: they come from ``timm_flags.py``, generated from
timm's ``train.py`` source (``gen_timm_flags.py``), so names, dests, types, defaults, nargs, choices and
groups are timm's by construction. Our distillation flags are added in their own groups.

Two-stage parse as in timm: ``-c/--config FILE.yaml`` is read first, its keys (argparse dest names such as
``kd_model_name``) become the parser defaults, then the command line is parsed so flags override the file.
A key that is neither a flag of timm nor ours is refused, with the closest valid name.

    args, args_text = parse_args()     # sys.argv[1:]
"""
import argparse
import difflib
import itertools
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import yaml

from . import timm_flags
from .timm_help import HELP as _TIMM_HELP

__all__ = [
    'build_parser', 'parse_args', 'args_to_yaml', 'load_config', 'timm_flag_dests', 'energykd_flag_dests',
    'timm_defaults', 'energykd_defaults', 'RUNTIME_KEYS', 'NEWER_TIMM_KEYS', 'TIMM_SOURCE',
]

TIMM_SOURCE = timm_flags.SOURCE


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


_TYPES = {'int': int, 'float': float, 'str': str, None: None}
_ACTIONS = {'kwargs': ParseKwargs, 'store_true': 'store_true', None: None}


def _timm_entry(flag: Dict[str, Any]) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """One generated table row as ``add_argument`` (flags, kwargs)."""
    kw = {k: flag[k] for k in ('default', 'nargs', 'choices', 'const', 'metavar', 'mutex') if k in flag}
    if flag.get('type') is not None:
        kw['type'] = _TYPES[flag['type']]
    if flag.get('action') is not None:
        kw['action'] = _ACTIONS[flag['action']]
        if flag['action'] == 'store_true':
            kw.setdefault('default', False)
    long_flag = next((f for f in flag['flags'] if f.startswith('--')), flag['flags'][0])
    if long_flag.lstrip('-').replace('-', '_') != flag['dest']:
        kw['dest'] = flag['dest']
    kw['help'] = _TIMM_HELP.get(flag['dest'], argparse.SUPPRESS if flag['dest'] == 'local_rank' else None)
    return tuple(flag['flags']), kw


# timm's groups in timm's order; the positional ``data`` is added by build_parser like timm does.
TIMM_GROUPS = tuple(
    (title or 'Knowledge distillation parameters', tuple(_timm_entry(f) for f in rows))
    for title, rows in itertools.groupby((f for f in timm_flags.FLAGS if f['dest'] != 'data'),
                                         key=lambda f: f['group'])
)

_f, _i, _s = float, int, str

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
        (('--energykd-rules',), dict(type=_s, default='paper', choices=['paper', 'authors'],
                                     help="'authors': the authors' code where it departs from the paper (docs/FIDELITY.md): "
                                          'thresholds at int(N r) / N-1-int(N r) with a strict low group, calibration '
                                          'without the last partial batch, HE-DA on [0, 1] + selected with randperm '
                                          "partners and a cut//2 CutMix box; set --temp-direction reverse for their temperatures")),
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
        (('--dkd-warmup',), dict(type=_i, default=20, metavar='EPOCHS', help='DKD warm-up epochs W (0 = off)')),
        (('--dkd-warmup-mode',), dict(type=_s, default='mdistiller', choices=['mdistiller', 'linear'],
                                      help="'mdistiller': min(epoch / W, 1) with the integer epoch from 1 (W = 1: full "
                                           "DKD from the first step); 'linear': a smooth ramp min(progress / W, 1) from 0")),
    )),
    ('Teacher replay', (
        (('--teacher-cache',), dict(type=_s, default=None, metavar='DIR',
                                    help="teacher-output store: record the teacher's logits when DIR is absent or "
                                         'incomplete, replay them (the teacher is never built) when complete and its '
                                         'identity matches; another image stream or teacher is refused (docs/REPLAY.md)')),
        (('--teacher-cache-dtype',), dict(type=_s, default='float32', choices=['float32', 'float16'],
                                          help='storage of the recorded logits: float32 (exact replay) or float16')),
        (('--teacher-cache-topk',), dict(type=_i, default=None, metavar='K',
                                         help='store only the K largest logits + the exact energy (lossy tail; '
                                              'for large class counts)')),
        (('--teacher-cache-limit-gb',), dict(type=_f, default=None, metavar='G',
                                             help='refuse to record a store whose estimated size exceeds G GB')),
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
    'run_identity',
}


# Flags named in timm 1.0.31's release notes but absent from the recorded train.py source: a timm args.yaml
# that holds them switched off still loads; switched on, they are refused (their behaviour is not implemented).
NEWER_TIMM_KEYS: Set[str] = {
    'stop_epoch', 'save_epochs', 'lr_decay_fn', 'lr_stable_timescale', 'pretrained_cfg_overlay', 'task',
    'target_format', 'multilabel_threshold', 'loss',
}


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
    """The full parser: timm's train.py flags (generated table) plus ours.

    Args:
        suppress_defaults: every default becomes ``argparse.SUPPRESS`` so the namespace holds only the flags
            given on the command line (used to tell which values came from the user).
    """
    parser = argparse.ArgumentParser(
        prog='train_energykd.py',
        description='Energy-based knowledge distillation with timm (the flags of timm\'s train.py plus ours).',
    )
    parser.add_argument(
        '-c', '--config', type=str, metavar='FILE', default=argparse.SUPPRESS if suppress_defaults else '',
        help='YAML file of default arguments (argparse dest names, e.g. a timm args.yaml)')
    # Positional like timm (deprecated there in favour of --data-dir, kept for compatibility).
    parser.add_argument(
        'data', nargs='?', metavar='DIR', const=None, default=argparse.SUPPRESS if suppress_defaults else None,
        help=_TIMM_HELP['data'])
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


def _defaults(groups) -> Dict[str, Any]:
    return {dest: kw.get('default', False if kw.get('action') == 'store_true' else None)
            for dest, (_, kw) in zip(_dests(groups), (e for _, es in groups for e in es))}


def timm_defaults() -> Dict[str, Any]:
    """timm train.py's default value of each of its dests."""
    return _defaults(TIMM_GROUPS)


def energykd_defaults() -> Dict[str, Any]:
    """Our flags' defaults."""
    return _defaults(ENERGYKD_GROUPS)


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
    dropped silently. Any other key that is not a dest of ours or timm's is refused with one line naming the
    closest valid key, so a misspelt ``energy_rat: 0.3`` never trains at the default rate.
    """
    parser = parser or build_parser()
    if os.path.isdir(path):
        raise ValueError(f'--config: {path} is a folder; expected a YAML file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--config: file not found: {path}')
    try:
        with open(path, 'r') as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        raise ValueError(f'--config {path}: not valid YAML{where}: {getattr(e, "problem", None) or e}') from None
    except UnicodeDecodeError:
        raise ValueError(f'--config {path}: not a text (UTF-8) YAML file') from None
    if not isinstance(cfg, dict):
        raise ValueError(f'--config {path}: expected a mapping of argument names to values, got {type(cfg).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    out = {}
    for key, value in cfg.items():
        if key in actions:
            out[key] = _convert(actions[key], key, value, path)
        elif key in RUNTIME_KEYS:
            continue
        elif key in NEWER_TIMM_KEYS:
            if value in (None, False, '', [], {}):
                continue
            raise ValueError(f"--config {path}: key '{key}' is a timm train.py flag newer than the source this "
                             f"trainer follows ({TIMM_SOURCE['commit'][:10]}); it is not supported, got {value!r}")
        else:
            close = difflib.get_close_matches(str(key), list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise ValueError(f"--config {path}: unknown key '{key}' (not a flag of timm's train.py or ours){hint}")
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
    # two different names at the same level are left for the checks to report.
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
    d = {k: v for k, v in vars(args).items() if k != 'config' and not k.startswith('_')}
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
