"""The trainer's log lines have the fields of timm's train.py (issue 16), checked against lines timm printed.

TIMM_LINES were printed by timm's own train.py (the commit in timm_flags.SOURCE, timm 1.0.31, CPU):
``train.py DIR --model resnet18 --num-classes 2 --img-size 32 --epochs 2 --workers 0 --device cpu
--batch-size 4 --log-interval 1``. A line's shape is the line with every number replaced by ``#``.
"""
import logging
import re

import pytest

from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.train import trainer

from helpers import random_teacher_checkpoint

TIMM_LINES = {
    'train': 'Train: 0 [   1/4 ( 50%)]  Loss: 0.572 (0.707)  Time: 0.302s,   13.24/s  (1.119s,    3.57/s)  '
             'LR: 1.000e-05  Data: 0.003 (0.008)',
    'test': 'Test: [   0/1]  Time: 0.133 (0.133)  Loss:   0.706 ( 0.706)  Acc@1:  25.000 ( 25.000)  '
            'Acc@5: 100.000 (100.000)',
    'best': '*** Best metric: 37.5 (epoch 1)',
}


def _shape(line: str) -> str:
    line = line.split(' - ', 1)[-1] if ' - ' in line[:40] else line
    line = re.sub(r'\d+(\.\d+)?(e[+-]\d+)?', '#', line)
    return re.sub(r'([(\[]) +', r'\1', re.sub(r' +', ' ', line)).strip()  # padding of right-aligned numbers


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('logs')
    data = make_demo_imagefolder(root / 'data', train_per_class=4, val_per_class=2, size=32, num_classes=2)
    teacher = random_teacher_checkpoint(root / 't.pth.tar', num_classes=2)
    base = [str(data), '--model', 'test_resnet', '--img-size', '32', '--batch-size', '4', '--workers', '0',
            '--device', 'cpu', '--output', str(root / 'out'), '--epochs', '2', '--log-interval', '1']
    return dict(root=root, base=base, teacher=teacher)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == 'train']


def test_plain_training_lines_have_timms_shape(runs, caplog):
    with caplog.at_level(logging.INFO, logger='train'):
        r = trainer.main(runs['base'] + ['--experiment', 'plain', '--validation-batch-size', '2'])
    msgs = _messages(caplog)
    train = [m for m in msgs if m.startswith('Train:')]
    test = [m for m in msgs if m.startswith('Test:')]
    assert train and all(_shape(m) == _shape(TIMM_LINES['train']) for m in train), train[:2]
    # every --log-interval batch and the last, not one final line
    assert test and all(_shape(m) == _shape(TIMM_LINES['test']) for m in test), test[:2]
    assert len(test) == 2 * 2  # 2 validation batches x 2 epochs
    best = [m for m in msgs if m.startswith('*** Best metric')]
    assert [_shape(m) for m in best] == [_shape(TIMM_LINES['best'])]
    assert f"({r['best_epoch']})" in best[0].replace('epoch ', '')
    eta = [m for m in msgs if 'ETA' in m]
    assert len(eta) == 2 and '1 epoch left, ETA' in eta[0] and '0 epochs left, ETA 0:00:00' in eta[1]


def test_distillation_lines_start_with_timms_fields(runs, caplog):
    with caplog.at_level(logging.INFO, logger='train'):
        trainer.main(runs['base'] + ['--experiment', 'kd', '--teacher', 'test_resnet', '--teacher-checkpoint',
                                     runs['teacher']])
    train = [m for m in _messages(caplog) if m.startswith('Train:')]
    timm_shape = _shape(TIMM_LINES['train'])
    assert train and all(_shape(m).startswith(timm_shape + ' task: # kd: #') for m in train), train[:2]
    assert all('low/high: ' in m and ' T: ' in m for m in train)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(runs, caplog):
    out = runs['root'] / 'out' / 'plain'
    with caplog.at_level(logging.INFO, logger='train'):
        r = trainer.main(runs['base'] + ['--experiment', 'plain', '--validation-batch-size', '2', '--resume',
                                         str(out / 'last.pth.tar')])
    assert r.get('nothing_to_do') is True
    assert any(m.startswith('Nothing to do: the checkpoint is at epoch 2 of 2') for m in _messages(caplog))
