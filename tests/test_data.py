import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from timm.data import create_loader

from timm_energykd.data import (
    TransformSubset, create_train_eval_datasets, dataset_targets, long_tailed_counts, long_tailed_indices,
)
from timm_energykd.demo import make_demo_imagefolder, make_shapes_dataset

from helpers import dataset_args


def _reference_counts(n_max, factor, num_classes):
    # float64 straight from n_c = n_max * factor^(c / (C - 1)), floored
    return [max(1, math.floor(n_max * factor ** (c / (num_classes - 1)))) for c in range(num_classes)]


@pytest.mark.parametrize('factor', [1.0, 0.1, 0.01])
def test_long_tailed_profile_matches_reference(factor):
    targets = np.repeat(np.arange(10), 500)
    np.random.default_rng(1).shuffle(targets)
    idx = long_tailed_indices(targets.tolist(), factor, seed=0)
    got = Counter(targets[idx].tolist())
    assert [got[c] for c in range(10)] == _reference_counts(500, factor, 10)
    assert idx == sorted(set(idx))


def test_long_tailed_deterministic_and_seeded():
    targets = np.repeat(np.arange(5), 40).tolist()
    a = long_tailed_indices(targets, 0.1, seed=3)
    assert a == long_tailed_indices(targets, 0.1, seed=3)
    assert a != long_tailed_indices(targets, 0.1, seed=4)


def test_long_tailed_caps_at_available_and_checks_factor():
    assert long_tailed_counts([10, 2, 10], 0.5) == [10, 2, 5]
    with pytest.raises(ValueError, match='imbalance-factor'):
        long_tailed_counts([10, 10], 0.0)


def test_imagefolder_long_tailed_train_only_and_loader_transform(tmp_path):
    root = make_demo_imagefolder(tmp_path / 'd', train_per_class=10, val_per_class=3, size=16, num_classes=4)
    train, val = create_train_eval_datasets(dataset_args(root, imbalance_factor=0.2))
    assert isinstance(train, TransformSubset)
    assert [Counter(dataset_targets(train))[c] for c in range(4)] == _reference_counts(10, 0.2, 4)
    assert len(val) == 12  # eval set untouched
    loader = create_loader(train, input_size=(3, 16, 16), batch_size=4, is_training=True, use_prefetcher=False,
                           num_workers=0, device=torch.device('cpu'))
    assert train.dataset.transform is not None  # create_loader's transform reached the wrapped dataset
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32


def test_shapes_dataset_is_deterministic():
    a, la = make_shapes_dataset(3, size=16, num_classes=10, seed=0)
    b, lb = make_shapes_dataset(3, size=16, num_classes=10, seed=0)
    assert a.shape == (30, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and sorted(set(la.tolist())) == list(range(10))


def _fake_cifar(root, name, per_class, num_classes, seed=0):  # noqa: D401
    """A tiny dataset in torchvision's CIFAR pickle layout (no download); integrity check patched by the test."""
    import pickle
    import torchvision.datasets as tvd
    cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
    label_key = 'labels' if name == 'cifar10' else 'fine_labels'
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = [f for f, _ in cls.train_list]
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class)).tolist()
    chunks = np.array_split(np.arange(len(labels)), len(files))
    for f, idx in zip(files, chunks):
        data = rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8)
        with open(folder / f, 'wb') as fh:
            pickle.dump({'data': data, label_key: [labels[i] for i in idx]}, fh)
    for f, _ in cls.test_list:
        with open(folder / f, 'wb') as fh:
            pickle.dump({'data': rng.integers(0, 256, (num_classes, 3072), dtype=np.uint8),
                         label_key: list(range(num_classes))}, fh)
    with open(folder / cls.meta['filename'], 'wb') as fh:
        pickle.dump({cls.meta['key']: [f'c{i}' for i in range(num_classes)]}, fh)
    return cls


@pytest.mark.parametrize('name,num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_torch_cifar_long_tailed_subset(tmp_path, monkeypatch, name, num_classes):
    cls = _fake_cifar(tmp_path, name, per_class=6, num_classes=num_classes)
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda *a, **k: True)
    args = dataset_args(tmp_path, dataset=f'torch/{name}', train_split='train', val_split='validation',
                 imbalance_factor=0.5, imbalance_seed=0)
    train, val = create_train_eval_datasets(args)
    assert isinstance(train, TransformSubset) and len(val) == num_classes  # the test split stays balanced
    counts = Counter(dataset_targets(train))
    assert [counts[c] for c in range(num_classes)] == _reference_counts(6, 0.5, num_classes)
    again, _ = create_train_eval_datasets(args)
    assert again.indices == train.indices  # deterministic
    args.imbalance_seed = 1
    other, _ = create_train_eval_datasets(args)
    assert other.indices != train.indices and Counter(dataset_targets(other)) == counts


@pytest.mark.slow
def test_trainer_runs_on_torch_cifar10_lt(tmp_path, monkeypatch):
    from timm_energykd.train import trainer as train_energykd
    cls = _fake_cifar(tmp_path / 'c10', 'cifar10', per_class=4, num_classes=10)
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda *a, **k: True)
    r = train_energykd.main([str(tmp_path / 'c10'), '--dataset', 'torch/cifar10', '--imbalance-factor', '0.5',
                             '--model', 'cifar_resnet8', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
                             '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'out'),
                             '--experiment', 'lt'])
    assert r['model'].num_classes == 10 and os.path.isfile(os.path.join(r['output_dir'], 'summary.csv'))
