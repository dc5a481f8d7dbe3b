"""Datasets for the trainer: timm's ``create_dataset`` plus long-tailed train subsets.

* ImageFolder / ImageNet layout: ``DATA_DIR/<train_split>/<class>/*.jpg`` and ``DATA_DIR/<val_split>/...``
  (timm's folder reader, ``--dataset ''``).
* CIFAR-10 / CIFAR-100: timm's ``torch/cifar10`` / ``torch/cifar100`` (torchvision; ``--dataset-download``
  to fetch them).
* Long-tailed subsets (CIFAR-100-LT and friends), train set only, see ``long_tailed_indices``.
"""
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as tud
from timm.data import create_dataset

from .folders import create_folder_datasets, find_split_folder, is_folder_dataset, scan_image_folder

__all__ = ['long_tailed_indices', 'long_tailed_counts', 'TransformSubset', 'dataset_targets', 'dataset_num_classes',
           'create_train_eval_datasets', 'scan_image_folder', 'find_split_folder', 'check_train_batches',
           'dataset_fingerprint']

_logger = logging.getLogger(__name__)


def long_tailed_counts(class_counts: Sequence[int], imbalance_factor: float) -> List[int]:
    """Per-class sizes of the exponential long-tail profile.

    Rule (Cao et al., LDAM; the usual CIFAR-LT construction): class ``c`` of ``C`` keeps
    ``n_c = floor(n_max * factor ** (c / (C - 1)))`` samples, ``n_max`` the largest class size and
    ``factor = n_min / n_max`` in (0, 1]; capped at the class's own size and at least 1.
    """
    if not 0.0 < imbalance_factor <= 1.0:
        raise ValueError(f'--imbalance-factor must be in (0, 1] (n_min / n_max), got {imbalance_factor}')
    num_classes = len(class_counts)
    n_max = max(class_counts) if num_classes else 0
    out = []
    for c, available in enumerate(class_counts):
        frac = c / (num_classes - 1) if num_classes > 1 else 0.0
        n_c = int(n_max * imbalance_factor ** frac)
        out.append(max(1, min(n_c, int(available))) if available > 0 else 0)
    return out


def long_tailed_indices(targets: Sequence[int], imbalance_factor: float, seed: int = 0) -> List[int]:
    """Deterministic long-tailed subset of a labelled dataset: indices into ``targets``, sorted.

    Class ``c`` (classes ``0..C-1`` by label index, the head is class 0) keeps
    ``n_c = floor(n_max * imbalance_factor ** (c / (C - 1)))`` of its samples (see ``long_tailed_counts``),
    chosen by one ``numpy.random.default_rng(seed)`` permutation of each class's indices (same seed ->
    same subset). ``imbalance_factor = 0.01`` gives the usual imbalance ratio 100.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError('long_tailed_indices: targets must be a non-empty 1-D sequence of class indices')
    num_classes = int(targets.max()) + 1
    counts = np.bincount(targets, minlength=num_classes)
    keep = long_tailed_counts(counts.tolist(), imbalance_factor)
    rng = np.random.default_rng(seed)
    order = np.argsort(targets, kind='stable')  # indices grouped by class, ascending within a class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = []
    for c in range(num_classes):  # one vectorised permutation per class (not per sample)
        idx = order[starts[c]:starts[c] + counts[c]]
        chosen.append(idx[rng.permutation(len(idx))[:keep[c]]])
    return sorted(np.concatenate(chosen).tolist())


class TransformSubset(tud.Dataset):
    """``torch.utils.data.Subset`` that forwards ``transform`` to the wrapped dataset.

    timm's ``create_loader`` sets ``dataset.transform``; on a plain ``Subset`` that attribute would be set
    on the wrapper and ignored by the underlying dataset.
    """

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, t):
        self.dataset.transform = t

    @property
    def targets(self) -> List[int]:
        all_targets = dataset_targets(self.dataset)
        return [all_targets[i] for i in self.indices]

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def __len__(self) -> int:
        return len(self.indices)


def _unwrap_seeded(dataset):
    from .replay import EpochSeededDataset
    return dataset.dataset if isinstance(dataset, EpochSeededDataset) else dataset


def dataset_targets(dataset) -> List[int]:
    """Labels of a timm ``ImageDataset`` (folder reader) or a torchvision dataset, without decoding images."""
    dataset = _unwrap_seeded(dataset)
    if isinstance(dataset, TransformSubset):
        return dataset.targets
    targets = getattr(dataset, 'targets', None)
    if targets is not None:
        return [int(t) for t in targets]
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples is not None:
        return [int(t) for _, t in samples]
    raise ValueError(f'cannot read the labels of a {type(dataset).__name__} (needed for --imbalance-factor)')


def dataset_num_classes(dataset) -> Optional[int]:
    """Class count of a dataset, or None when it cannot be told cheaply."""
    dataset = _unwrap_seeded(dataset)
    if isinstance(dataset, TransformSubset):
        dataset = _unwrap_seeded(dataset.dataset)
    classes = getattr(dataset, 'classes', None)
    if classes is not None:
        return len(classes)
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    return None


# timm's split synonyms (timm.data.dataset_factory); a missing split folder falls back to DATA_DIR itself there
def dataset_fingerprint(dataset) -> str:
    """A cheap identity of a dataset's content, for caches (e.g. energy thresholds) that must not outlive the
    images they were computed on: sha256 over the class index and, for every sample in order, its path relative
    to the split folder, its label, size and modification time (one ``stat`` a file, ~1-2 us on a local disk; no
    pixel is read). Replacing, adding, removing or relabelling an image changes it; so does a long-tailed subset
    (its indices). Datasets without file paths (torchvision CIFAR, streaming) give a fingerprint of their type,
    length and class count only."""
    import hashlib
    from .replay import EpochSeededDataset
    h = hashlib.sha256()
    if isinstance(dataset, EpochSeededDataset):
        dataset = dataset.dataset
    indices = None
    if isinstance(dataset, TransformSubset):
        dataset, indices = _unwrap_seeded(dataset.dataset), dataset.indices
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples is None:
        h.update(repr((type(dataset).__name__, len(dataset), dataset_num_classes(dataset))).encode())
        if indices is not None:
            h.update(np.asarray(indices, dtype=np.int64).tobytes())
        return h.hexdigest()
    root = getattr(reader, 'root', '') or ''
    h.update(repr(sorted((str(k), int(v)) for k, v in (reader.class_to_idx or {}).items())).encode())
    for i in (range(len(samples)) if indices is None else indices):
        path, target = samples[i]
        try:
            st = os.stat(path)
            meta = (st.st_size, st.st_mtime_ns)
        except OSError:
            meta = (-1, -1)
        h.update(f'{os.path.relpath(path, root)}\0{int(target)}\0{meta[0]}\0{meta[1]}\n'.encode('utf-8', 'replace'))
    return h.hexdigest()


def check_train_batches(num_samples: int, batch_size: int, world_size: int = 1) -> None:
    """The train loader drops its last partial batch (timm): a train set smaller than one batch per process
    would train zero steps and save an untrained "best". One-line ValueError naming --batch-size."""
    per_rank = -(-int(num_samples) // max(1, int(world_size)))  # DistributedSampler pads to ceil(N / W)
    if per_rank < batch_size:
        where = f' per process ({num_samples} over {world_size} processes)' if world_size > 1 else ''
        raise ValueError(f'--batch-size {batch_size} is larger than the train set: {per_rank} images{where} make no '
                         f'full batch and the train loader drops the last partial batch; use --batch-size <= '
                         f'{per_rank} or add images')


def create_train_eval_datasets(args) -> Tuple[tud.Dataset, Optional[tud.Dataset]]:
    """Train and eval datasets from timm-style args (``dataset``, ``data_dir``, ``train_split``, ``val_split``,
    ``class_map``, ``dataset_download``, ``imbalance_factor``, ``imbalance_seed`` ...).

    ImageFolder datasets (timm's folder reader) get one class index for every split: the train split's (or
    ``--class-map``'s), checked before anything is trained (see ``scan_image_folder`` for the folder checks):
    a validation class that is not a train class, or a train class with no validation images, is a one-line
    ValueError. With no validation folder the run says so (one WARNING) and validation is off; timm would
    evaluate on ``data_dir`` itself, i.e. on the training images. A train set smaller than one batch is refused
    (``check_train_batches``).

    The long-tailed subset applies to the train set only; the eval set stays balanced (as in CIFAR-LT).
    """
    input_img_mode = getattr(args, 'input_img_mode', None) or None
    if is_folder_dataset(args.dataset) and os.path.isdir(args.data_dir):
        dataset_train, dataset_eval = create_folder_datasets(args, input_img_mode)
    else:
        dataset_train, dataset_eval = _create_timm_datasets(args, input_img_mode)

    factor = getattr(args, 'imbalance_factor', None)
    if factor is not None:
        if isinstance(dataset_train, tud.IterableDataset):
            raise ValueError('--imbalance-factor needs a map-style dataset (folder or torch/*), not a streaming one')
        targets = dataset_targets(dataset_train)
        indices = long_tailed_indices(targets, factor, seed=getattr(args, 'imbalance_seed', 0))
        kept = np.bincount(np.asarray(targets)[indices])
        _logger.info(f'Long-tailed train subset (factor {factor}, seed {args.imbalance_seed}): {len(indices)} of '
                     f'{len(targets)} samples, head class {kept.max()} / tail class {kept.min()}')
        dataset_train = TransformSubset(dataset_train, indices)
    if not isinstance(dataset_train, tud.IterableDataset):
        check_train_batches(len(dataset_train), int(args.batch_size), int(getattr(args, 'world_size', 1) or 1))
    return dataset_train, dataset_eval


def _create_timm_datasets(args, input_img_mode):
    """torchvision / HF / TFDS / WDS datasets and tar files: timm's create_dataset (their class index is fixed
    by the dataset; a tar's validation split uses the train split's class index)."""
    common = dict(
        root=args.data_dir,
        class_map=args.class_map,
        download=args.dataset_download,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if input_img_mode:
        common['input_img_mode'] = input_img_mode
    # timm's keys for datasets of records (HF datasets, WebDataset, TFDS); folders ignore them, as in timm
    for key in ('input_key', 'target_key'):
        if getattr(args, key, None):
            common[key] = getattr(args, key)
    if getattr(args, 'dataset_trust_remote_code', False):
        common['trust_remote_code'] = True
    train_kwargs = dict(common, split=args.train_split, is_training=True, repeats=getattr(args, 'epoch_repeats', 0))
    if getattr(args, 'train_num_samples', None):
        train_kwargs['num_samples'] = args.train_num_samples
    try:
        dataset_train = create_dataset(args.dataset, **train_kwargs)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f'--data-dir {args.data_dir}: cannot open train split {args.train_split!r} of dataset '
                                f'{args.dataset!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    dataset_eval = None
    is_tar = is_folder_dataset(args.dataset) and os.path.isfile(args.data_dir)
    if args.val_split and is_tar:
        _logger.warning(f'--data-dir {args.data_dir} is one tar file (the train split); validation is off')
    elif args.val_split:
        eval_kwargs = dict(common, split=args.val_split, is_training=False)
        if getattr(args, 'val_num_samples', None):
            eval_kwargs['num_samples'] = args.val_num_samples
        try:
            dataset_eval = create_dataset(args.dataset, **eval_kwargs)
        except (FileNotFoundError, RuntimeError) as e:
            raise FileNotFoundError(f'--data-dir {args.data_dir}: cannot open validation split {args.val_split!r}: '
                                    f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    return dataset_train, dataset_eval
