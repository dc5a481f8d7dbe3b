"""Built-in offline demo: a procedurally generated dataset and a teacher -> KD / Energy KD comparison.

``python train_energykd.py --demo`` needs no dataset and no download. It

1. writes a small 10-class dataset of 32x32 images (coloured shapes and textures with random colours,
   positions, sizes and noise) as an ImageFolder under ``<output>/demo_data`` so the real data path is used,
2. trains a teacher, then distils a student with plain KD and with Energy KD (paper direction), calling
   the trainer's ``main`` with ordinary command lines (same code path as a real run, smaller sizes),
3. prints stage headers with the elapsed time, a results table with what it can and cannot show, writes the
   energy histogram PNG and saves the student (with the command that loads its trained weights).
"""
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ['CAVEAT', 'DEMO_CLASSES', 'DemoConfig', 'DEFAULT_DEMO', 'TINY_DEMO', 'make_shapes_dataset', 'write_image_folder',
           'make_demo_imagefolder', 'demo_commands', 'format_results', 'run_demo']

_logger = logging.getLogger(__name__)

DEMO_CLASSES = ('circle', 'square', 'diamond', 'ring', 'cross', 'triangle', 'h_stripes', 'v_stripes', 'checker',
                'diagonal')


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the offline demo (every field becomes an ordinary trainer flag).

    Args:
        teacher: Teacher architecture (one of the project's CIFAR models, registered by ``import timm_energykd``).
        student: Student architecture.
        teacher_epochs: Epochs of the plain teacher run.
        student_epochs: Epochs of each distillation run (KD and Energy KD).
        train_per_class: Generated train images per class.
        val_per_class: Generated validation images per class.
        img_size: Image side in pixels.
        num_classes: Number of shape classes (at most ``len(DEMO_CLASSES)``).
        batch_size: Batch size of every run.
        teacher_lr: SGD learning rate of the teacher run.
        student_lr: SGD learning rate of the distillation runs.
        energy_rate: Energy KD rate ``r`` (share of the train set in each of the low / high groups).
        noise: Std of the Gaussian pixel noise of the generated images (0..1 scale).
    """
    teacher: str = 'cifar_resnet14'
    student: str = 'cifar_resnet8'
    teacher_epochs: int = 12
    student_epochs: int = 6
    train_per_class: int = 120
    val_per_class: int = 40
    img_size: int = 32
    num_classes: int = 10
    batch_size: int = 32
    teacher_lr: float = 0.05
    student_lr: float = 0.1
    energy_rate: float = 0.3
    noise: float = 0.05


# Chosen so the whole demo takes about 3 minutes on 2 CPU cores (see docs/TRAINING.md for the measurement).
DEFAULT_DEMO = DemoConfig()
# The same pipeline at toy size, for tests (seconds, accuracy meaningless).
TINY_DEMO = DemoConfig(teacher='cifar_resnet8', student='cifar_resnet8', teacher_epochs=1, student_epochs=1,
                       train_per_class=4, val_per_class=2, img_size=16, num_classes=4, batch_size=8)


def _shape_mask(name: str, x: np.ndarray, y: np.ndarray, cx, cy, r, freq, phase) -> np.ndarray:
    """Boolean [N, H, W] masks for one class, vectorised over the N images."""
    dx, dy = x - cx, y - cy
    inside = np.maximum(np.abs(dx), np.abs(dy)) < r
    if name == 'circle':
        return dx ** 2 + dy ** 2 < r ** 2
    if name == 'square':
        return inside
    if name == 'diamond':
        return np.abs(dx) + np.abs(dy) < r
    if name == 'ring':
        d2 = dx ** 2 + dy ** 2
        return (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
    if name == 'cross':
        return ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r))
    if name == 'triangle':
        return (dy < r) & (dy > -r) & (np.abs(dx) < (dy + r) / 2)
    if name == 'h_stripes':
        return inside & (np.sin(y * freq + phase) > 0)
    if name == 'v_stripes':
        return inside & (np.sin(x * freq + phase) > 0)
    if name == 'checker':
        return inside & (np.sin(x * freq + phase) * np.sin(y * freq + phase) > 0)
    if name == 'diagonal':
        return inside & (np.sin((x + y) * freq * 0.7 + phase) > 0)
    raise ValueError(f'unknown demo class {name!r}')


def make_shapes_dataset(num_per_class: int, size: int = 32, num_classes: int = 10, seed: int = 0,
                        noise: float = 0.12):
    """Images [N, size, size, 3] uint8 and labels [N] of coloured shapes / textures with noise.

    Colours are random (not class cues); position, size and stripe frequency vary; Gaussian noise and a
    random background make some samples hard, so teacher energies spread out.
    """
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise ValueError(f'num_classes must be in [1, {len(DEMO_CLASSES)}], got {num_classes}')
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = xx[None], yy[None]
    images, labels = [], []
    n = num_per_class
    for c in range(num_classes):
        cx = rng.uniform(0.3, 0.7, (n, 1, 1)) * size
        cy = rng.uniform(0.3, 0.7, (n, 1, 1)) * size
        r = rng.uniform(0.18, 0.34, (n, 1, 1)) * size
        freq = rng.uniform(0.7, 1.1, (n, 1, 1)) * (32.0 / size)  # stripe period ~6-9 px at 32x32
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        mask = _shape_mask(DEMO_CLASSES[c], x, y, cx, cy, r, freq, phase)[..., None]
        fg = rng.uniform(0.0, 1.0, (n, 1, 1, 3))
        bg = rng.uniform(0.0, 1.0, (n, 1, 1, 3))
        bg = np.where(np.abs(fg - bg).sum(-1, keepdims=True) < 0.6, 1.0 - fg, bg)  # keep some contrast
        img = np.where(mask, fg, bg) + rng.normal(0.0, noise, (n, size, size, 3))
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
        labels.append(np.full(n, c, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def write_image_folder(root, images: np.ndarray, labels: np.ndarray, class_names) -> Path:
    """Write ``root/<class>/<i>.png`` (ImageFolder layout)."""
    root = Path(root)
    for c, name in enumerate(class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / class_names[int(lab)] / f'{i:05d}.png')
    return root


def make_demo_imagefolder(root, train_per_class: int = 120, val_per_class: int = 40,
                          size: int = 32, num_classes: int = 10, seed: int = 0, noise: float = 0.12) -> Path:
    """``root/train`` and ``root/validation`` ImageFolders of the shapes dataset (skipped when complete)."""
    root = Path(root)
    marker = root / '.complete'
    want = f'{train_per_class},{val_per_class},{size},{num_classes},{seed},{noise}'
    if marker.is_file() and marker.read_text() == want:
        return root
    names = list(DEMO_CLASSES[:num_classes])
    x, y = make_shapes_dataset(train_per_class, size, num_classes, seed=seed, noise=noise)
    write_image_folder(root / 'train', x, y, names)
    x, y = make_shapes_dataset(val_per_class, size, num_classes, seed=seed + 1, noise=noise)
    write_image_folder(root / 'validation', x, y, names)
    marker.write_text(want)
    return root


def _top1(result: Dict) -> float:
    m = result.get('eval_metrics') or {}
    return float(m.get('top1', float('nan')))


def demo_commands(data_dir, output_dir, cfg: DemoConfig = DEFAULT_DEMO, device: str = 'cpu', seed: int = 42,
                  teacher_checkpoint: Optional[str] = None, export_hub: Optional[str] = None) -> Dict[str, List[str]]:
    """The three trainer command lines of the demo (teacher, KD student, Energy KD student).

    They are ordinary ``train_energykd.py`` argument lists: paste one after ``python train_energykd.py`` to
    rerun that step by hand. The students use the paper's CIFAR loss weights (0.1 CE + 0.9 KD, T=4).
    """
    common = [
        str(data_dir), '--train-split', 'train', '--val-split', 'validation', '--img-size', str(cfg.img_size),
        '--num-classes', str(cfg.num_classes), '--device', device, '--workers', '0',
        '--batch-size', str(cfg.batch_size), '--opt', 'sgd', '--momentum', '0.9', '--weight-decay', '5e-4',
        '--sched', 'cosine', '--warmup-epochs', '0', '--output', str(output_dir),
        # light augmentation (colours are random already): a mild crop + flip, as in the CIFAR recipes
        '--scale', '0.8', '1.0', '--ratio', '0.9', '1.1', '--color-jitter', '0',
        '--log-interval', '20', '--seed', str(seed), '--checkpoint-hist', '1',
    ]
    teacher = common + ['--model', cfg.teacher, '--epochs', str(cfg.teacher_epochs), '--lr', str(cfg.teacher_lr),
                        '--experiment', 'teacher']
    distill = common + [
        '--model', cfg.student, '--epochs', str(cfg.student_epochs), '--lr', str(cfg.student_lr),
        '--teacher', cfg.teacher, '--teacher-checkpoint', str(teacher_checkpoint or 'TEACHER_CKPT'),
        '--task-loss-weight', '0.1', '--distill-loss-weight', '0.9', '--kd-temperature', '4',
        '--energy-rate', str(cfg.energy_rate)]
    kd = distill + ['--distill-loss', 'kd', '--experiment', 'student-kd']
    ekd = distill + ['--distill-loss', 'energy_kd', '--temp-direction', 'paper', '--experiment', 'student-energy-kd']
    if export_hub:
        ekd += ['--export-hub', str(export_hub)]
    return dict(teacher=teacher, kd=kd, energy_kd=ekd)


def _uses_energy_temperature(result: Dict) -> bool:
    return bool(getattr(result.get('task'), 'uses_energy_temperature', False))


def _energy_cols(result: Dict, output_dir_key: str = 'output_dir') -> str:
    """Low / high share and mean temperature of the last epoch, from the run's summary.csv.

    Empty for runs whose loss does not use the energy temperatures (the teacher, plain KD): there the
    groups and the temperature change nothing.
    """
    import csv
    if not _uses_energy_temperature(result):
        return ''
    path = os.path.join(result.get(output_dir_key) or '', 'summary.csv')
    if not os.path.isfile(path):
        return ''
    with open(path) as f:
        rows = list(csv.DictReader(f))
    row = rows[-1] if rows else {}
    try:
        return (f'{100 * float(row["train_frac_low"]):>5.0f}%/{100 * float(row["train_frac_high"]):>3.0f}%'
                f'{float(row["train_temp_mean"]):>8.2f}')
    except (KeyError, ValueError):
        return ''


CAVEAT = ('What this can show: that the pipeline works end to end. What it cannot: whether Energy KD beats KD. '
          'The gap between the two student rows is one seed on a small synthetic data set, inside seed-to-seed '
          'noise (docs/RESULTS.md has the multi-seed numbers).')


def _stage(index: int, name: str, detail: str, t0: float) -> float:
    print(f'\n=== demo stage {index}/3: {name} ({detail}); {time.time() - t0:.0f} s elapsed ===', flush=True)
    return time.time()


def _stage_done(index: int, name: str, started: float, t0: float) -> None:
    print(f'=== demo stage {index}/3 done: {name} in {time.time() - started:.1f} s '
          f'({time.time() - t0:.0f} s elapsed) ===', flush=True)


def format_results(rows: Sequence, total_s: float, num_classes: int) -> str:
    """The demo's results table (one line per run)."""
    lines = ['', f'{"run":<20}{"model":<16}{"top-1":>8}{"top-5":>8}{"time (s)":>10}   {"low/high":>10}{"mean T":>8}']
    for name, model, r in rows:
        m = r.get('eval_metrics') or {}
        lines.append(f'{name:<20}{model:<16}{_top1(r):>8.2f}{float(m.get("top5", float("nan"))):>8.2f}'
                     f'{r["time_s"]:>10.1f}   {_energy_cols(r)}')
    lines.append(f'total demo time: {total_s:.0f} s (chance top-1: {100 / num_classes:.0f}%)')
    lines.append(CAVEAT)
    return '\n'.join(lines)


def run_demo(args, train_fn: Callable[[List[str]], Dict], config: Optional[DemoConfig] = None) -> Dict[str, Dict]:
    """Run the demo; ``train_fn`` is the trainer's ``main(argv)``. Returns the per-run result dicts.

    ``config`` defaults to ``DEFAULT_DEMO``; ``args`` supplies ``output``, ``device`` and ``seed``.
    """
    import torch

    cfg = config or DEFAULT_DEMO
    t0 = time.time()
    base = Path(args.output or './output/demo') / datetime.now().strftime('%Y%m%d-%H%M%S')
    data = make_demo_imagefolder(base / 'demo_data', train_per_class=cfg.train_per_class,
                                 val_per_class=cfg.val_per_class, size=cfg.img_size, num_classes=cfg.num_classes,
                                 seed=args.seed, noise=cfg.noise)
    device = args.device if (str(args.device).startswith('cuda') and torch.cuda.is_available()) else 'cpu'
    saved = base / 'student-energy-kd-hub'
    _logger.info(f'Demo: {cfg.num_classes}-class shapes data in {data} ({cfg.train_per_class} train / '
                 f'{cfg.val_per_class} val images per class); teacher {cfg.teacher}, student {cfg.student}')
    cmds = demo_commands(data, base, cfg, device=device, seed=args.seed)
    results: Dict[str, Dict] = {}
    started = _stage(1, f'teacher {cfg.teacher}', f'plain training without a teacher, {cfg.teacher_epochs} epochs', t0)
    results['teacher'] = train_fn(cmds['teacher'])
    _stage_done(1, 'teacher', started, t0)
    teacher_ckpt = os.path.join(results['teacher']['output_dir'], 'model_best.pth.tar')
    cmds = demo_commands(data, base, cfg, device=device, seed=args.seed, teacher_checkpoint=teacher_ckpt,
                         export_hub=saved)
    for index, key, label in ((2, 'kd', 'plain KD'), (3, 'energy_kd', 'Energy KD (paper direction)')):
        started = _stage(index, f'student {cfg.student}', f'{label} from the teacher, {cfg.student_epochs} epochs', t0)
        results[key] = train_fn(cmds[key])
        _stage_done(index, f'student, {label}', started, t0)

    from .plots import plot_energy_histogram
    plot_path = base / 'energy_histogram.png'
    thresholds = results['energy_kd'].get('thresholds')
    if thresholds is not None:
        plot_energy_histogram(thresholds, plot_path, title=f'Teacher ({cfg.teacher}) energy on the demo train set')

    total = time.time() - t0
    rows = [('teacher', cfg.teacher, results['teacher']), ('student, KD', cfg.student, results['kd']),
            ('student, Energy KD', cfg.student, results['energy_kd'])]
    table = format_results(rows, total, cfg.num_classes)
    load = f"import timm, timm_energykd; timm.create_model('local-dir:{saved}', pretrained=True)"
    print('\n'.join([table, f'energy histogram: {plot_path}',
                      f"training curves, per-energy-bin report: {results['energy_kd']['output_dir']}",
                      f'student saved to: {saved}', f'load it with: {load}', f'runs: {base}']))
    results['summary'] = dict(total_s=total, plot=str(plot_path), saved=str(saved), base=str(base), table=table,
                              load=load)
    return results
