"""Datasets for the trainer: timm's ``create_dataset`` plus long-tailed train subsets.

* ImageFolder / ImageNet layout: ``DATA_DIR/<train_split>/<class>/*.jpg`` and ``DATA_DIR/<val_split>/...``
  (timm's folder reader, ``--dataset ''``).
* CIFAR-10 / CIFAR-100: timm's ``torch/cifar10`` / ``torch/cifar100`` (torchvision; ``--dataset-download``
  to fetch them).
* Long-tailed subsets (CIFAR-100-LT and friends), train set only, see ``long_tailed_indices``.
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data as tud
from timm.data import create_dataset

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
_TRAIN_SYNONYMS = ('train', 'training')
_EVAL_SYNONYMS = ('val', 'valid', 'validation', 'eval', 'evaluation')
_STREAM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')


def _is_folder_dataset(name: Optional[str]) -> bool:
    """True for timm's folder / tar reader (``--dataset ''``, ``folder``, ``ImageFolder``...)."""
    prefix, sep, _ = (name or '').partition('/')
    return not (sep and prefix.lower() in _STREAM_PREFIXES)


def find_split_folder(root: str, split: str, is_training: bool) -> Optional[str]:
    """The folder of ``split`` under ``root``, found as timm does (exact name, then the split's synonyms), or
    None when there is none. Unlike timm, an eval split is never silently replaced by ``root`` (which holds the
    train images). A train split falls back to ``root`` (a ``root/<class>/*.jpg`` layout, as in timm) unless
    ``root`` has a validation folder, which would otherwise become a train class."""
    name = split.split('[')[0]
    exact = os.path.join(root, name)
    if os.path.isdir(exact):
        return exact
    synonyms = _TRAIN_SYNONYMS if name in _TRAIN_SYNONYMS else _EVAL_SYNONYMS if name in _EVAL_SYNONYMS else ()
    for s in synonyms:
        if os.path.isdir(os.path.join(root, s)):
            return os.path.join(root, s)
    if not is_training:
        return None
    if name not in _TRAIN_SYNONYMS:
        raise FileNotFoundError(f'--train-split: folder {exact} not found')
    evals = [s for s in _EVAL_SYNONYMS if os.path.isdir(os.path.join(root, s))]
    if evals:
        raise ValueError(f'--data-dir {root}: no train split folder {exact} (or {", ".join(_TRAIN_SYNONYMS)}), '
                         f'but {os.path.join(root, evals[0])} exists; put the train images in {exact}/<class>/ '
                         f'or name the train folder with --train-split')
    return root


def _natural_key(s: str):
    try:
        from timm.utils.misc import natural_key
        return natural_key(s)
    except ImportError:  # pragma: no cover
        return s


def _img_extensions() -> Tuple[str, ...]:
    from timm.data.readers.img_extensions import get_img_extensions
    return tuple(get_img_extensions())


class FolderScan:
    """Result of ``scan_image_folder``: samples ``(path, label_name)`` in timm's order, the leaf folders with
    their image counts, and the directory symlinks that were not followed because they loop."""

    def __init__(self, root, samples, folder_counts, skipped_links):
        self.root = root
        self.samples: List[Tuple[str, str]] = samples
        self.folder_counts: Dict[str, int] = folder_counts  # leaf folder path -> number of images
        self.skipped_links: List[str] = skipped_links

    @property
    def labels(self) -> List[str]:
        return sorted({lbl for _, lbl in self.samples}, key=_natural_key)

    def label_folders(self) -> Dict[str, str]:
        """First folder seen for each class name (for messages)."""
        out: Dict[str, str] = {}
        for p, lbl in self.samples:
            out.setdefault(lbl, os.path.dirname(p))
        return out


def scan_image_folder(root: str, split_desc: str = 'train', flag: str = '--data-dir',
                      extensions: Optional[Sequence[str]] = None) -> FolderScan:
    """Walk an ImageFolder split like timm's folder reader (class = name of the folder holding the image, images
    sorted by natural key), with checks timm does not make, each a one-line ValueError naming the path:

    * an image file directly in ``root`` (timm would make it a class ``''``, shifting every label);
    * a leaf folder with no images (an empty class);
    * an entry named like an image that is not a regular file (a FIFO would hang the reader, a device or socket
      is never an image, a broken link points nowhere); told from the directory entry, no extra ``stat``;
    * one real folder reachable under two names in the split (two class folders linked to one place).

    A directory symlink that points to one of its own ancestors (a loop) is not followed, with one WARNING, so
    every real file is counted once (timm's ``os.walk(followlinks=True)`` repeats the folder up to 40 times).
    """
    exts = {e.lower() for e in (extensions or _img_extensions())}
    root = os.path.normpath(root)
    samples: List[Tuple[str, str]] = []
    folder_counts: Dict[str, int] = {}
    skipped: List[str] = []
    seen_real: Dict[str, str] = {}  # real path -> first name it was reached by

    def walk(folder: str, real: str, label: str) -> Tuple[int, bool]:
        """(number of images at or below ``folder``, whether ``folder`` is a leaf folder with no images)."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f'{flag}: cannot list {folder} ({e.strerror or e}); fix its permissions') from None
        here = 0
        below = 0
        has_subdirs = False
        empty_children: List[str] = []
        for entry in entries:
            path = entry.path
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                sub_real = os.path.realpath(path)
                if real == sub_real or real.startswith(sub_real.rstrip(os.sep) + os.sep):
                    skipped.append(path)  # a link to itself or an ancestor: a loop
                    continue
                if sub_real in seen_real:
                    raise ValueError(f'{flag}: {path} and {seen_real[sub_real]} are the same folder ({sub_real}, '
                                     f'linked twice); each class of the {split_desc} split needs its own folder')
                seen_real[sub_real] = path
                has_subdirs = True
                n, empty_leaf = walk(path, sub_real, entry.name)
                below += n
                if empty_leaf:
                    empty_children.append(path)
                continue
            ext = os.path.splitext(entry.name)[1].lower()
            if ext not in exts:
                continue  # like timm: files that are not images are ignored
            try:
                is_file = entry.is_file()  # d_type: no stat for plain entries; follows links
            except OSError:
                is_file = False
            if not is_file:
                from .files import check_regular_file
                check_regular_file(path, flag)  # raises, naming the kind (FIFO, device, broken link...)
            if folder == root:
                raise ValueError(f'{flag}: {path} is an image directly in the {split_desc} folder {root}; images '
                                 f'must be in class folders ({root}/<class>/...): move or remove it')
            samples.append((path, label))
            here += 1
        if here:
            folder_counts[folder] = here
        elif empty_children:
            # an empty leaf where class folders sit (beside other classes, or directly in the split folder) is an
            # empty class; an empty sub-folder inside a class folder that has images is clutter, as in timm
            raise ValueError(f'{flag}: class folder {empty_children[0]} of the {split_desc} split has no images '
                             f'({", ".join(sorted(exts))}); add images or remove the folder')
        return here + below, (here == 0 and not has_subdirs)

    real_root = os.path.realpath(root)
    seen_real[real_root] = root
    walk(root, real_root, '')
    if skipped:
        more = ' ...' if len(skipped) > 1 else ''
        _logger.warning(f'{flag}: {len(skipped)} folder symlink(s) in the {split_desc} split point to the folder '
                        f'itself or a parent (a loop), not followed: {skipped[0]}{more}')
    samples.sort(key=lambda s: _natural_key(s[0]))
    return FolderScan(root, samples, folder_counts, skipped)


def _scanned_reader(root: str, samples: List[Tuple[str, int]], class_to_idx: Dict[str, int]):
    """A timm ``ReaderImageFolder`` over already scanned samples (no second walk of the folder)."""
    from timm.data.readers.reader import Reader
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    reader = ReaderImageFolder.__new__(ReaderImageFolder)
    Reader.__init__(reader)
    reader.root = root
    reader.samples = samples
    reader.class_to_idx = class_to_idx
    return reader


def _load_class_map(class_map, split_root: str) -> Dict[str, int]:
    from timm.data.readers.class_map import load_class_map
    try:
        return dict(load_class_map(class_map, split_root))
    except (AssertionError, OSError, ValueError) as e:
        raise ValueError(f'--class-map: cannot read {class_map}: {str(e).strip() or type(e).__name__}') from None


def _names(labels: Sequence[str], limit: int = 5) -> str:
    shown = ', '.join(repr(x) for x in list(labels)[:limit])
    return shown + (f' and {len(labels) - limit} more' if len(labels) > limit else '')


def _build_folder_split(folder: str, split_desc: str, class_to_idx: Optional[Dict[str, int]], class_map_flag: str,
                        input_img_mode: Optional[str]):
    from timm.data import ImageDataset
    scan = scan_image_folder(folder, split_desc)
    if not scan.samples:
        raise FileNotFoundError(
            f'Found 0 images in subfolders of {folder}. Supported image extensions are {", ".join(_img_extensions())}')
    found = scan.labels
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(found)}
    else:
        unknown = [c for c in found if c not in class_to_idx]
        if unknown:
            where = scan.label_folders()[unknown[0]]
            if class_map_flag:
                raise ValueError(f'{class_map_flag}: {split_desc} class folder(s) {_names(unknown)} ({where}) are '
                                 f'not in the class map ({len(class_to_idx)} classes); add them or remove the folders')
            raise ValueError(f'--data-dir: {split_desc} class folder(s) {_names(unknown)} ({where}) are not train '
                             f'classes (train has {len(class_to_idx)}: {_names(list(class_to_idx))}); every '
                             f'{split_desc} class must be a train class')
    samples = [(p, class_to_idx[lbl]) for p, lbl in scan.samples]
    kwargs = {} if input_img_mode is None else dict(input_img_mode=input_img_mode)
    ds = ImageDataset(folder, reader=_scanned_reader(folder, samples, class_to_idx), **kwargs)
    return ds, scan


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
    if _is_folder_dataset(args.dataset) and os.path.isdir(args.data_dir):
        dataset_train, dataset_eval = _create_folder_datasets(args, input_img_mode)
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


def _create_folder_datasets(args, input_img_mode):
    root = args.data_dir
    train_folder = find_split_folder(root, args.train_split, is_training=True)
    class_to_idx = _load_class_map(args.class_map, train_folder) if args.class_map else None
    try:
        dataset_train, train_scan = _build_folder_split(train_folder, 'train', class_to_idx,
                                                        '--class-map ' + str(args.class_map) if args.class_map else '',
                                                        input_img_mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'--data-dir {root}: cannot open train split {args.train_split!r} of dataset '
                                f'{args.dataset!r}: {e}') from None
    class_to_idx = dataset_train.reader.class_to_idx
    dataset_eval = None
    if args.val_split:
        val_folder = find_split_folder(root, args.val_split, is_training=False)
        name = args.val_split.split('[')[0]
        if val_folder is None and name not in _EVAL_SYNONYMS:
            raise FileNotFoundError(f'--val-split: folder {os.path.join(root, name)} not found')
        if val_folder is None:
            _logger.warning(f'--data-dir {root}: no validation folder ({", ".join(_EVAL_SYNONYMS)}); validation is '
                            f'off, best checkpoint and metrics use the train loss (pass --val-split \'\' to silence)')
        elif os.path.realpath(val_folder) == os.path.realpath(train_folder):
            raise ValueError(f'--val-split: {val_folder} is the train folder; validation would run on the '
                             f'training images')
        else:
            try:
                dataset_eval, val_scan = _build_folder_split(
                    val_folder, 'validation', class_to_idx,
                    '--class-map ' + str(args.class_map) if args.class_map else '', input_img_mode)
            except FileNotFoundError as e:
                raise FileNotFoundError(f'--data-dir {root}: cannot open validation split {args.val_split!r}: '
                                        f'{e}') from None
            missing = [c for c in train_scan.labels if c not in set(val_scan.labels)]
            if missing:
                raise ValueError(f'--data-dir: train class(es) {_names(missing)} have no images in the validation '
                                 f'folder {val_folder}; add {val_folder}/{missing[0]}/ with images, or pass '
                                 f"--val-split '' to train without validation")
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
    is_tar = _is_folder_dataset(args.dataset) and os.path.isfile(args.data_dir)
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
