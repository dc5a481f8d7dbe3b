#!/usr/bin/env python3
"""Accuracy protocol: one teacher, then every student variant with the same budget over several seeds.

Each run is `train_energykd.py` with the same base arguments plus the variant's flags; top-1 (final and
best epoch) is read from the run's summary.csv. The result is a markdown table (mean +- std over seeds),
a PNG bar plot and a JSON file in --output.

    python benchmarks/prepare_cifar10.py --out /tmp/cifar10
    python benchmarks/accuracy.py --data-dir /tmp/cifar10 --num-classes 10 --epochs 30 --seeds 0 1 2 \
        --output runs/accuracy-cifar10 --train-args "--amp --amp-dtype bfloat16 --channels-last"
    python benchmarks/accuracy.py --tiny          # CPU smoke run: tiny generated ImageFolder, 1 epoch, < 60 s

A finished run (its summary.csv has --epochs rows) is kept and not run again, so an interrupted session
continues where it stopped; --force reruns everything.
"""
import argparse
import csv
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    REPO_ROOT, command_line, hbar_png, machine_info, markdown_table, mean_std, write_json_atomic,
    write_text_atomic,
)

TRAINER = REPO_ROOT / 'train_energykd.py'

# name -> trainer flags (on top of the base arguments; None = no teacher)
BASE_VARIANTS: Dict[str, Optional[List[str]]] = {
    'ce': None,
    'kd': ['--distill-loss', 'kd'],
    'energy_kd': ['--distill-loss', 'energy_kd', '--temp-direction', 'paper'],
    'energy_kd_reverse': ['--distill-loss', 'energy_kd', '--temp-direction', 'reverse'],
    'dkd': ['--distill-loss', 'dkd'],
    'energy_dkd': ['--distill-loss', 'energy_dkd'],
    'gradation': ['--distill-loss', 'energy_kd', '--temp-policy', 'gradation'],
    # timm's own CutMix on every batch (the teacher sees the mixed images), the paper's "100%" row
    'kd_cutmix': ['--distill-loss', 'kd', '--cutmix', '1.0'],
}
DEFAULT_HE_DA_RATES = (0.2, 0.5)

TINY = dict(teacher='test_resnet', student='test_efficientnet', num_classes=4, img_size=32, batch_size=8,
            epochs=1, seeds=[0], train_per_class=8, val_per_class=4)


def he_da_variant(rate: float) -> str:
    return f'kd_heda_r{rate:g}'


def variant_flags(args: argparse.Namespace) -> Dict[str, Optional[List[str]]]:
    """All variants of this run, in table order."""
    table: Dict[str, Optional[List[str]]] = {}
    for name, flags in BASE_VARIANTS.items():
        if name == 'kd_cutmix':
            for r in args.he_da_rates:
                table[he_da_variant(r)] = ['--distill-loss', 'kd', '--he-da', 'cutmix', '--he-da-rate', f'{r:g}',
                                           '--he-da-selection', 'threshold']
        table[name] = flags
    for loss in args.extra_losses:
        table[loss] = ['--distill-loss', loss]
    if args.variants:
        unknown = [v for v in args.variants if v not in table]
        if unknown:
            raise ValueError(f'--variants: unknown {unknown}; expected some of: {" ".join(table)}')
        table = {k: v for k, v in table.items() if k in args.variants}
    return table


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=None,
                   help='ImageFolder root with train/ and validation/ (or val/); see prepare_cifar10.py')
    p.add_argument('--tiny', action='store_true',
                   help='CPU smoke run: generated tiny ImageFolder, 1 epoch, timm test models, 1 seed')
    p.add_argument('--output', default=None, help='results folder (default: ./output/accuracy)')
    p.add_argument('--teacher', default='cifar_resnet32x4', help='teacher model name')
    p.add_argument('--student', default='cifar_resnet8x4', help='student model name')
    p.add_argument('--teacher-checkpoint', default=None,
                   help='use this trained teacher instead of training one first')
    p.add_argument('--teacher-epochs', type=int, default=None, help='teacher budget (default: --epochs)')
    p.add_argument('--teacher-seed', type=int, default=0)
    p.add_argument('--num-classes', type=int, default=None, help='default: the class folders in train/')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=240)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--imbalance-factor', type=float, default=None,
                   help='long-tailed train set, passed to the trainer (0.01 = imbalance ratio 100)')
    p.add_argument('--he-da-rates', type=float, nargs='+', default=list(DEFAULT_HE_DA_RATES),
                   help='KD + HE-DA rates (default 0.2 0.5)')
    p.add_argument('--extra-losses', nargs='+', default=[], metavar='LOSS',
                   help='more registered distillation losses to run as students (e.g. kd_ls dkd_ls wttm r2kd)')
    p.add_argument('--variants', nargs='+', default=None, help='run only these variants (names as in the table)')
    p.add_argument('--train-args', default='',
                   help='extra trainer flags for every run, one quoted string, e.g. "--amp --amp-dtype bfloat16"')
    p.add_argument('--distill-args', default='',
                   help='extra trainer flags for the runs with a teacher only, e.g. "--task-loss-weight 0.1 '
                        '--distill-loss-weight 0.9"')
    p.add_argument('--jobs', type=int, default=1,
                   help='student runs at once (subprocess launcher; small models leave a big GPU mostly idle)')
    p.add_argument('--launcher', choices=['subprocess', 'inprocess'], default=None,
                   help='subprocess (default): one python per run; inprocess: train_energykd.main(argv) '
                        '(default with --tiny, saves the import time)')
    p.add_argument('--python', default=sys.executable, help='interpreter for subprocess runs')
    p.add_argument('--force', action='store_true', help='rerun runs that already finished')
    p.add_argument('--report-only', action='store_true',
                   help='launch nothing: tabulate the runs already finished in --output (e.g. after a time limit)')
    p.add_argument('--dry-run', action='store_true', help='print the trainer commands and stop')
    args = p.parse_args(argv)
    _resolve_args(args)
    return args


def _resolve_args(args: argparse.Namespace) -> None:
    if args.tiny:
        args.teacher, args.student = TINY['teacher'], TINY['student']
        args.img_size, args.batch_size, args.epochs = TINY['img_size'], TINY['batch_size'], TINY['epochs']
        args.seeds = TINY['seeds']
        # no loader processes for 32 images; no LR warm-up in a 1-epoch run
        args.train_args = ' '.join(['--workers 0 --warmup-epochs 0', args.train_args]).strip()
        args.launcher = args.launcher or 'inprocess'
        if args.output is None:
            args.output = tempfile.mkdtemp(prefix='energykd-accuracy-tiny-')
    args.launcher = args.launcher or 'subprocess'
    args.output = args.output or os.path.join('output', 'accuracy')
    args.teacher_epochs = args.teacher_epochs or args.epochs
    for name in ('epochs', 'teacher_epochs', 'batch_size', 'img_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")}: expected a positive integer, got {getattr(args, name)}')
    for r in args.he_da_rates:
        if not 0.0 < r <= 0.5:
            raise ValueError(f'--he-da-rates: expected rates in (0, 0.5], got {r}')
    if args.imbalance_factor is not None and not 0.0 < args.imbalance_factor <= 1.0:
        raise ValueError(f'--imbalance-factor: expected a value in (0, 1], got {args.imbalance_factor}')
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f'--seeds: repeated seeds {args.seeds}')
    if args.teacher_checkpoint and not os.path.isfile(args.teacher_checkpoint):
        raise FileNotFoundError(f'--teacher-checkpoint: no such file {args.teacher_checkpoint}')
    if not args.tiny:
        if not args.data_dir:
            raise ValueError('--data-dir: required (an ImageFolder with train/ and validation/ or val/), or use --tiny')
        _check_data_dir(args.data_dir)
    args.train_args_list = shlex.split(args.train_args)
    args.distill_args_list = shlex.split(args.distill_args)
    if args.jobs < 1:
        raise ValueError(f'--jobs: expected a positive integer, got {args.jobs}')
    if args.jobs > 1 and args.launcher == 'inprocess':
        raise ValueError('--jobs: parallel runs need --launcher subprocess')
    variant_flags(args)  # validates --variants / --extra-losses names early


def _check_data_dir(data_dir: str) -> str:
    """The validation split folder name; raises when the ImageFolder layout is not there."""
    root = Path(data_dir)
    if not (root / 'train').is_dir():
        raise FileNotFoundError(f'--data-dir: {root}/train not found (expected an ImageFolder with train/ and '
                                f'validation/ or val/)')
    for split in ('validation', 'val'):
        if (root / split).is_dir():
            return split
    raise FileNotFoundError(f'--data-dir: neither {root}/validation nor {root}/val found')


def count_classes(data_dir: str) -> int:
    return sum(1 for p in (Path(data_dir) / 'train').iterdir() if p.is_dir())


def make_tiny_imagefolder(root: os.PathLike, num_classes: int = 4, train_per_class: int = 8,
                          val_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A small learnable ImageFolder: each class a distinct mean colour plus noise, PNG files."""
    import numpy as np
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, 3))
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c in range(num_classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i:03d}.png')
    return root


# ----------------------------------------------------------------------------------------------------------
# runs

def base_argv(args: argparse.Namespace, data_dir: str, val_split: str, num_classes: int) -> List[str]:
    argv = [data_dir, '--val-split', val_split, '--num-classes', str(num_classes),
            '--img-size', str(args.img_size), '--batch-size', str(args.batch_size), '--lr', str(args.lr),
            '--output', str(Path(args.output) / 'runs')]
    if args.imbalance_factor is not None:
        argv += ['--imbalance-factor', f'{args.imbalance_factor:g}']
    return argv + args.train_args_list


def teacher_argv(args, base: List[str]) -> List[str]:
    return base + ['--model', args.teacher, '--epochs', str(args.teacher_epochs), '--seed', str(args.teacher_seed),
                   '--experiment', f'teacher-s{args.teacher_seed}']


def student_argv(args, base: List[str], name: str, flags: Optional[List[str]], seed: int,
                 teacher_ckpt: str) -> List[str]:
    argv = base + ['--model', args.student, '--epochs', str(args.epochs), '--seed', str(seed),
                   '--experiment', f'{name}-s{seed}']
    if flags is not None:
        argv += ['--teacher', args.teacher, '--teacher-checkpoint', teacher_ckpt] + args.distill_args_list + flags
    return argv


def read_summary(path: os.PathLike) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def run_result(run_dir: Path, epochs: int) -> Optional[Dict[str, Any]]:
    """Final and best eval top-1 of a finished run, or None if it has not finished."""
    summary = run_dir / 'summary.csv'
    if not summary.is_file():
        return None
    rows = read_summary(summary)
    if len(rows) < epochs or not rows or 'eval_top1' not in rows[-1]:
        return None
    top1 = [float(r['eval_top1']) for r in rows]
    return dict(final_top1=top1[-1], best_top1=max(top1), epochs=len(rows))


def launch(args: argparse.Namespace, argv: List[str], log_path: Path) -> int:
    """Run the trainer once; its output goes to log_path. Returns the exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if args.launcher == 'subprocess':
        with open(log_path, 'w') as log:
            proc = subprocess.run([args.python, str(TRAINER)] + argv, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=str(REPO_ROOT))
        return proc.returncode
    # in-process: the trainer's main(argv); its logging goes wherever it configures it
    import importlib
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    trainer = importlib.import_module('timm_energykd.train.trainer')
    try:
        trainer.main(argv)
    except SystemExit as e:  # argparse errors / explicit exits
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception:
        import traceback
        log_path.write_text(traceback.format_exc())
        print(traceback.format_exc(limit=-3), file=sys.stderr)
        return 1
    return 0


def run_one(args: argparse.Namespace, name: str, argv: List[str], epochs: int) -> Dict[str, Any]:
    experiment = argv[argv.index('--experiment') + 1]
    run_dir = Path(args.output) / 'runs' / experiment
    log_path = Path(args.output) / 'logs' / f'{experiment}.log'
    done = None if args.force else run_result(run_dir, epochs)
    record: Dict[str, Any] = dict(variant=name, experiment=experiment, run_dir=str(run_dir),
                                  command=' '.join(['python', 'train_energykd.py'] + [shlex.quote(a) for a in argv]))
    if done is not None:
        print(f'[{experiment}] finished before, kept: final top-1 {done["final_top1"]:.2f}')
        return {**record, **done, 'status': 'kept'}
    if args.report_only:
        return {**record, 'status': 'missing'}
    if run_dir.exists():
        # an unfinished or forced run: timm appends to summary.csv, so start clean (the old one is kept aside)
        stale = run_dir.with_name(f'{run_dir.name}.stale-{int(time.time())}')
        run_dir.rename(stale)
    print(f'[{experiment}] running ...', flush=True)
    t0 = time.time()
    rc = launch(args, argv, log_path)
    wall = time.time() - t0
    res = run_result(run_dir, epochs)
    if rc != 0 or res is None:
        print(f'[{experiment}] FAILED (exit {rc}); see {log_path}', flush=True)
        return {**record, 'status': 'failed', 'returncode': rc, 'wall_s': wall, 'log': str(log_path)}
    print(f'[{experiment}] final top-1 {res["final_top1"]:.2f}, best {res["best_top1"]:.2f} ({wall:.0f} s)',
          flush=True)
    return {**record, **res, 'status': 'ran', 'wall_s': wall}


def aggregate(runs: List[Dict[str, Any]], order: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for name in order:
        ok = [r for r in runs if r['variant'] == name and r['status'] in ('ran', 'kept')]
        failed = [r for r in runs if r['variant'] == name and r['status'] in ('failed', 'missing')]
        fm, fs = mean_std([r['final_top1'] for r in ok])
        bm, bs = mean_std([r['best_top1'] for r in ok])
        rows.append(dict(variant=name, n=len(ok), failed=len(failed), final_mean=fm, final_std=fs,
                         best_mean=bm, best_std=bs, finals=[r['final_top1'] for r in ok]))
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    def pm(m, s):
        return 'n/a' if m != m else f'{m:.2f} ± {s:.2f}'
    return markdown_table(
        ['variant', 'seeds', 'final top-1 (mean ± std)', 'best top-1 (mean ± std)', 'final per seed', 'failed or missing'],
        [[r['variant'], r['n'], pm(r['final_mean'], r['final_std']), pm(r['best_mean'], r['best_std']),
          ' '.join(f'{v:.2f}' for v in r['finals']), r['failed'] or ''] for r in rows])


def bar_plot(rows: List[Dict[str, Any]], path: os.PathLike, title: str) -> None:
    """Horizontal bars of final top-1 mean with a ±std whisker; Pillow only."""
    rows = [r for r in rows if r['n'] > 0]
    if not rows:
        hbar_png([], [], path, title + ' (no finished runs)')
        return
    hi = max(r['final_mean'] + r['final_std'] for r in rows)
    lo = min(r['final_mean'] - r['final_std'] for r in rows)
    # bars start a little below the lowest value so differences of a few points stay visible
    axis_min = max(0.0, lo - max(2.0, 0.25 * (hi - lo)))
    hbar_png([r['variant'] for r in rows], [r['final_mean'] for r in rows], path, title,
             errors=[r['final_std'] for r in rows], axis_min=axis_min, grey=('ce', 'teacher'),
             value_labels=[f"{r['final_mean']:.2f} ± {r['final_std']:.2f}" for r in rows],
             axis_note=f'top-1 (%), axis from {axis_min:.1f}; whisker: ± std over seeds')


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.tiny:
        data_dir = str(make_tiny_imagefolder(Path(args.output) / 'data', num_classes=TINY['num_classes'],
                                             train_per_class=TINY['train_per_class'],
                                             val_per_class=TINY['val_per_class'], size=TINY['img_size']))
    else:
        data_dir = args.data_dir
    val_split = _check_data_dir(data_dir)
    num_classes = args.num_classes or count_classes(data_dir)
    base = base_argv(args, data_dir, val_split, num_classes)
    variants = variant_flags(args)
    needs_teacher = any(f is not None for f in variants.values())

    if args.dry_run:
        if needs_teacher and not args.teacher_checkpoint:
            print('python train_energykd.py ' + ' '.join(shlex.quote(a) for a in teacher_argv(args, base)))
        ckpt = args.teacher_checkpoint or str(Path(args.output) / 'runs' / f'teacher-s{args.teacher_seed}' /
                                              'model_best.pth.tar')
        for seed in args.seeds:
            for name, flags in variants.items():
                print('python train_energykd.py ' + ' '.join(
                    shlex.quote(a) for a in student_argv(args, base, name, flags, seed, ckpt)))
        return {}

    if not TRAINER.is_file():
        raise FileNotFoundError(f'trainer not found: {TRAINER} (the accuracy benchmark runs train_energykd.py)')

    runs: List[Dict[str, Any]] = []
    teacher_record = None
    ckpt = args.teacher_checkpoint
    if needs_teacher and not ckpt:
        teacher_record = run_one(args, 'teacher', teacher_argv(args, base), args.teacher_epochs)
        runs.append(teacher_record)
        ckpt = str(Path(teacher_record['run_dir']) / 'model_best.pth.tar')
        if args.report_only and teacher_record['status'] == 'missing':
            pass
        elif teacher_record['status'] == 'failed' or not os.path.isfile(ckpt):
            raise RuntimeError(f'teacher run failed or wrote no {ckpt}; see {teacher_record.get("log")}')
    # seeds outermost: a cut-short session still has every variant at seed 0
    jobs = [(name, student_argv(args, base, name, flags, seed, ckpt))
            for seed in args.seeds for name, flags in variants.items()]
    if args.jobs == 1:
        runs += [run_one(args, name, argv, args.epochs) for name, argv in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job is a trainer subprocess
            runs += list(pool.map(lambda j: run_one(args, j[0], j[1], args.epochs), jobs))

    order = (['teacher'] if teacher_record else []) + list(variants)
    rows = aggregate(runs, order)
    table = format_table(rows)
    out = Path(args.output)
    title = (f'{args.student} <- {args.teacher}, {num_classes} classes, {args.epochs} epochs, '
             f'{len(args.seeds)} seed(s): final top-1')
    bar_plot(rows, out / 'accuracy.png', title)
    results = dict(machine=machine_info(), command=command_line(args.argv, 'benchmarks/accuracy.py'),
                   config=dict(data_dir=data_dir, teacher=args.teacher, student=args.student,
                               teacher_checkpoint=ckpt, num_classes=num_classes, epochs=args.epochs,
                               teacher_epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr,
                               img_size=args.img_size, seeds=args.seeds, imbalance_factor=args.imbalance_factor,
                               train_args=args.train_args, base_argv=base),
                   rows=rows, runs=runs)
    write_json_atomic(out / 'results.json', results)
    write_text_atomic(out / 'results.md', f'# {title}\n\n{table}\n')
    print(table)
    print(f'\nwrote {out / "results.md"}, {out / "results.json"}, {out / "accuracy.png"}')
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == '__main__':
    main()
