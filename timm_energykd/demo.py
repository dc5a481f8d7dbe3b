"""Built-in offline demo: a procedurally generated dataset and a teacher -> KD / Energy KD comparison.

``python train_energykd.py --demo`` needs no dataset and no download. It

1. writes a small 10-class dataset of 32x32 images (coloured shapes and textures with random colours,
   positions, sizes and noise) as an ImageFolder under ``<output>/demo_data`` so the real data path is used,
2. trains a teacher, then distils a student with plain KD and with Energy KD (paper direction), calling
   the trainer's ``main`` with ordinary command lines (same code path as a real run, smaller sizes),
3. prints a results table, writes the energy histogram PNG and saves the student.
"""
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from PIL import Image

__all__ = ['DEMO_CLASSES', 'make_shapes_dataset', 'write_image_folder', 'make_demo_imagefolder', 'run_demo']

_logger = logging.getLogger(__name__)

DEMO_CLASSES = ('circle', 'square', 'diamond', 'ring', 'cross', 'triangle', 'h_stripes', 'v_stripes', 'checker',
                'diagonal')

# Demo sizes, chosen so the whole demo takes about 3 minutes on 2 CPU cores.
DEMO_TEACHER = 'resnet18'
DEMO_STUDENT = 'test_resnet'
DEMO_TEACHER_EPOCHS = 6
DEMO_STUDENT_EPOCHS = 6
DEMO_TRAIN_PER_CLASS = 120
DEMO_VAL_PER_CLASS = 40


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


def make_demo_imagefolder(root, train_per_class: int = DEMO_TRAIN_PER_CLASS, val_per_class: int = DEMO_VAL_PER_CLASS,
                          size: int = 32, num_classes: int = 10, seed: int = 0) -> Path:
    """``root/train`` and ``root/validation`` ImageFolders of the shapes dataset (skipped when complete)."""
    root = Path(root)
    marker = root / '.complete'
    want = f'{train_per_class},{val_per_class},{size},{num_classes},{seed}'
    if marker.is_file() and marker.read_text() == want:
        return root
    names = list(DEMO_CLASSES[:num_classes])
    x, y = make_shapes_dataset(train_per_class, size, num_classes, seed=seed)
    write_image_folder(root / 'train', x, y, names)
    x, y = make_shapes_dataset(val_per_class, size, num_classes, seed=seed + 1)
    write_image_folder(root / 'validation', x, y, names)
    marker.write_text(want)
    return root


def _top1(result: Dict) -> float:
    m = result.get('eval_metrics') or {}
    return float(m.get('top1', float('nan')))


def run_demo(args, train_fn: Callable[[List[str]], Dict]) -> Dict[str, Dict]:
    """Run the demo; ``train_fn`` is the trainer's ``main(argv)``. Returns the per-run result dicts."""
    import torch

    t0 = time.time()
    base = Path(args.output or './output/demo') / datetime.now().strftime('%Y%m%d-%H%M%S')
    data = make_demo_imagefolder(base / 'demo_data')
    device = args.device if torch.cuda.is_available() else 'cpu'
    common = [
        str(data), '--train-split', 'train', '--val-split', 'validation', '--img-size', '32',
        '--device', device, '--workers', '0', '--batch-size', '64', '--opt', 'sgd', '--lr', '0.05',
        '--momentum', '0.9', '--weight-decay', '5e-4', '--sched', 'cosine', '--warmup-epochs', '0',
        '--scale', '0.6', '1.0', '--output', str(base), '--log-interval', '10', '--seed', str(args.seed),
        '--checkpoint-hist', '1',
    ]
    _logger.info(f'Demo: data in {data}; teacher {DEMO_TEACHER}, student {DEMO_STUDENT}')
    results: Dict[str, Dict] = {}
    results['teacher'] = train_fn(common + ['--model', DEMO_TEACHER, '--epochs', str(DEMO_TEACHER_EPOCHS),
                                            '--experiment', 'teacher'])
    teacher_ckpt = os.path.join(results['teacher']['output_dir'], 'model_best.pth.tar')
    distill = common + ['--model', DEMO_STUDENT, '--epochs', str(DEMO_STUDENT_EPOCHS), '--teacher', DEMO_TEACHER,
                        '--teacher-checkpoint', teacher_ckpt, '--task-loss-weight', '0.1',
                        '--distill-loss-weight', '0.9', '--kd-temperature', '4']
    results['kd'] = train_fn(distill + ['--distill-loss', 'kd', '--experiment', 'student-kd'])
    ekd = distill + ['--distill-loss', 'energy_kd', '--temp-direction', 'paper', '--experiment', 'student-energy-kd']
    try:
        from . import hub  # noqa: F401
        ekd += ['--export-hub', str(base / 'student-energy-kd-hub')]
        saved = base / 'student-energy-kd-hub'
    except ImportError:
        saved = Path(results.get('kd', {}).get('output_dir', base)).parent / 'student-energy-kd' / 'model_best.pth.tar'
    results['energy_kd'] = train_fn(ekd)

    from .plots import plot_energy_histogram
    plot_path = base / 'energy_histogram.png'
    thresholds = results['energy_kd'].get('thresholds')
    if thresholds is not None:
        plot_energy_histogram(thresholds, plot_path)

    total = time.time() - t0
    rows = [('teacher', DEMO_TEACHER, results['teacher']), ('KD', DEMO_STUDENT, results['kd']),
            ('Energy KD (paper)', DEMO_STUDENT, results['energy_kd'])]
    lines = ['', f'{"run":<20}{"model":<14}{"top-1":>8}{"time (s)":>10}']
    for name, model, r in rows:
        lines.append(f'{name:<20}{model:<14}{_top1(r):>8.2f}{r["time_s"]:>10.1f}')
    lines += [f'total demo time: {total:.0f} s', f'energy histogram: {plot_path}', f'student saved to: {saved}',
              f'runs: {base}']
    print('\n'.join(lines))
    results['summary'] = dict(total_s=total, plot=str(plot_path), saved=str(saved), base=str(base))
    return results
