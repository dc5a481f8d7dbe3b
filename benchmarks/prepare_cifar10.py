#!/usr/bin/env python3
"""Unpack the CIFAR-10 JPEG archive (shared/data/cifar10-jpeg) into an ImageFolder for the trainer.

    python benchmarks/prepare_cifar10.py --npz ../shared/data/cifar10-jpeg/cifar10_canonical_order_jpeg.npz \
        --out /tmp/cifar10

writes /tmp/cifar10/train/<class>/<index>.jpg (50,000) and /tmp/cifar10/validation/<class>/<index>.jpg
(10,000). Each file is the archive's JPEG bytes as-is (no re-encoding), named by its canonical index
zero-padded, so an ImageFolder lists each class in canonical order. The archive's images went through
JPEG once (lossy; see shared/data/SOURCES.md). A long-tailed subset is the trainer's job
(`--imbalance-factor 0.01` for imbalance ratio 100), not this script's.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg' / \
    'cifar10_canonical_order_jpeg.npz'
SPLITS = {'train': 'train', 'test': 'validation'}  # archive prefix -> ImageFolder split folder


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--npz', default=str(DEFAULT_NPZ), help=f'the archive (default: {DEFAULT_NPZ})')
    p.add_argument('--out', required=True, help='output folder; gets train/ and validation/')
    p.add_argument('--per-class', type=int, default=None,
                   help='keep only the first N images of each class in each split (quick subsets)')
    p.add_argument('--overwrite', action='store_true', help='rewrite files that already exist')
    args = p.parse_args(argv)
    if not os.path.isfile(args.npz):
        raise FileNotFoundError(f'--npz: no such file {args.npz} (expected cifar10_canonical_order_jpeg.npz)')
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f'--per-class: expected a positive integer, got {args.per_class}')
    return args


def unpack(npz: str, out: str, per_class: Optional[int] = None, overwrite: bool = False) -> dict:
    """Write the ImageFolder; returns {split folder: images written or kept}."""
    import numpy as np
    data = np.load(npz)
    for key in ('label_names', 'train_jpeg_bytes', 'train_offsets', 'train_labels',
                'test_jpeg_bytes', 'test_offsets', 'test_labels'):
        if key not in data.files:
            raise ValueError(f'--npz: {npz} has no key {key!r}; expected the cifar10_canonical_order_jpeg.npz layout')
    names = [str(n) for n in data['label_names']]
    counts = {}
    for prefix, folder in SPLITS.items():
        blob = data[f'{prefix}_jpeg_bytes']
        offsets = data[f'{prefix}_offsets']
        labels = data[f'{prefix}_labels']
        if len(offsets) != len(labels) + 1:
            raise ValueError(f'--npz: {prefix}_offsets has {len(offsets)} entries, expected {len(labels) + 1}')
        for name in names:
            (Path(out) / folder / name).mkdir(parents=True, exist_ok=True)
        seen = [0] * len(names)
        written = 0
        for i, label in enumerate(labels.tolist()):
            if per_class is not None and seen[label] >= per_class:
                continue
            seen[label] += 1
            path = Path(out) / folder / names[label] / f'{i:05d}.jpg'
            if overwrite or not path.exists():
                path.write_bytes(blob[offsets[i]:offsets[i + 1]].tobytes())
            written += 1
        counts[folder] = written
    return counts


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    counts = unpack(args.npz, args.out, args.per_class, args.overwrite)
    print(' '.join(f'{k}: {v} images' for k, v in counts.items()) + f' -> {args.out}')
    return counts


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
