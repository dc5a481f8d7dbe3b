"""Issue 13 class 3 / issue 19: resume is bit-identical with DataLoader workers (persistent, the trainer's
default), not only with ``--workers 0``.

The data stream is a function of (seed, epoch, sample index) (``timm_energykd.replay``), so a run with 2 persistent
workers trains exactly like the ``--workers 0`` run, and one SIGKILLed mid-epoch and resumed (fresh workers, while
the uninterrupted run's workers had served the earlier epochs) ends with the same weights, momentum buffers,
learning rate and thresholds, bitwise. Same setup as tests/test_interrupt.py (CPU, one thread, HE-DA, SGD
momentum, cosine schedule, 3 epochs, train augmentation)."""
import multiprocessing
import os
import signal

import pytest
import torch

from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.files import load_checkpoint_file
from timm_energykd.train import loop as train_loop
from timm_energykd.train import trainer

from helpers import random_teacher_checkpoint

EPOCHS = 3


# one torch thread (conftest): bitwise-reproducible CPU kernels across the runs compared below
pytestmark = pytest.mark.usefixtures('one_thread')


def _argv(root, data, teacher, workers):
    return [str(data), '--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint', str(teacher),
            '--distill-loss', 'energy_kd', '--he-da', 'cutmix', '--he-da-rate', '0.45', '--img-size', '32',
            '--batch-size', '4', '--workers', str(workers), '--device', 'cpu', '--output', str(root / 'out'),
            '--epochs', str(EPOCHS), '--sched', 'cosine', '--warmup-epochs', '0', '--opt', 'sgd', '--momentum', '0.9',
            '--lr', '0.05', '--log-interval', '1', '--seed', '7', '--scale', '0.5', '1.0', '--hflip', '0.5']


@pytest.fixture(scope='module')
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp('interrupt_workers')
    data = make_demo_imagefolder(root / 'data', train_per_class=4, val_per_class=2, size=32, num_classes=4)
    teacher = random_teacher_checkpoint(root / 'teacher.pth.tar', seed=0)
    ref = trainer.main(_argv(root, data, teacher, 0) + ['--experiment', 'ref-w0'])
    return dict(root=root, data=data, teacher=teacher,
                ref_last=load_checkpoint_file(os.path.join(ref['output_dir'], 'last.pth.tar')))


def _same_final_state(got, ref):
    assert got['epoch'] == ref['epoch'] == EPOCHS - 1
    for k, v in ref['state_dict'].items():
        assert torch.equal(got['state_dict'][k], v), k
    assert [g['lr'] for g in got['optimizer']['param_groups']] == [g['lr'] for g in ref['optimizer']['param_groups']]
    for i, s in ref['optimizer']['state'].items():
        assert torch.equal(got['optimizer']['state'][i]['momentum_buffer'], s['momentum_buffer'])
    assert got['task_state']['thresholds'] == ref['task_state']['thresholds']


def _child(argv):
    real_read = train_loop._read_terms

    def read_terms(sums, count, args, epoch, batch_idx):
        if epoch == 1 and batch_idx == 1:  # epoch 1, after its second optimizer step
            os.kill(os.getpid(), signal.SIGKILL)
        return real_read(sums, count, args, epoch, batch_idx)
    train_loop._read_terms = read_terms
    trainer.main(argv)
    os._exit(3)  # not reached


def test_two_persistent_workers_train_exactly_like_workers_0(setup):
    r = trainer.main(_argv(setup['root'], setup['data'], setup['teacher'], 2) + ['--experiment', 'w2'])
    _same_final_state(load_checkpoint_file(os.path.join(r['output_dir'], 'last.pth.tar')), setup['ref_last'])


def test_sigkill_mid_epoch_with_workers_then_resume_is_bit_identical(setup):
    argv = _argv(setup['root'], setup['data'], setup['teacher'], 2) + ['--experiment', 'kill-w2']
    p = multiprocessing.get_context('fork').Process(target=_child, args=(argv,))
    p.start()
    p.join(180)
    if p.is_alive():
        p.kill()
        pytest.fail('the child did not finish')
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    last = setup['root'] / 'out' / 'kill-w2' / 'last.pth.tar'
    assert load_checkpoint_file(last)['epoch'] == 0
    trainer.main(argv + ['--resume', str(last)])
    _same_final_state(load_checkpoint_file(last), setup['ref_last'])
