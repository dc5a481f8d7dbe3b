#!/usr/bin/env python3
"""Training-step throughput of Energy KD and its variants against timm's LogitDistillationTask.

One training step = task forward (teacher no-grad forward + student forward + loss) + backward + optimizer
step, on a fixed synthetic batch (no data loading). All variants are built up front and measured side by
side in one run: each repetition times every variant once, the variant order rotating between
repetitions so slow drift (clocks, other jobs) spreads evenly; the reported step time is the median over
repetitions.

    python benchmarks/throughput.py --setting cifar                   # H100: eager
    python benchmarks/throughput.py --setting cifar --compile         # H100: torch.compile
    python benchmarks/throughput.py --setting imagenet --json out.json
    python benchmarks/throughput.py --tiny                            # CPU smoke run, seconds
    python benchmarks/throughput.py --setting cifar --profile energy_kd

Targets (judged on a GPU run only, never in --tiny mode):
    Energy KD step   <= 1.02 x timm LogitDistillationTask step
    Energy DKD step  <= 1.03 x timm LogitDistillationTask step
    calibration rate >= 0.9 x plain no-grad teacher forward rate over the same loader
    HE-DA extra cost <= 1.15 x r x KD step (KD = our task with distill_loss='kd', the loss HE-DA rides on)
"""
import argparse
import copy
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    command_line, core_available, machine_info, markdown_table, median, write_json_atomic,
)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SETTINGS = {
    # name: teacher, student, image size, batch size, classes, images per epoch (for the Table 6 analogue)
    'imagenet': dict(teacher='resnet50', student='mobilenetv1_100', img_size=224, batch_size=256,
                     num_classes=1000, epoch_size=1281167),
    'cifar': dict(teacher='cifar_resnet32x4', student='cifar_resnet8x4', img_size=32, batch_size=512,
                  num_classes=100, epoch_size=50000),
    # --tiny: timm's test models, so the smoke run needs no plugin architectures and runs in seconds on CPU
    'tiny': dict(teacher='test_resnet', student='test_efficientnet', img_size=32, batch_size=8,
                 num_classes=10, epoch_size=64),
}

HE_DA_RATES = (0.2, 0.3, 0.4, 0.5)
BASELINE = 'timm_kd'
CORE_VARIANTS = ('kd', 'energy_kd', 'energy_dkd', 'gradation')  # + he_da_r* ; all need timm_energykd.task


def default_variants() -> List[str]:
    return ['ce', 'timm_kd', 'kd', 'energy_kd', 'energy_dkd', 'gradation'] + [f'he_da_r{r}' for r in HE_DA_RATES]


def needs_core(variant: str) -> bool:
    return variant in CORE_VARIANTS or variant.startswith('he_da_r')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--setting', default='cifar', choices=['imagenet', 'cifar'],
                   help='imagenet: resnet50 -> mobilenetv1_100, 224 px, batch 256; '
                        'cifar: cifar_resnet32x4 -> cifar_resnet8x4, 32 px, batch 512')
    p.add_argument('--tiny', action='store_true',
                   help='CPU smoke run: timm test models, batch 8, 2 iterations, targets not judged')
    p.add_argument('--variants', nargs='+', default=None, metavar='NAME',
                   help=f'subset to run (default: all): {" ".join(default_variants())}')
    p.add_argument('--he-da-rates', nargs='+', type=float, default=None, metavar='R',
                   help='HE-DA rates r (default 0.2 0.3 0.4 0.5); sets the he_da_r* variants')
    p.add_argument('--he-da-selection', default='topk', choices=['topk', 'threshold'],
                   help='topk mixes exactly round(r*B) samples per step (a fixed cost, default); '
                        'threshold mixes those above the calibrated high threshold')
    p.add_argument('--batch-size', type=int, default=None, help='override the setting\'s batch size')
    p.add_argument('--img-size', type=int, default=None, help='override the setting\'s image size')
    p.add_argument('--num-classes', type=int, default=None, help='override the setting\'s class count')
    p.add_argument('--epoch-size', type=int, default=None,
                   help='images per epoch for the epoch-time table (default: 50000 cifar, 1281167 imagenet)')
    p.add_argument('--compile', action='store_true', help='task.compile() every variant (torch.compile)')
    p.add_argument('--warmup', type=int, default=None, help='warm-up steps per variant (default 15; tiny 1)')
    p.add_argument('--iters', type=int, default=None, help='timed steps per repetition (default 20; tiny 2)')
    p.add_argument('--reps', type=int, default=None, help='repetitions per variant (default 7; tiny 1)')
    p.add_argument('--calib-batches', type=int, default=None,
                   help='batches in the synthetic calibration loader (default 20; tiny 2)')
    p.add_argument('--device', default=None, help='default: cuda if available else cpu')
    p.add_argument('--amp', dest='amp', action='store_true', default=None,
                   help='bf16 autocast (default on for CUDA, off for CPU)')
    p.add_argument('--no-amp', dest='amp', action='store_false')
    p.add_argument('--channels-last', dest='channels_last', action='store_true', default=None,
                   help='channels_last memory format (default on for CUDA, off for CPU)')
    p.add_argument('--no-channels-last', dest='channels_last', action='store_false')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU runs)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, metavar='OUT', help='write all results to this JSON file')
    p.add_argument('--png', default=None, metavar='OUT', help='write a bar plot of the step times (Pillow)')
    p.add_argument('--profile', default=None, metavar='VARIANT',
                   help='instead of the benchmark, print a torch.profiler table for one variant')
    p.add_argument('--profile-steps', type=int, default=5)
    args = p.parse_args(argv)
    _resolve_args(args)
    return args


def _resolve_args(args: argparse.Namespace) -> None:
    setting = SETTINGS['tiny' if args.tiny else args.setting]
    args.teacher = setting['teacher']
    args.student = setting['student']
    args.batch_size = args.batch_size or setting['batch_size']
    args.img_size = args.img_size or setting['img_size']
    args.num_classes = args.num_classes or setting['num_classes']
    args.epoch_size = args.epoch_size or SETTINGS[args.setting]['epoch_size']
    tiny = args.tiny
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 15)
    args.iters = args.iters if args.iters is not None else (2 if tiny else 20)
    args.reps = args.reps if args.reps is not None else (1 if tiny else 7)
    args.calib_batches = args.calib_batches if args.calib_batches is not None else (2 if tiny else 20)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cuda = args.device.startswith('cuda')
    args.amp = cuda if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.he_da_rates is None:
        args.he_da_rates = list(HE_DA_RATES)
    for r in args.he_da_rates:
        if not 0.0 < r <= 0.5:
            raise ValueError(f'--he-da-rates: expected rates in (0, 0.5], got {r}')
    if args.variants is None:
        args.variants = [v for v in default_variants() if not v.startswith('he_da_r')]
        args.variants += [f'he_da_r{r:g}' for r in args.he_da_rates]
    known = set(default_variants()) | {f'he_da_r{r:g}' for r in args.he_da_rates}
    for v in args.variants:
        if v not in known and not _parse_he_da_rate(v):
            raise ValueError(f'--variants: unknown variant {v!r}; expected one of: {" ".join(sorted(known))}')
    if args.profile is not None and args.profile not in known and not _parse_he_da_rate(args.profile):
        raise ValueError(f'--profile: unknown variant {args.profile!r}; expected one of: {" ".join(sorted(known))}')
    for name in ('batch_size', 'img_size', 'num_classes', 'iters', 'reps', 'calib_batches', 'epoch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")}: expected a positive integer, got {getattr(args, name)}')
    if args.warmup < 0:
        raise ValueError(f'--warmup: expected >= 0, got {args.warmup}')


def _parse_he_da_rate(variant: str) -> Optional[float]:
    if not variant.startswith('he_da_r'):
        return None
    try:
        r = float(variant[len('he_da_r'):])
    except ValueError:
        return None
    return r if 0.0 < r <= 0.5 else None


# ----------------------------------------------------------------------------------------------------------
# building models and tasks

def create_models(args: argparse.Namespace, device: torch.device):
    """Teacher (shared by all tasks, frozen) and the student every variant starts from."""
    import timm
    if not args.tiny:
        import timm_energykd  # noqa: F401  registers cifar_resnet32x4 / cifar_resnet8x4
    # pretrained=False: the benchmark times compute, weights do not matter and nothing is downloaded
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.num_classes)
    student = timm.create_model(args.student, pretrained=False, num_classes=args.num_classes)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in (teacher, student):
        if not hasattr(m, 'in_chans'):
            # timm's LogitDistillationTask reads student.in_chans; timm's own models all set it
            print(f'warning: {type(m).__name__} has no in_chans attribute; setting 3 for timm\'s tasks',
                  file=sys.stderr)
            m.in_chans = 3
    teacher = teacher.to(device=device, memory_format=memory_format).eval().requires_grad_(False)
    student = student.to(device=device, memory_format=memory_format)
    return teacher, student


def synthetic_batch(args: argparse.Namespace, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return x.to(device=device, memory_format=memory_format), y.to(device)


def synthetic_loader(args: argparse.Namespace, device: torch.device) -> List:
    """The calibration loader: a list of device batches, so both timed loops see identical input and no I/O."""
    return [synthetic_batch(args, device, seed=1000 + i) for i in range(args.calib_batches)]


def build_task(
        variant: str,
        student: nn.Module,
        teacher: nn.Module,
        device: torch.device,
        thresholds: Any = None,
        he_da_selection: str = 'topk',
        he_da_thresholds: Optional[Dict[float, Any]] = None,
) -> nn.Module:
    """One training task per variant; every task gets a plain cross-entropy criterion and T = 4.

    ``thresholds``: dataset thresholds at r = 0.2 (the temperature bins of the energy variants);
    ``he_da_thresholds``: {rate: thresholds at that rate}, HE-DA's own high threshold for threshold selection.
    """
    criterion = nn.CrossEntropyLoss()
    if variant == 'ce':
        from timm.task import ClassificationTask
        return ClassificationTask(student, criterion, device=device, verbose=False)
    if variant == 'timm_kd':
        from timm.task import LogitDistillationTask
        return LogitDistillationTask(student, teacher, criterion=criterion, temperature=4.0, device=device,
                                     verbose=False)

    from timm_energykd.task import EnergyDistillationTask
    kwargs: Dict[str, Any] = dict(criterion=criterion, temperature=4.0, energy_temperature=4.0, device=device,
                                  threshold_mode='dataset', verbose=False)
    he_da_thr = None
    if variant == 'kd':
        kwargs.update(distill_loss='kd')
    elif variant == 'energy_kd':
        kwargs.update(distill_loss='energy_kd')
    elif variant == 'energy_dkd':
        kwargs.update(distill_loss='energy_dkd')
    elif variant == 'gradation':
        from timm_energykd.temperature import GradedTemperature
        num_bins = getattr(thresholds, 'num_bins', None) or 10
        kwargs.update(distill_loss='energy_kd',
                      temperature_policy=GradedTemperature(t_min=2.0, t_max=6.0, num_bins=num_bins,
                                                           direction='paper'))
    else:
        rate = _parse_he_da_rate(variant)
        if rate is None:
            raise ValueError(f'unknown variant {variant!r}')
        from timm_energykd.mixing import HighEnergyMix
        he_da = HighEnergyMix(mode='cutmix', alpha=1.0, selection=he_da_selection,
                              rate=rate if he_da_selection == 'topk' else None)
        kwargs.update(distill_loss='kd', he_da=he_da)
        if he_da_selection == 'threshold':
            he_da_thr = (he_da_thresholds or {})[rate]
    task = EnergyDistillationTask(student, teacher, **kwargs)
    if thresholds is not None:
        task.set_thresholds(thresholds, he_da_thresholds=he_da_thr)
    return task


def _autocast(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Runner:
    """A variant ready to step: its task, its optimizer, the fixed batch."""

    def __init__(self, name: str, task: nn.Module, args: argparse.Namespace, device: torch.device, batch):
        self.name = name
        self.task = task
        self.args = args
        self.device = device
        self.input, self.target = batch
        trainable = task.get_trainable_module() if hasattr(task, 'get_trainable_module') else task
        params = [p for p in trainable.parameters() if p.requires_grad]
        # SGD + momentum as in the paper's CIFAR / ImageNet recipes; foreach keeps the step a few kernels
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
        self.times: List[float] = []
        self.peak_mem_mb: Optional[float] = None
        self.error: Optional[str] = None

    def step(self) -> None:
        with _autocast(self.args, self.device):
            out = self.task(self.input, self.target)
        out['loss'].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warmup(self, n: int) -> None:
        resident = 0
        if self.device.type == 'cuda':
            _sync(self.device)
            resident = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(n):
            self.step()
        _sync(self.device)
        if self.device.type == 'cuda':
            # what this variant's step needs above the memory already held by all variants' weights
            self.peak_mem_mb = (torch.cuda.max_memory_allocated(self.device) - resident) / 2 ** 20

    def timed(self, iters: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step()
        _sync(self.device)
        dt = (time.perf_counter() - t0) / iters
        self.times.append(dt)
        return dt


def calibrate(args, device, teacher, student):
    """Thresholds for the energy variants from calibrate_thresholds over the synthetic loader."""
    from timm_energykd.energy import calibrate_thresholds
    from timm_energykd.task import EnergyDistillationTask
    probe = EnergyDistillationTask(copy.deepcopy(student), teacher, distill_loss='kd', device=device, verbose=False)
    loader = synthetic_loader(args, device)
    thresholds = _run_calibration(calibrate_thresholds, probe.teacher_logits, loader, args, device)
    he_da_thresholds = {}
    if args.he_da_selection == 'threshold':
        for r in args.he_da_rates:
            he_da_thresholds[r] = _run_calibration(calibrate_thresholds, probe.teacher_logits, loader, args, device,
                                                   rate=r)
    return probe, loader, thresholds, he_da_thresholds


def _run_calibration(calibrate_thresholds: Callable, teacher_fn: Callable, loader, args, device, rate: float = 0.2):
    """calibrate_thresholds with the benchmark's autocast; progress logging off when the function has it."""
    import inspect
    params = inspect.signature(calibrate_thresholds).parameters
    kwargs: Dict[str, Any] = dict(rate=rate, energy_temperature=4.0, num_bins=10, device=device)
    if 'progress' in params:
        kwargs['progress'] = False
    if 'amp_dtype' in params:
        kwargs['amp_dtype'] = torch.bfloat16 if args.amp else None
        return calibrate_thresholds(teacher_fn, loader, **kwargs)
    with _autocast(args, device):
        return calibrate_thresholds(teacher_fn, loader, **kwargs)


def time_calibration(args, device, teacher_fn: Callable, loader, reps: int) -> Dict[str, Any]:
    """calibrate_thresholds vs a plain no-grad teacher forward loop over the same loader, interleaved."""
    from timm_energykd.energy import calibrate_thresholds

    def plain():
        with torch.no_grad(), _autocast(args, device):
            for x, _ in loader:
                teacher_fn(x)

    def calib():
        _run_calibration(calibrate_thresholds, teacher_fn, loader, args, device)

    fns = {'teacher_forward': plain, 'calibrate_thresholds': calib}
    for fn in fns.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
        for k in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    images = len(loader) * args.batch_size
    res = {k: dict(times_s=v, median_s=median(v), images_per_s=images / median(v)) for k, v in times.items()}
    res['rate_ratio'] = res['calibrate_thresholds']['images_per_s'] / res['teacher_forward']['images_per_s']
    res['images'] = images
    return res


# ----------------------------------------------------------------------------------------------------------
# reporting

def judge(results: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The issue's targets, each with its measured value and PASS / MISS (or n/a when not measured)."""
    med = {k: v['median_s'] for k, v in results['variants'].items() if v.get('median_s')}
    targets = []

    def add(name, value, limit, ok, note):
        status = 'n/a' if value is None else ('not judged (tiny)' if args.tiny else ('PASS' if ok else 'MISS'))
        if value is not None and not args.tiny and not args.device.startswith('cuda'):
            status += ' (CPU run; the targets are for GPU)'
        targets.append(dict(target=name, value=value, limit=limit, status=status, note=note))

    base = med.get(BASELINE)
    for v, limit in (('energy_kd', 1.02), ('energy_dkd', 1.03)):
        value = med[v] / base if (v in med and base) else None
        add(f'{v} step / timm_kd step', value, limit, value is not None and value <= limit,
            f'<= {limit}x')
    cal = results.get('calibration')
    value = cal['rate_ratio'] if cal else None
    add('calibration rate / teacher-forward rate', value, 0.9, value is not None and value >= 0.9, '>= 0.9x')
    kd = med.get('kd')
    for v in results['variants']:
        r = _parse_he_da_rate(v)
        if r is None:
            continue
        value = (med[v] - kd) / kd if (v in med and kd) else None  # extra cost as a fraction of the KD step
        add(f'{v} extra cost / KD step', value, 1.15 * r, value is not None and value <= 1.15 * r,
            f'<= 1.15 x {r:g} = {1.15 * r:.3f}')
    return targets


def epoch_table(results: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Paper Table 6 analogue: epoch time vs HE-DA rate, derived as steps/epoch x median step time."""
    steps = args.epoch_size // args.batch_size  # drop_last, as timm's train loader does
    med = {k: v['median_s'] for k, v in results['variants'].items() if v.get('median_s')}
    rows = []
    kd = med.get('kd')
    for name, rate in [('kd', 0.0)] + [(v, _parse_he_da_rate(v)) for v in results['variants']
                                      if _parse_he_da_rate(v) is not None]:
        if name not in med:
            continue
        epoch_s = steps * med[name]
        rows.append(dict(variant=name, he_da_rate=rate, steps_per_epoch=steps, epoch_s=epoch_s,
                         vs_kd=(med[name] / kd) if kd else None))
    return rows


def format_report(results: Dict[str, Any], args: argparse.Namespace) -> str:
    m = results['machine']
    lines = [
        f"# throughput: {results['config']['setting']}  ({m['device_name']}, torch {m['torch']}, "
        f"timm {m['timm']}, {m['date_utc']})",
        f"teacher {args.teacher} -> student {args.student}, {args.img_size} px, batch {args.batch_size}, "
        f"{args.num_classes} classes, amp={'bf16' if args.amp else 'off'}, channels_last={args.channels_last}, "
        f"compile={args.compile}; median of {args.reps} reps x {args.iters} steps after {args.warmup} warm-up",
        '',
    ]
    base = results['variants'].get(BASELINE, {}).get('median_s')
    rows = []
    for name, v in results['variants'].items():
        if v.get('error'):
            rows.append([name, 'error', '', '', v['error'][:80]])
            continue
        ratio = f"{v['median_s'] / base:.3f}" if base else 'n/a'
        mem = f"{v['peak_mem_mb']:.0f}" if v.get('peak_mem_mb') is not None else ''
        rows.append([name, f"{v['median_s'] * 1e3:.2f}", f"{v['images_per_s']:.1f}", ratio, mem])
    lines.append(markdown_table(['variant', 'step ms (median)', 'img/s', f'x {BASELINE}', 'step peak MiB'], rows))
    cal = results.get('calibration')
    if cal:
        lines += ['', markdown_table(
            ['calibration loop', 'median s', 'img/s'],
            [[k, f"{cal[k]['median_s']:.4f}", f"{cal[k]['images_per_s']:.1f}"]
             for k in ('teacher_forward', 'calibrate_thresholds')])
            + f"\n\ncalibration rate / teacher-forward rate = {cal['rate_ratio']:.3f} over {cal['images']} images"]
    ep = results.get('epoch_table')
    if ep:
        lines += ['', f'epoch time vs HE-DA rate (derived: {ep[0]["steps_per_epoch"]} steps/epoch for '
                      f'{args.epoch_size} images x median step time)',
                  markdown_table(['variant', 'HE-DA r', 'epoch s', 'x KD'],
                                 [[e['variant'], f"{e['he_da_rate']:g}", f"{e['epoch_s']:.1f}",
                                   f"{e['vs_kd']:.3f}" if e['vs_kd'] else 'n/a'] for e in ep])]
    lines += ['', markdown_table(
        ['target', 'measured', 'limit', 'status'],
        [[t['target'], 'n/a' if t['value'] is None else f"{t['value']:.3f}", t['note'], t['status']]
         for t in results['targets']])]
    return '\n'.join(lines)


def plot_step_times(results: Dict[str, Any], path: str) -> None:
    """Median step time per variant, labelled with its ratio to timm's LogitDistillationTask."""
    from _common import hbar_png
    ok = {k: v for k, v in results['variants'].items() if v.get('median_s')}
    base = ok.get(BASELINE, {}).get('median_s')
    c, m = results['config'], results['machine']
    labels = list(ok)
    values = [ok[k]['median_s'] * 1e3 for k in labels]
    texts = [f"{ok[k]['median_s'] * 1e3:.0f} ms" + (f" ({ok[k]['median_s'] / base:.2f}x)" if base else '')
             for k in labels]
    hbar_png(labels, values, path,
             title=f"step time, {c['teacher']} -> {c['student']}, batch {c['batch_size']}, {m['device_name']}",
             value_labels=texts, grey=(BASELINE, 'ce'),
             axis_note='median over repetitions; (x) = ratio to timm LogitDistillationTask')


# ----------------------------------------------------------------------------------------------------------

def profile(args: argparse.Namespace, runner: Runner) -> str:
    from torch.profiler import ProfilerActivity, profile as tprofile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == 'cuda' else [])
    runner.warmup(max(args.warmup, 1))
    with tprofile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.profile_steps):
            runner.step()
        _sync(runner.device)
    sort_by = 'self_cuda_time_total' if runner.device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort_by, row_limit=30)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    variants = [args.profile] if args.profile else list(args.variants)
    if args.compile:
        # every variant compiles its own student copy and teacher wrapper; the default recompile limit (8)
        # would silently leave the later variants running eager
        import torch._dynamo as dynamo
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 8 * (len(variants) + 2)))
                break  # torch >= 2.6 calls it recompile_limit (cache_size_limit is the old alias)
    missing = core_available() if (any(needs_core(v) for v in variants) or not args.tiny) else None
    if missing:
        raise RuntimeError(f'variants {[v for v in variants if needs_core(v)]} need timm_energykd.task / energy / '
                           f'temperature / mixing, which do not import here ({missing}); pass --variants ce timm_kd')

    teacher, student = create_models(args, device)
    batch = synthetic_batch(args, device, seed=args.seed)

    thresholds = calib_probe = loader = he_da_thresholds = None
    if any(needs_core(v) for v in variants):
        calib_probe, loader, thresholds, he_da_thresholds = calibrate(args, device, teacher, student)

    runners: Dict[str, Runner] = {}
    results: Dict[str, Any] = dict(machine=machine_info(), config=dict(
        setting='tiny' if args.tiny else args.setting, teacher=args.teacher, student=args.student,
        batch_size=args.batch_size, img_size=args.img_size, num_classes=args.num_classes, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, warmup=args.warmup, iters=args.iters,
        reps=args.reps, he_da_selection=args.he_da_selection, epoch_size=args.epoch_size,
        command=command_line(script='benchmarks/throughput.py') if args.argv is None
        else command_line(args.argv, 'benchmarks/throughput.py')), variants={})
    for name in variants:
        try:
            task = build_task(name, copy.deepcopy(student), teacher, device, thresholds, args.he_da_selection,
                              he_da_thresholds)
            task.train()
            if hasattr(task, 'teacher'):
                task.teacher.eval()  # timm 1.0.29's LogitDistillationTask.train() does not keep it in eval
            if args.compile:
                task.compile()
            runners[name] = Runner(name, task, args, device, batch)
        except Exception as e:
            results['variants'][name] = dict(error=f'build: {type(e).__name__}: {e}')
            print(f'[{name}] build failed: {type(e).__name__}: {e}', file=sys.stderr)

    if args.profile:
        if args.profile not in runners:
            raise RuntimeError(f'--profile {args.profile}: {results["variants"][args.profile]["error"]}')
        print(profile(args, runners[args.profile]))
        return results

    for name, runner in list(runners.items()):
        try:
            runner.warmup(args.warmup)
        except Exception as e:
            results['variants'][name] = dict(error=f'warmup: {type(e).__name__}: {e}')
            print(f'[{name}] warm-up failed: {type(e).__name__}: {e}', file=sys.stderr)
            del runners[name]
            if device.type == 'cuda':
                torch.cuda.empty_cache()

    names = list(runners)
    for rep in range(args.reps):
        k = rep % max(len(names), 1)
        for name in names[k:] + names[:k]:  # rotate the order every repetition
            runners[name].timed(args.iters)

    failed = results['variants']
    results['variants'] = {}
    for name in variants:  # in the order asked for
        if name in runners:
            r = runners[name]
            med = median(r.times)
            results['variants'][name] = dict(times_s=r.times, median_s=med, images_per_s=args.batch_size / med,
                                             peak_mem_mb=r.peak_mem_mb)
        else:
            results['variants'][name] = failed[name]

    if calib_probe is not None:
        results['calibration'] = time_calibration(args, device, calib_probe.teacher_logits, loader,
                                                  reps=max(args.reps, 1))
    results['targets'] = judge(results, args)
    results['epoch_table'] = epoch_table(results, args)
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    args.argv = argv
    results = run(args)
    if not args.profile:
        print(format_report(results, args))
        if args.json:
            write_json_atomic(args.json, results)
            print(f'\nwrote {args.json}')
        if args.png:
            plot_step_times(results, args.png)
            print(f'wrote {args.png}')
    return results


if __name__ == '__main__':
    main()
