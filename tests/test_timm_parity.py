"""Optimizer and LR schedule equal timm's own train.py for the same flags (no teacher, tiny data, 3 epochs).

The expected values in tests/data/timm_train_oracle.json were produced by running timm's train.py (the
commit in timm_flags.SOURCE, with the installed timm) beside ours on the same generated folder; see the
file's ``how`` entry. Each case here runs our trainer with the same flags and compares ``last.pth.tar``'s
optimizer param groups and summary.csv's ``lr`` column.
"""
import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_energykd.train import build
from timm_energykd.train import trainer as train_energykd

ORACLE = json.loads((Path(__file__).parent / 'data' / 'timm_train_oracle.json').read_text())
BASE = ['--model', 'resnet18', '--num-classes', '2', '--img-size', '32', '--epochs', '3', '--workers', '0',
        '--device', 'cpu', '--batch-size', '4', '--seed', '0']


def _oracle_folder(root: Path, train_per_class: int = 8) -> Path:
    """The folder the oracle was recorded on: 2 classes, 8 train / 4 validation random 32 px images each."""
    rng = np.random.default_rng(0)
    for split, n in (('train', train_per_class), ('validation', 4)):
        for c in ('a', 'b'):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _oracle_folder(tmp_path_factory.mktemp('oracle') / 'data')


def _argv(folder, out, name, flags):
    argv = [str(folder)] + BASE + ['--output', str(out), '--experiment', name] + list(flags)
    return argv


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(k for k in ORACLE if k != 'how'))
def test_optimizer_and_lr_column_equal_timm(folder, tmp_path, name, caplog):
    case = ORACLE[name]
    with caplog.at_level(logging.INFO, logger='train'):
        r = train_energykd.main(_argv(folder, tmp_path, name, case['flags']))
    ckpt = torch.load(os.path.join(r['output_dir'], 'last.pth.tar'), map_location='cpu', weights_only=False)
    groups = ckpt['optimizer']['param_groups']
    assert len(groups) == len(case['param_groups'])
    for got, want in zip(groups, case['param_groups']):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, key)
            else:
                assert (list(got[key]) if isinstance(got[key], tuple) else got[key]) == value, (name, key)
    with open(os.path.join(r['output_dir'], 'summary.csv')) as f:
        lrs = [float(row['lr']) for row in csv.DictReader(f)]
    assert lrs == pytest.approx(case['summary_lr'], rel=1e-9, abs=1e-15)
    if case['lr_log']:  # timm's line saying where the LR came from
        assert case['lr_log'][0].split(' - ')[-1].split('INFO: ')[-1] in caplog.text


def test_unknown_opt_kwarg_fails_before_training(folder, tmp_path):
    with pytest.raises(ValueError, match=r'^--opt sgd / --opt-kwargs .*bogus'):
        train_energykd.main(_argv(folder, tmp_path, 'bogus', ['--opt-kwargs', 'bogus=1']))
    assert not (tmp_path / 'bogus').exists()


class _Stop(Exception):
    pass


def test_main_command_trains_at_timm_lr(tmp_path, monkeypatch, caplog):
    """`train_energykd.py DATA --teacher resnet50 --model mobilenetv1_100 --energy-rate 0.3` builds SGD at 0.05
    for batch 128 (timm: lr_base 0.1 * 128 / 256, linear for SGD) and logs where 0.05 came from."""
    import timm
    data = _oracle_folder(tmp_path / 'data', train_per_class=64)  # one full batch of 128
    teacher = timm.create_model('resnet50', num_classes=2)
    ckpt = tmp_path / 'teacher.pth.tar'
    torch.save({'state_dict': teacher.state_dict(), 'epoch': 0, 'version': 2}, ckpt)
    built = {}
    real = build.create_optimizer

    def create_optimizer(args, model):
        built['opt'] = real(args, model)
        return built['opt']

    def stop(*a, **k):
        raise _Stop()
    monkeypatch.setattr(build, 'create_optimizer', create_optimizer)
    monkeypatch.setattr(build, 'create_loaders', stop)
    with caplog.at_level(logging.INFO, logger='train'), pytest.raises(_Stop):
        train_energykd.main([str(data), '--teacher', 'resnet50', '--teacher-checkpoint', str(ckpt), '--model',
                             'mobilenetv1_100', '--energy-rate', '0.3', '--device', 'cpu', '--output', str(tmp_path)])
    opt = built['opt']
    assert type(opt).__name__ == 'SGD'
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.05] * len(opt.param_groups))
    assert all(g['nesterov'] and g['momentum'] == 0.9 for g in opt.param_groups)
    assert ('Learning rate (0.05) calculated from base learning rate (0.1) and effective global batch size (128) '
            'with linear scaling.') in caplog.text
