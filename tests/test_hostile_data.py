"""Issue 13, hostile data and files: class index (1), empty or multiplied work (6), disk errors (9), file modes (11).

Each case asserts the exception (the CLI turns ValueError / FileNotFoundError into exit status 2 and one line), the
one-line message, and what is left on disk: no output folder for a refused run; for a write failure, the previous
complete file and no temporary file. Runs go through ``trainer.main(argv)`` on tiny generated ImageFolders (CPU,
workers 0, ``test_resnet`` at 32 px, one epoch); library-level cases call ``timm_energykd.data`` / ``files``.
"""
import errno
import logging
import os
import shutil
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from timm_energykd import files
from timm_energykd.data import check_train_batches, create_train_eval_datasets, scan_image_folder
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.files import DiskWriteError, load_checkpoint_file
from timm_energykd.train import checkpoint, trainer

from helpers import dataset_args, random_teacher_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')

CLASSES = ['circle', 'square', 'ring', 'diamond']  # make_demo_imagefolder's first 4 classes


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp('hostile')
    data = make_demo_imagefolder(root / 'data', train_per_class=3, val_per_class=1, size=32, num_classes=4)
    got = sorted(p.name for p in (data / 'train').iterdir())
    assert got == sorted(CLASSES), got
    return dict(data=data, teacher=random_teacher_checkpoint(root / 't.pth.tar', seed=0))


@pytest.fixture
def data(base, tmp_path):
    """A fresh copy of the tiny ImageFolder (train: 4 classes x 3, validation: 4 x 1) to damage."""
    d = tmp_path / 'data'
    shutil.copytree(base['data'], d, symlinks=True)
    return d


def _argv(data, out, *extra):
    return [str(data), '--model', 'test_resnet', '--img-size', '32', '--batch-size', '4', '--workers', '0',
            '--device', 'cpu', '--output', str(out), '--epochs', '1', '--warmup-epochs', '0', '--log-interval', '1',
            '--experiment', 'run', *extra]


def _refused(data, tmp_path, exc, match, *extra):
    """main() raises ``exc`` with ONE line matching ``match`` and leaves no output folder."""
    out = tmp_path / 'out'
    with pytest.raises(exc, match=match) as e:
        trainer.main(_argv(data, out, *extra))
    msg = str(e.value)
    assert '\n' not in msg, msg
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob('*'))
    return msg


def _png(path: Path, src: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, path)


def _any_png(data):
    return sorted((data / 'train' / 'circle').glob('*.png'))[0]


@contextmanager
def _no_hang(seconds=30):
    def boom(*_):
        raise TimeoutError(f'hung for {seconds} s')
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- class 1: one class index for every split -------------------------------------------------------------

def test_validation_class_missing_from_train(data, tmp_path):
    _png(data / 'validation' / 'zebra' / 'z.png', _any_png(data))
    msg = _refused(data, tmp_path, ValueError, r"validation class folder\(s\) 'zebra' .* are not train classes")
    assert str(data / 'validation' / 'zebra') in msg


def test_train_class_missing_from_validation(data, tmp_path):
    shutil.rmtree(data / 'validation' / 'square')
    msg = _refused(data, tmp_path, ValueError, r"train class\(es\) 'square' have no images in the validation folder")
    assert "--val-split ''" in msg


def test_stray_image_directly_in_train(data, tmp_path):
    _png(data / 'train' / 'stray.png', _any_png(data))
    _refused(data, tmp_path, ValueError, r'stray.png is an image directly in the train folder .*class folders')


def test_stray_image_directly_in_validation(data, tmp_path):
    _png(data / 'validation' / 'x.jpg', _any_png(data))
    _refused(data, tmp_path, ValueError, r'x.jpg is an image directly in the validation folder')


def test_empty_train_class_folder(data, tmp_path):
    (data / 'train' / 'empty').mkdir()
    (data / 'train' / 'empty' / 'notes.txt').write_text('not an image')
    msg = _refused(data, tmp_path, ValueError, r'class folder .*train/empty of the train split has no images')
    assert '.png' in msg


def test_empty_validation_class_folder(data, tmp_path):
    for p in (data / 'validation' / 'diamond').iterdir():
        p.unlink()
    _refused(data, tmp_path, ValueError, r'class folder .*validation/diamond of the validation split has no images')


def test_two_class_folders_linked_to_one(data, tmp_path):
    shutil.rmtree(data / 'train' / 'square')
    os.symlink(data / 'train' / 'circle', data / 'train' / 'square')
    _refused(data, tmp_path, ValueError, r'are the same folder .*linked twice')


def test_validation_folder_without_train_folder(data, tmp_path):
    shutil.rmtree(data / 'train')
    _refused(data, tmp_path, ValueError, r"no train split folder .*train .* but .*validation exists")


def test_explicit_val_split_not_found(data, tmp_path):
    _refused(data, tmp_path, FileNotFoundError, r'--val-split: folder .*holdout not found', '--val-split', 'holdout')


def test_val_split_that_is_the_train_folder(data, tmp_path):
    _refused(data, tmp_path, ValueError, r'--val-split: .*train is the train folder', '--val-split', 'train')


def test_class_map_missing_a_train_class(data, tmp_path):
    cmap = tmp_path / 'classes.txt'
    cmap.write_text('circle\nsquare\nring\n')
    _refused(data, tmp_path, ValueError, r"--class-map .*: train class folder\(s\) 'diamond' .* not in the class map",
             '--class-map', str(cmap))


def test_class_map_file_missing(data, tmp_path):
    _refused(data, tmp_path, ValueError, r'--class-map: cannot read .*nope.txt', '--class-map',
             str(tmp_path / 'nope.txt'))


def test_validation_labels_use_the_train_index(data):
    """Validation with an extra non-image file and a class folder added in another order: same index as train."""
    (data / 'validation' / 'README.txt').write_text('hi')
    train, val = create_train_eval_datasets(dataset_args(data))
    assert val.reader.class_to_idx is train.reader.class_to_idx
    for path, target in val.reader.samples:
        assert target == train.reader.class_to_idx[Path(path).parent.name]


def test_class_map_order_drives_both_splits(data, tmp_path):
    cmap = tmp_path / 'classes.txt'
    cmap.write_text('\n'.join(reversed(sorted(CLASSES))) + '\n')
    train, val = create_train_eval_datasets(dataset_args(data, class_map=str(cmap)))
    want = {c: i for i, c in enumerate(reversed(sorted(CLASSES)))}
    assert train.reader.class_to_idx == want and val.reader.class_to_idx == want
    assert {t for _, t in val.reader.samples} == set(want.values())


def test_no_validation_folder_says_so_and_never_evaluates_on_train(data, tmp_path, caplog):
    shutil.rmtree(data / 'validation')
    out = tmp_path / 'out'
    with caplog.at_level(logging.WARNING):
        result = trainer.main(_argv(data, out))
    warned = [r.getMessage() for r in caplog.records if 'no validation folder' in r.getMessage()]
    assert len(warned) == 1 and 'validation is off' in warned[0] and '\n' not in warned[0]
    assert result['eval_metrics'] == {}
    header = (out / 'run' / 'summary.csv').read_text().splitlines()[0]
    assert 'eval_top1' not in header and 'eval_loss' not in header
    assert {'args.yaml', 'summary.csv', 'last.pth.tar'} <= set(os.listdir(out / 'run'))


# ---- class 6: empty or multiplied work ---------------------------------------------------------------------

def test_train_set_smaller_than_one_batch(data, tmp_path):
    msg = _refused(data, tmp_path, ValueError, r'--batch-size 16 is larger than the train set: 12 images make no full '
                   r'batch', '--batch-size', '16')
    assert '--batch-size <= 12' in msg


def test_long_tailed_subset_smaller_than_one_batch(data, tmp_path):
    # factor 0.01 keeps 3 + 1 + 1 + 1 = 6 of 12 images: fewer than --batch-size 8
    _refused(data, tmp_path, ValueError, r'--batch-size 8 is larger than the train set: 6 images', '--batch-size', '8',
             '--imbalance-factor', '0.01')


def test_batch_check_counts_images_per_process():
    check_train_batches(8, 4, world_size=2)
    with pytest.raises(ValueError, match=r'--batch-size 4 is larger than the train set: 3 images per process '
                                         r'\(6 over 2 processes\)'):
        check_train_batches(6, 4, world_size=2)


def test_symlink_loop_in_class_folder_counts_each_file_once(data, caplog):
    os.symlink('.', data / 'train' / 'circle' / 'loop')  # circle/loop/loop/... forever
    os.symlink('../..', data / 'train' / 'square' / 'up')  # back to the data root (train and validation)
    with caplog.at_level(logging.WARNING):
        train, val = create_train_eval_datasets(dataset_args(data))
    assert len(train) == 12 and len(val) == 4  # timm's reader: 46x and a class 'loop'
    assert sorted(train.reader.class_to_idx) == sorted(CLASSES)
    assert any('2 folder symlink(s)' in r.getMessage() and 'not followed' in r.getMessage() for r in caplog.records)


def test_symlinked_class_folder_elsewhere_is_followed(data, tmp_path):
    outside = tmp_path / 'elsewhere'
    shutil.move(str(data / 'train' / 'diamond'), outside)
    os.symlink(outside, data / 'train' / 'diamond')
    train, _ = create_train_eval_datasets(dataset_args(data))
    assert len(train) == 12 and 'diamond' in train.reader.class_to_idx


def test_fifo_named_like_an_image_is_refused_not_hung(data, tmp_path):
    os.mkfifo(data / 'train' / 'circle' / 'x.png')
    with _no_hang():
        _refused(data, tmp_path, ValueError, r'circle/x.png is a FIFO \(named pipe\), not a regular image file')


def test_fifo_in_image_check_is_refused_not_hung(tmp_path):
    os.mkfifo(tmp_path / 'y.jpg')
    with _no_hang(), pytest.raises(ValueError, match=r'--data-dir: .*y.jpg is a FIFO'):
        files.check_image_files([tmp_path / 'y.jpg'])


def test_broken_symlink_named_like_an_image(data, tmp_path):
    os.symlink(tmp_path / 'gone.png', data / 'train' / 'square' / 'gone.png')
    _refused(data, tmp_path, ValueError, r'square/gone.png is a broken symlink, not an image file')


def test_scan_matches_timm_reader_on_a_clean_folder(data):
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    timm_reader = ReaderImageFolder(str(data / 'train'))
    scan = scan_image_folder(str(data / 'train'))
    ours = [(p, timm_reader.class_to_idx[lbl]) for p, lbl in scan.samples]
    assert ours == timm_reader.samples  # same files, order and labels as timm's train.py would use


# ---- class 9: disk full / write errors ------------------------------------------------------------------------

def _no_temp(folder):
    left = [p for p in os.listdir(folder) if p.endswith('.tmp') or p.startswith('.')]
    assert not left, left


def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, 'No space left on device')


def _saver(folder):
    model = torch.nn.Linear(2, 2)
    return checkpoint.AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=2)


def test_checkpoint_disk_full_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    saver = _saver(tmp_path)
    saver.save_checkpoint(0, metric=1.0)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    monkeypatch.setattr(torch, 'save', _enospc)
    with pytest.raises(DiskWriteError) as e:
        saver.save_checkpoint(1, metric=2.0)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and '\n' not in msg and 'unexpected pos' not in msg
    assert msg.startswith(f'cannot write {tmp_path / "last.pth.tar"}: no space left on the device (disk full)')
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    _no_temp(tmp_path)


def test_checkpoint_real_short_write_reports_enospc_not_unexpected_pos(tmp_path, monkeypatch):
    """A real kernel ENOSPC (writes go to /dev/full): torch alone would say 'unexpected pos N vs M'."""
    if not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full')
    real_open = files._open_new

    def open_full(tmp):
        real_open(tmp).close()  # the temp file exists, as on a real disk
        return open('/dev/full', 'wb')

    files.save_checkpoint_atomic({'w': torch.zeros(10)}, tmp_path / 'c.pth.tar')
    before = (tmp_path / 'c.pth.tar').read_bytes()
    monkeypatch.setattr(files, '_open_new', open_full)
    with pytest.raises(DiskWriteError, match=r'c.pth.tar: no space left on the device .*\[ENOSPC\]$') as e:
        files.save_checkpoint_atomic({'w': torch.zeros(100_000)}, tmp_path / 'c.pth.tar')
    assert 'unexpected pos' not in str(e.value)
    assert (tmp_path / 'c.pth.tar').read_bytes() == before
    _no_temp(tmp_path)


def test_torch_unexpected_pos_on_a_full_disk_is_diagnosed(tmp_path, monkeypatch):
    def short_write(*_, **__):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(torch, 'save', short_write)
    monkeypatch.setattr(os, 'statvfs', lambda _: Full)
    with pytest.raises(DiskWriteError, match=r'ck.pth.tar: no space left on the device \(disk full\)'):
        files.save_checkpoint_atomic({'a': 1}, tmp_path / 'ck.pth.tar')
    assert os.listdir(tmp_path) == []


def test_write_atomic_read_only_file_system(tmp_path, monkeypatch):
    files.write_atomic(tmp_path / 'args.yaml', 'old: 1\n')

    def ro(*_, **__):
        raise OSError(errno.EROFS, 'Read-only file system')

    monkeypatch.setattr(files, '_open_new', ro)
    with pytest.raises(DiskWriteError, match=r'cannot write .*args.yaml: the file system is read-only; write '
                                             r'elsewhere \[EROFS\]') as e:
        files.write_atomic(tmp_path / 'args.yaml', 'new: 2\n')
    assert e.value.errno == errno.EROFS
    assert (tmp_path / 'args.yaml').read_text() == 'old: 1\n'
    _no_temp(tmp_path)


def test_write_atomic_disk_full_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    files.write_atomic(tmp_path / 'energy_thresholds.json', '{"old": true}')
    monkeypatch.setattr(os, 'fsync', _enospc)
    with pytest.raises(DiskWriteError, match=r'energy_thresholds.json: no space left on the device'):
        files.write_atomic(tmp_path / 'energy_thresholds.json', '{"new": true}')
    assert (tmp_path / 'energy_thresholds.json').read_text() == '{"old": true}'
    _no_temp(tmp_path)


def test_best_copy_fails_without_hardlinks_and_disk_full(tmp_path, monkeypatch):
    saver = _saver(tmp_path)
    saver.save_checkpoint(0, metric=1.0)
    best = (tmp_path / 'model_best.pth.tar').read_bytes()

    def no_link(*_):
        raise OSError(errno.EPERM, 'Operation not permitted')

    monkeypatch.setattr(os, 'link', no_link)
    monkeypatch.setattr(shutil, 'copy2', _enospc)
    with pytest.raises(DiskWriteError, match=r'cannot write .*(checkpoint-1|model_best).pth.tar: no space left'):
        saver.save_checkpoint(1, metric=2.0)
    assert (tmp_path / 'model_best.pth.tar').read_bytes() == best
    assert load_checkpoint_file(tmp_path / 'last.pth.tar')['epoch'] == 1  # last itself was written
    _no_temp(tmp_path)


def test_disk_write_error_pickles():
    import pickle
    e = DiskWriteError('/x/last.pth.tar', OSError(errno.ENOSPC, 'full'))
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, DiskWriteError) and str(e2) == str(e) and e2.errno == errno.ENOSPC


# ---- class 11: file modes follow the umask ---------------------------------------------------------------------

@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize('mask,mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_library_writers_respect_the_umask(tmp_path, mask, mode):
    with _umask(mask):
        files.write_atomic(tmp_path / 'a.yaml', 'x')
        files.save_checkpoint_atomic({'a': 1}, tmp_path / 'c.pth.tar')
        _saver(tmp_path / 'ck').save_checkpoint(0, metric=1.0)
        assert files.default_file_mode() == mode
    for p in [tmp_path / 'a.yaml', tmp_path / 'c.pth.tar', *sorted((tmp_path / 'ck').iterdir())]:
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, p


def test_run_outputs_get_the_same_mode_as_checkpoints(base, data, tmp_path):
    out = tmp_path / 'out'
    with _umask(0o022):
        trainer.main(_argv(data, out, '--teacher', 'test_resnet', '--teacher-checkpoint', base['teacher'],
                           '--distill-loss', 'energy_kd'))
    run = out / 'run'
    names = {'args.yaml', 'energy_thresholds.json', 'energy_histogram.png', 'last.pth.tar', 'summary.csv',
             'training_curves.png'}
    assert names <= set(os.listdir(run))
    modes = {n: oct(stat.S_IMODE(os.stat(run / n).st_mode)) for n in names}
    assert set(modes.values()) == {'0o644'}, modes


# ---- through the CLI: exit status, one line on stderr, what is left ------------------------------------------

def _error_lines(err):
    return [ln for ln in err.splitlines() if ln.startswith('train_energykd.py: error:')]


def test_cli_refused_data_is_exit_2_and_one_line(data, tmp_path, capsys):
    _png(data / 'train' / 'stray.png', _any_png(data))
    assert trainer.cli(_argv(data, tmp_path / 'out')) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and 'Traceback' not in err
    assert 'stray.png is an image directly in the train folder' in _error_lines(err)[0]
    assert not (tmp_path / 'out').exists()


def test_cli_disk_full_at_the_first_checkpoint_is_exit_1_and_leaves_no_folder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, 'save', _enospc)
    assert trainer.cli(_argv(data, tmp_path / 'out')) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and 'Traceback' not in err and 'unexpected pos' not in err
    assert lines[0] == (f'train_energykd.py: error: cannot write {tmp_path / "out" / "run" / "last.pth.tar"}: '
                        'no space left on the device (disk full); free space there, or write elsewhere '
                        f'({lines[0].split("(")[-1].split(")")[0]}) [ENOSPC]')
    assert os.listdir(tmp_path / 'out') == []  # nothing saved: the run's folder is removed


def test_disk_full_at_epoch_1_keeps_epoch_0_and_resume_does_not_repeat_rows(data, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    argv = _argv(data, out, '--epochs', '3', '--checkpoint-hist', '1')
    real_save = torch.save

    def full_at_epoch_1(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get('epoch') == 1:
            _enospc()
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, 'save', full_at_epoch_1)
    with pytest.raises(DiskWriteError, match=r'last.pth.tar: no space left on the device'):
        trainer.main(argv)
    run = out / 'run'
    assert load_checkpoint_file(run / 'last.pth.tar')['epoch'] == 0
    assert sorted(os.listdir(run)) == ['args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar',
                                       'summary.csv', 'training_curves.png']  # no temp file
    assert [ln.split(',')[0] for ln in (run / 'summary.csv').read_text().splitlines()[1:]] == ['0', '1']
    monkeypatch.setattr(torch, 'save', real_save)  # space freed
    trainer.main(argv + ['--resume', str(run / 'last.pth.tar')])
    assert [ln.split(',')[0] for ln in (run / 'summary.csv').read_text().splitlines()[1:]] == ['0', '1', '2']
    assert load_checkpoint_file(run / 'last.pth.tar')['epoch'] == 2


def test_trim_summary_drops_later_rows_and_a_partial_line(tmp_path):
    p = tmp_path / 'summary.csv'
    p.write_text('epoch,train_loss,lr\n0,1.0,0.1\n1,0.9,0.1\n2,0.8,0.1\n3,0.')
    assert checkpoint.trim_summary(p, 2) == 2
    assert p.read_text() == 'epoch,train_loss,lr\n0,1.0,0.1\n1,0.9,0.1\n'
    assert checkpoint.trim_summary(p, 2) == 0 and checkpoint.trim_summary(tmp_path / 'none.csv', 1) == 0


def test_hub_export_respects_the_umask(tmp_path):
    import timm
    from timm_energykd import hub
    model = timm.create_model('test_resnet', num_classes=4)
    with _umask(0o022):
        folder = hub.export_for_hub(model, tmp_path / 'hub', run_info={'model': 'test_resnet'})
    modes = {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in Path(folder).iterdir()}
    assert set(modes.values()) == {'0o644'}, modes
    assert oct(stat.S_IMODE(os.stat(folder).st_mode)) == '0o755'


def test_empty_sub_folder_inside_a_class_with_images_is_ignored(data):
    (data / 'train' / 'circle' / '.ipynb_checkpoints').mkdir()  # clutter inside a class, as timm ignores it
    train, _ = create_train_eval_datasets(dataset_args(data))
    assert len(train) == 12 and sorted(train.reader.class_to_idx) == sorted(CLASSES)


def test_explicit_train_split_not_found(data, tmp_path):
    _refused(data, tmp_path, FileNotFoundError, r'^--train-split: folder .*/trn not found$', '--train-split', 'trn')


# ---- class 7 helper: a cheap dataset fingerprint for cache identities ---------------------------------------

def test_dataset_fingerprint_changes_when_images_change_in_place(data):
    from timm_energykd.data import TransformSubset, dataset_fingerprint
    from timm_energykd.replay import EpochSeededDataset
    fp = dataset_fingerprint(create_train_eval_datasets(dataset_args(data))[0])
    assert fp == dataset_fingerprint(create_train_eval_datasets(dataset_args(data))[0])  # stable
    moved = shutil.copytree(data, data.parent / 'moved')  # same content elsewhere: same fingerprint
    train_moved = create_train_eval_datasets(dataset_args(moved))[0]
    for src, dst in zip(sorted((data / 'train').rglob('*.png')), sorted((moved / 'train').rglob('*.png'))):
        shutil.copystat(src, dst)
    assert dataset_fingerprint(train_moved) == fp
    assert dataset_fingerprint(EpochSeededDataset(train_moved, 3)) == fp
    assert dataset_fingerprint(TransformSubset(train_moved, [0, 1])) != fp
    victim = sorted((data / 'train' / 'square').glob('*.png'))[0]
    shutil.copy(sorted((data / 'train' / 'circle').glob('*.png'))[0], victim)  # replaced in place
    assert dataset_fingerprint(create_train_eval_datasets(dataset_args(data))[0]) != fp
