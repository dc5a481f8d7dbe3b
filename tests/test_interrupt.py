"""Issue 6, interruption: a training run SIGKILLed at several points resumes from its last complete checkpoint
with the same thresholds, optimizer and scheduler state, and ends with exactly the weights of an uninterrupted
run (CPU, one thread, workers 0, tiny generated data).

Each killed run is a forked child of the test process (no second torch import): a hook placed in the child
sends SIGKILL to its own process at the chosen moment, so nothing gets to clean up, as with ``kill -9`` or a
pre-empted job. Resumes run in-process through ``train_energykd.main(argv)``, like the CLI.
"""
import io
import multiprocessing
import os
import signal

import pytest
import torch

from timm_energykd.train import loop as train_loop
from timm_energykd.train import trainer as train_energykd
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.files import load_checkpoint_file

from helpers import random_teacher_checkpoint

EPOCHS = 3


# one torch thread (conftest): bitwise-reproducible CPU kernels across the runs compared below
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp('interrupt')
    data = make_demo_imagefolder(root / 'data', train_per_class=4, val_per_class=2, size=32, num_classes=4)
    teacher = random_teacher_checkpoint(root / 'teacher.pth.tar', seed=0)
    out = root / 'out'
    # augmentation, HE-DA draws, SGD momentum and a cosine schedule: all state a resume must get right
    argv = [str(data), '--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint', str(teacher),
            '--distill-loss', 'energy_kd', '--he-da', 'cutmix', '--he-da-rate', '0.45',
            '--img-size', '32', '--batch-size', '4', '--workers', '0', '--device', 'cpu', '--output', str(out),
            '--epochs', str(EPOCHS), '--sched', 'cosine', '--warmup-epochs', '0', '--opt', 'sgd',
            '--momentum', '0.9', '--lr', '0.05', '--log-interval', '1', '--seed', '7']
    ref = train_energykd.main(argv + ['--experiment', 'ref'])
    return dict(root=root, out=out, argv=argv, ref=ref, ref_last=load_checkpoint_file(
        os.path.join(ref['output_dir'], 'last.pth.tar')))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _child(argv, point):
    import timm_energykd.calibration as energy_mod  # calibrate_or_load calls energy.calibrate_thresholds from here

    if point == 'calibration':  # after the first teacher batch of the calibration pass
        real = energy_mod.calibrate_thresholds

        def calibrate(teacher_fn, loader, *a, **kw):
            calls = []

            def fn(x):
                calls.append(1)
                if len(calls) == 2:
                    _die()
                return teacher_fn(x)
            return real(fn, loader, *a, **kw)
        energy_mod.calibrate_thresholds = calibrate
    elif point == 'mid_epoch':  # epoch 1, after its second optimizer step
        real_read = train_loop._read_terms

        def read_terms(sums, count, args, epoch, batch_idx):
            if epoch == 1 and batch_idx == 1:
                _die()
            return real_read(sums, count, args, epoch, batch_idx)
        train_loop._read_terms = read_terms
    elif point == 'after_checkpoint':  # epoch 1's checkpoint is complete
        real_save = train_energykd.AtomicCheckpointSaver.save_checkpoint

        def save_checkpoint(self, epoch, metric=None):
            out = real_save(self, epoch, metric)
            if epoch == 1:
                _die()
            return out
        train_energykd.AtomicCheckpointSaver.save_checkpoint = save_checkpoint
    elif point == 'during_save':  # half of epoch 1's checkpoint is on disk
        real_torch_save = torch.save

        def save(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get('epoch') == 1:
                buf = io.BytesIO()
                real_torch_save(obj, buf, *a, **kw)
                dst = open(f, 'wb') if isinstance(f, str) else f  # files.torch_save_file passes its open file
                dst.write(buf.getvalue()[:1000])
                dst.flush()
                os.fsync(dst.fileno())
                _die()
            return real_torch_save(obj, f, *a, **kw)
        torch.save = save
    train_energykd.main(argv)
    os._exit(3)  # not reached: the hook kills first


def _run_killed(argv, point):
    ctx = multiprocessing.get_context('fork')
    p = ctx.Process(target=_child, args=(argv, point))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail(f'{point}: the child did not finish')
    assert p.exitcode == -signal.SIGKILL, f'{point}: exit code {p.exitcode}'


def _same_final_state(got, ref):
    assert got['epoch'] == ref['epoch'] == EPOCHS - 1
    for k, v in ref['state_dict'].items():
        assert torch.equal(got['state_dict'][k], v), k
    # optimizer: momentum buffers and the scheduler-set learning rate
    assert [g['lr'] for g in got['optimizer']['param_groups']] == [g['lr'] for g in ref['optimizer']['param_groups']]
    for i, s in ref['optimizer']['state'].items():
        assert torch.equal(got['optimizer']['state'][i]['momentum_buffer'], s['momentum_buffer'])
    assert got['task_state']['thresholds'] == ref['task_state']['thresholds']


@pytest.mark.parametrize('point,resumes_at', [('mid_epoch', 1), ('after_checkpoint', 2), ('during_save', 1)])
def test_sigkill_then_resume_matches_uninterrupted(setup, point, resumes_at):
    exp = f'kill-{point}'
    run_dir = setup['out'] / exp
    _run_killed(setup['argv'] + ['--experiment', exp], point)

    last = run_dir / 'last.pth.tar'
    ckpt = load_checkpoint_file(last)  # complete and readable whatever the moment of the kill
    assert ckpt['epoch'] == resumes_at - 1
    ref_thr = setup['ref_last']['task_state']['thresholds']
    assert ckpt['task_state']['thresholds'] == ref_thr
    if point == 'during_save':
        partial = sorted(run_dir.glob('.tmp.pth.tar.*.tmp'))  # the half-written temp file, never read
        assert len(partial) == 1 and partial[0].stat().st_size == 1000
        with pytest.raises(ValueError, match='cannot read checkpoint'):
            load_checkpoint_file(partial[0])

    # resume reuses the thresholds from the checkpoint: a cache path that does not exist stays untouched
    no_cache = setup['root'] / f'{exp}-cache.json'
    r = train_energykd.main(setup['argv'] + ['--experiment', exp, '--resume', str(last),
                                             '--calibration-cache', str(no_cache)])
    assert not no_cache.exists()
    assert r['thresholds'].to_dict() == ref_thr
    _same_final_state(load_checkpoint_file(last), setup['ref_last'])
    with open(run_dir / 'summary.csv') as f:
        epochs = [line.split(',')[0] for line in f.read().splitlines()[1:]]
    assert epochs[-1] == str(EPOCHS - 1)


def test_sigkill_during_calibration_then_rerun(setup):
    exp = 'kill-calibration'
    run_dir = setup['out'] / exp
    _run_killed(setup['argv'] + ['--experiment', exp], 'calibration')
    names = os.listdir(run_dir)
    assert 'energy_thresholds.json' not in names and not any(n.endswith('.pth.tar') for n in names)
    # nothing to resume: the same command again recalibrates (same thresholds) and trains to the same weights
    r = train_energykd.main(setup['argv'] + ['--experiment', exp])
    assert r['thresholds'].to_dict() == setup['ref']['thresholds'].to_dict()
    _same_final_state(load_checkpoint_file(run_dir / 'last.pth.tar'), setup['ref_last'])
