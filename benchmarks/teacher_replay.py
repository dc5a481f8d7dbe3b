"""Teacher replay benchmark (issue 19): what a stored teacher saves, measured side by side in one run.

1. Step time, interleaved round by round on the same batches: a live Energy KD step (teacher forward +
   student forward / backward / SGD step), the same step replayed from a ``TeacherCacheSource`` store, and a
   student-only step (cross-entropy, no teacher). Ratios: live / student-only and replayed / student-only.
2. Sweep wall time: 4 Energy KD settings (student-side only: r, direction, gradation, loss weights) x 2 seeds
   through the trainer (``train_energykd.py`` flags), without the store (8 live runs) and with it (a store per
   seed, recorded by the first run of that seed, then replayed by the other 3).

    python benchmarks/teacher_replay.py            # CIFAR-like: cifar_resnet32x4 -> cifar_resnet8, 32 px
    python benchmarks/teacher_replay.py --tiny     # smoke test: test_resnet both, a few images
    python benchmarks/teacher_replay.py --json out.json

CPU or CUDA (``--device``). On a GPU the teacher's share of a step differs (docs/REPLAY.md).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SWEEP = (
    ('r0.2', ['--energy-rate', '0.2']),
    ('r0.3', ['--energy-rate', '0.3']),
    ('reverse', ['--temp-direction', 'reverse']),
    ('gradation', ['--temp-policy', 'gradation']),
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tiny', action='store_true', help='smoke test: tiny models, few images and steps')
    p.add_argument('--student', default=None, help='default cifar_resnet8 (tiny: test_resnet)')
    p.add_argument('--teacher', default=None, help='default cifar_resnet32x4 (tiny: test_resnet)')
    p.add_argument('--batch-size', type=int, default=None, help='default 64 (tiny 4)')
    p.add_argument('--num-classes', type=int, default=None, help='default 100 (tiny 4)')
    p.add_argument('--steps', type=int, default=None, help='timed rounds of the step benchmark (default 10; tiny 2)')
    p.add_argument('--sweep-images', type=int, default=None, help='images per class of the sweep data (default 8; tiny 2)')
    p.add_argument('--sweep-epochs', type=int, default=None, help='epochs of each sweep run (default 2; tiny 1)')
    p.add_argument('--no-sweep', action='store_true', help='step benchmark only')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results as JSON')
    args = p.parse_args(argv)
    t = args.tiny
    args.student = args.student or ('test_resnet' if t else 'cifar_resnet8')
    args.teacher = args.teacher or ('test_resnet' if t else 'cifar_resnet32x4')
    args.batch_size = args.batch_size or (4 if t else 64)
    args.num_classes = args.num_classes or (4 if t else 100)
    args.steps = args.steps or (2 if t else 10)
    args.sweep_images = args.sweep_images or (2 if t else 8)
    args.sweep_epochs = args.sweep_epochs or (1 if t else 2)
    if args.batch_size < 2 or args.steps < 1:
        p.error('--batch-size must be >= 2 and --steps >= 1')
    return args


# ------------------------------------------------------------------------------------------------------------
# 1. step times
# ------------------------------------------------------------------------------------------------------------

def _models(args, device):
    import timm
    import timm_energykd  # noqa: F401  (registers the CIFAR models)
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=args.num_classes).to(device)
    teacher = timm.create_model(args.teacher, num_classes=args.num_classes).to(device)
    return student, teacher


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def step_times(args, device) -> Dict[str, Any]:
    """Median seconds per step of live KD, replayed KD and student-only, interleaved per round."""
    import copy
    from timm_energykd.energy import EnergyThresholds
    from timm_energykd.task import EnergyDistillationTask
    from timm_energykd.teacher_source import TeacherCacheSource
    from timm_energykd.teacher_store import TeacherStore

    student, teacher = _models(args, device)
    n_batches = args.steps + 1  # one warm-up round
    g = torch.Generator().manual_seed(0)
    size = 32
    x = torch.randn(n_batches * args.batch_size, 3, size, size, generator=g)
    y = torch.randint(0, args.num_classes, (x.shape[0],), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True)
    thr = EnergyThresholds.from_energies(-4.0 * torch.logsumexp(torch.randn(64, args.num_classes) / 4.0, -1), 0.2)

    def make_task(s):
        t = EnergyDistillationTask(s, teacher, distill_loss='energy_kd', thresholds=thr, device=device)
        return t.to(device)

    tasks = {'live': make_task(copy.deepcopy(student)), 'replayed': make_task(copy.deepcopy(student))}
    ce_student = copy.deepcopy(student)
    ce = nn.CrossEntropyLoss()
    opts = {k: torch.optim.SGD(t.trainable_module.parameters(), lr=0.01, momentum=0.9) for k, t in tasks.items()}
    opts['student_only'] = torch.optim.SGD(ce_student.parameters(), lr=0.01, momentum=0.9)

    with tempfile.TemporaryDirectory() as tmp:
        fmt = {'dtype': 'float32', 'topk': None, 'num_classes': args.num_classes, 'energy_temperature': None}
        store = TeacherStore(tmp, {'bench': 1}, fmt)
        store.write_meta()
        rec = TeacherCacheSource(store, 'record', seed=0)
        rec.attach(make_task(copy.deepcopy(student)))
        rec.start_epoch(0, loader)
        with torch.no_grad():
            for step, (xb, yb) in enumerate(loader):
                rec.set_step(0, step)
                rec.task(xb.to(device), yb.to(device))
        rec.end_epoch(0)
        replay = TeacherCacheSource(store, 'replay', seed=0)
        replay.attach(tasks['replayed'])
        replay.start_epoch(0, loader)

        times: Dict[str, List[float]] = {k: [] for k in ('live', 'replayed', 'student_only')}
        tasks['live'].train()
        tasks['replayed'].train()
        ce_student.train()
        for step, (xb, yb) in enumerate(loader):
            xb, yb = xb.to(device), yb.to(device)
            replay.set_step(0, step)
            kinds = ('live', 'replayed', 'student_only')
            for kind in kinds[step % 3:] + kinds[:step % 3]:  # rotated: no kind always follows the teacher
                _sync(device)
                t0 = time.perf_counter()
                if kind == 'student_only':
                    loss = ce(ce_student(xb), yb)
                else:
                    loss = tasks[kind](xb, yb)['loss']
                opts[kind].zero_grad()
                loss.backward()
                opts[kind].step()
                _sync(device)
                if step > 0:  # round 0 warms up
                    times[kind].append(time.perf_counter() - t0)
        replay.end_epoch(0)
    med = {k: _common.median(v) for k, v in times.items()}
    return {
        'median_s': med,
        'live_over_student_only': med['live'] / med['student_only'],
        'replayed_over_student_only': med['replayed'] / med['student_only'],
        'live_over_replayed': med['live'] / med['replayed'],
        'rounds': args.steps,
    }


# ------------------------------------------------------------------------------------------------------------
# 2. sweep wall time
# ------------------------------------------------------------------------------------------------------------

def _quiet_main(argv):
    import logging
    from timm_energykd.train import trainer
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    for name in ('train', 'timm', 'timm_energykd'):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return trainer.main(argv)
    finally:
        root.setLevel(level)


def sweep(args, device) -> Dict[str, Any]:
    import timm
    import numpy as np
    from timm_energykd.demo import write_image_folder
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / 'data'
        rng = np.random.default_rng(0)
        names = [f'c{i:03d}' for i in range(args.num_classes)]
        for split, per_class in (('train', args.sweep_images), ('validation', 1)):
            y = np.repeat(np.arange(args.num_classes), per_class)
            x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)  # random images: timing only
            write_image_folder(data / split, x, y, names)
        torch.manual_seed(0)
        ckpt = tmp / 'teacher.pth.tar'
        torch.save({'state_dict': timm.create_model(args.teacher, num_classes=args.num_classes).state_dict()}, ckpt)
        base = [str(data), '--model', args.student, '--teacher', args.teacher, '--teacher-checkpoint', str(ckpt),
                '--img-size', '32', '--batch-size', str(args.batch_size), '--workers', '0', '--device', str(device),
                '--epochs', str(args.sweep_epochs), '--warmup-epochs', '0', '--opt', 'sgd', '--lr', '0.05',
                '--log-interval', '1000', '--distill-loss', 'energy_kd']
        runs = []
        walls = {'live': 0.0, 'store': 0.0}
        # interleaved (live, then store, for each run of the sweep): a load spike on a shared machine hits both
        for seed in (0, 1):
            for name, extra in SWEEP:
                for mode in ('live', 'store'):
                    argv = base + extra + ['--seed', str(seed), '--output', str(tmp / 'out'),
                                           '--experiment', f'{mode}-{name}-s{seed}']
                    if mode == 'store':
                        argv += ['--teacher-cache', str(tmp / f'store-s{seed}')]
                    t1 = time.perf_counter()
                    r = _quiet_main(argv)
                    wall = time.perf_counter() - t1
                    with open(os.path.join(r['output_dir'], 'summary.csv')) as f:
                        epochs = len(f.read().strip().splitlines()) - 1
                    replayed = bool(getattr(getattr(r['task'], 'teacher_source', None), 'replay', False))
                    runs.append({'mode': mode, 'setting': name, 'seed': seed, 'wall_s': wall,
                                 'epochs_trained': epochs, 'replayed': replayed})
                    walls[mode] += wall
        store_bytes = sum(f.stat().st_size for f in (tmp / 'store-s0').rglob('*') if f.is_file())
    return {'wall_s': walls, 'speedup': walls['live'] / walls['store'], 'runs': runs,
            'store_bytes_per_seed': store_bytes, 'num_images': args.sweep_images * args.num_classes}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = _common.machine_info()
    res: Dict[str, Any] = {'machine': info, 'command': _common.command_line(argv, 'benchmarks/teacher_replay.py'),
                           'config': {k: v for k, v in vars(args).items() if k != 'json'}}
    st = step_times(args, device)
    res['steps'] = st
    m = st['median_s']
    print(f"# Teacher replay benchmark ({info['date_utc']}, {info['device_name']}, torch {info['torch']}, "
          f"{info['torch_threads']} threads)")
    print(f'{args.teacher} -> {args.student}, batch {args.batch_size}, {args.num_classes} classes, 32 px, '
          f'median of {args.steps} interleaved rounds (order rotated)')
    print(_common.markdown_table(['step', 'ms', 'x student-only'], [
        ['live Energy KD', f"{m['live'] * 1e3:.1f}", f"{st['live_over_student_only']:.2f}"],
        ['replayed Energy KD', f"{m['replayed'] * 1e3:.1f}", f"{st['replayed_over_student_only']:.2f}"],
        ['student only (CE)', f"{m['student_only'] * 1e3:.1f}", '1.00']]))
    if not args.no_sweep:
        sw = sweep(args, device)
        res['sweep'] = sw
        print(f"\nSweep: {len(SWEEP)} Energy KD settings x 2 seeds, {sw['num_images']} images, "
              f'{args.sweep_epochs} epochs each')
        print(_common.markdown_table(['', 'wall s'], [
            ['live teacher (8 runs, summed)', f"{sw['wall_s']['live']:.1f}"],
            ['with --teacher-cache (2 recorded + 6 replayed, summed)', f"{sw['wall_s']['store']:.1f}"],
            ['speed-up', f"{sw['speedup']:.2f}x"]]))
        print(f"store size per seed: {sw['store_bytes_per_seed'] / 1e6:.2f} MB")
    if args.json:
        _common.write_json_atomic(args.json, res)
    return res


if __name__ == '__main__':
    main()
