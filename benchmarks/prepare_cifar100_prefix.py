#!/usr/bin/env python3
"""Write the exact CIFAR-100 images that ../shared/data has (the first 1,117 train and 916 test images of the
canonical pickles) as an ImageFolder of PNG files (lossless), for small CPU-scale protocol runs.

    python benchmarks/prepare_cifar100_prefix.py --out /tmp/c100p

writes /tmp/c100p/train/<fine class>/<index>.png and /tmp/c100p/validation/<fine class>/<index>.png. Every one
of the 100 classes gets a folder (empty ones too) so class indices match CIFAR-100's label order.
"""
import argparse
import os
from pathlib import Path
from typing import List, Optional

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar-100-python-partial' / \
    'cifar100_labels_and_prefix_images.npz'


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--npz', default=str(DEFAULT_NPZ), help=f'the archive (default: {DEFAULT_NPZ})')
    p.add_argument('--out', required=True, help='output folder; gets train/ and validation/')
    args = p.parse_args(argv)
    if not os.path.isfile(args.npz):
        raise SystemExit(f'--npz: no such file {args.npz} (expected cifar100_labels_and_prefix_images.npz)')
    import numpy as np
    from PIL import Image
    data = np.load(args.npz)
    names = [str(n) for n in data['fine_label_names']]
    # ImageFolder sorts class folders by name; a numeric prefix keeps CIFAR-100's label order
    folders = [f'{i:03d}_{n}' for i, n in enumerate(names)]
    counts = {}
    for prefix, split in (('train', 'train'), ('test', 'validation')):
        images = data[f'{prefix}_images_prefix']
        labels = data[f'{prefix}_fine_labels'][:len(images)]
        for f in folders:
            (Path(args.out) / split / f).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels.tolist())):
            Image.fromarray(img).save(Path(args.out) / split / folders[lab] / f'{i:05d}.png')
        counts[split] = len(images)
    print(' '.join(f'{k}: {v} images' for k, v in counts.items()) + f' -> {args.out}')
    return counts


if __name__ == '__main__':
    main()
