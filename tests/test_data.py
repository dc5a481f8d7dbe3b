import math
from collections import Counter

import numpy as np
import pytest
import torch
from timm.data import create_loader

from timm_energykd.data import (
    TransformSubset, create_train_eval_datasets, dataset_targets, long_tailed_counts, long_tailed_indices,
)
from timm_energykd.demo import make_demo_imagefolder, make_shapes_dataset


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


class _Args:
    dataset = ''
    train_split = 'train'
    val_split = 'validation'
    class_map = ''
    dataset_download = False
    batch_size = 4
    seed = 0
    imbalance_factor = None
    imbalance_seed = 0

    def __init__(self, data_dir, **kw):
        self.data_dir = str(data_dir)
        self.__dict__.update(kw)


def test_imagefolder_long_tailed_train_only_and_loader_transform(tmp_path):
    root = make_demo_imagefolder(tmp_path / 'd', train_per_class=10, val_per_class=3, size=16, num_classes=4)
    train, val = create_train_eval_datasets(_Args(root, imbalance_factor=0.2))
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
