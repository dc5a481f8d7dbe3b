"""ImageFolder splits with one class index: the train split's (or ``--class-map``'s) labels every split.

timm's folder reader builds a class index per split from that split's own sub-folders, so a class missing
from ``validation/`` shifts every validation label, and a stray file in ``train/`` becomes a class ``''``.
Here the folders are scanned once, checked (stray files, empty or linked class folders, symlink loops, a
validation class that train lacks), and the train index drives validation. On a clean folder the files,
order and labels equal timm's reader.
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

_logger = logging.getLogger(__name__)

__all__ = ['is_folder_dataset', 'find_split_folder', 'FolderScan', 'scan_image_folder', 'create_folder_datasets']


_TRAIN_SYNONYMS = ('train', 'training')
_EVAL_SYNONYMS = ('val', 'valid', 'validation', 'eval', 'evaluation')
_STREAM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')


def is_folder_dataset(name: Optional[str]) -> bool:
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


def create_folder_datasets(args, input_img_mode):
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
