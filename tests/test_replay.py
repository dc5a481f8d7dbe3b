"""Issue 19 (first bullet) / issue 13 class 3: the data stream is a function of (seed, epoch, sample index) only,
whatever the number of DataLoader workers, persistent or not, the process count or the global RNG state.

Loader level, with timm's ``create_loader`` and real train augmentation (random resized crop, flips, colour
jitter, random erasing) on a tiny generated ImageFolder."""
import random

import numpy as np
import pytest
import torch
from timm.data import create_loader

from timm_energykd.data import TransformSubset, create_train_eval_datasets, dataset_num_classes, dataset_targets
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.replay import EpochSeededDataset, find_epoch_seeded, sample_seed, seed_loader_epoch

from helpers import dataset_args

pytestmark = pytest.mark.usefixtures('one_thread')

SEED = 7


@pytest.fixture(scope='module')
def train_set(tmp_path_factory):
    data = make_demo_imagefolder(tmp_path_factory.mktemp('replay') / 'data', train_per_class=3, val_per_class=1,
                                 size=24, num_classes=4)
    ds, _ = create_train_eval_datasets(dataset_args(data))
    return ds


def _loader(ds, workers, persistent=True, **kw):
    return create_loader(
        ds, input_size=(3, 16, 16), batch_size=4, is_training=True, use_prefetcher=False, num_workers=workers,
        persistent_workers=persistent, scale=(0.3, 1.0), hflip=0.5, color_jitter=0.4, re_prob=0.5, **kw)


def _epochs(loader, epochs, seed=SEED, mess_global_rng=False):
    out = []
    for e in epochs:
        seed_loader_epoch(loader, seed, e)
        if mess_global_rng:  # whatever the trainer did with the global RNGs before iterating
            torch.manual_seed(1234 + e)
            random.seed(e)
            np.random.seed(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)


def test_sample_seed_depends_on_each_input():
    s = sample_seed(1, 2, 3)
    assert s == sample_seed(1, 2, 3) and 0 <= s < 2 ** 63
    assert len({s, sample_seed(0, 2, 3), sample_seed(1, 1, 3), sample_seed(1, 2, 4), sample_seed(1, -1, 3)}) == 5


def test_same_batches_with_0_or_2_workers_persistent_or_not_and_epochs_differ(train_set):
    ref = _epochs(_loader(EpochSeededDataset(train_set, SEED), 0), [0, 1, 2])
    assert not torch.equal(ref[0][0][0], ref[1][0][0])  # another epoch: another order and augmentation
    _same(ref, _epochs(_loader(EpochSeededDataset(train_set, SEED), 2, persistent=True), [0, 1, 2],
                       mess_global_rng=True))
    _same(ref, _epochs(_loader(EpochSeededDataset(train_set, SEED), 2, persistent=False), [0, 1, 2]))


def test_resumed_fresh_loader_equals_persistent_workers_later_epoch(train_set):
    """A run resumed at epoch 2 builds new workers; the uninterrupted run's persistent workers served 0 and 1."""
    uninterrupted = _epochs(_loader(EpochSeededDataset(train_set, SEED), 2), [0, 1, 2])
    resumed = _epochs(_loader(EpochSeededDataset(train_set, SEED), 2), [2], mess_global_rng=True)
    _same(uninterrupted[2:], resumed)


def test_another_seed_gives_another_stream(train_set):
    a = _epochs(_loader(EpochSeededDataset(train_set, SEED), 0), [0])
    b = _epochs(_loader(EpochSeededDataset(train_set, SEED + 1), 0), [0], seed=SEED + 1)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a[0], b[0]))


def test_sample_independent_of_rank_split(train_set):
    """Under torchrun each rank holds a strided share; a sample's augmentation follows its global index."""
    from timm.data import create_transform
    ds = EpochSeededDataset(train_set, SEED)
    ds.transform = create_transform(16, is_training=True, scale=(0.3, 1.0), hflip=0.5, re_prob=0.5)
    ds.set_epoch(3)
    whole = [ds[i][0] for i in range(len(ds))]
    for rank in range(2):
        share = TransformSubset(ds, range(rank, len(ds), 2))
        for j in range(len(share)):
            assert torch.equal(share[j][0], whole[rank + 2 * j])


def test_main_process_rngs_untouched_by_loading(train_set):
    loader = _loader(EpochSeededDataset(train_set, SEED), 0)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    seed_loader_epoch(loader, SEED, 0)
    for _ in loader:
        pass
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


def test_shuffle_order_is_a_function_of_seed_and_epoch_only():
    ds = list(range(20))
    orders = []
    for junk in (0, 99):
        loader = torch.utils.data.DataLoader(ds, batch_size=20, shuffle=True)
        torch.manual_seed(junk)
        seed_loader_epoch(loader, SEED, 4)
        orders.append(next(iter(loader)).tolist())
    assert orders[0] == orders[1] != list(range(20))
    seed_loader_epoch(loader, SEED, 5)
    assert next(iter(loader)).tolist() != orders[0]


def test_wrapper_forwards_and_is_found(train_set):
    ds = EpochSeededDataset(train_set, SEED)
    assert dataset_targets(ds) == dataset_targets(train_set)
    assert dataset_num_classes(ds) == 4 and ds.reader is train_set.reader
    assert find_epoch_seeded(TransformSubset(ds, [0, 1])) is ds
    with pytest.raises(ValueError, match='map-style'):
        EpochSeededDataset(_Stream())


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_multi_epochs_loader_is_reported_inexact(train_set):
    from timm_energykd.replay import loader_is_exact
    assert loader_is_exact(_loader(EpochSeededDataset(train_set, SEED), 0))
    loader = _loader(EpochSeededDataset(train_set, SEED), 0, use_multi_epochs_loader=True)
    assert not loader_is_exact(loader)
    seed_loader_epoch(loader, SEED, 0)  # best effort, no error


def test_calibration_images_equal_for_one_or_two_processes_with_augmentation(train_set):
    """The calibration pass under torchrun (strided split per rank) sees exactly the augmented images of a single
    process, so the thresholds are equal with augmentation too (before, only with --no-aug)."""
    from types import SimpleNamespace
    from timm_energykd.train import build
    ds = EpochSeededDataset(train_set, SEED)
    train_kw = dict(input_size=(3, 16, 16), is_training=True, use_prefetcher=False, num_workers=0, scale=(0.3, 1.0),
                    hflip=0.5, color_jitter=0.4, re_prob=0.5, distributed=False)

    def images(world, rank):
        args = SimpleNamespace(distributed=world > 1, rank=rank, world_size=world, batch_size=3, seed=SEED)
        return [x.numpy().tobytes() for xb, _ in build.create_calibration_loader(args, ds, train_kw) for x in xb]

    single = images(1, 0)
    assert len(single) == len(train_set) == len(set(single))
    assert sorted(single) == sorted(images(2, 0) + images(2, 1))
