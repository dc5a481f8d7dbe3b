"""The offline demo's machinery at toy size (TINY_DEMO): same trainer calls as ``--demo``, seconds not minutes."""
import os

import pytest
import timm
import torch

from timm_energykd.train import trainer as train_energykd
from timm_energykd import demo
from timm_energykd.train.args import parse_args


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.slow
def test_demo_cli_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch, capsys):
    # the CLI path (`train_energykd.py --demo`) with the default sizes swapped for the tiny ones
    monkeypatch.setattr(demo, 'DEFAULT_DEMO', demo.TINY_DEMO)
    results = train_energykd.main(['--demo', '--output', str(tmp_path), '--device', 'cpu'])
    out = capsys.readouterr().out
    cfg = demo.TINY_DEMO
    for run in ('teacher', 'student, KD', 'student, Energy KD'):
        assert run in out
    assert 'total demo time' in out and 'student saved to' in out
    summary = results['summary']
    assert os.path.isfile(summary['plot']) and os.path.getsize(summary['plot']) > 1000
    # the teacher is trained from scratch; both students are distilled from its checkpoint
    assert results['teacher']['eval_metrics'] and results['kd']['eval_metrics']
    for key in ('kd', 'energy_kd'):
        assert os.path.isfile(os.path.join(results[key]['output_dir'], 'model_best.pth.tar'))
    assert results['energy_kd']['thresholds'] is not None
    # the saved student round-trips through timm (hub layout)
    saved = summary['saved']
    assert os.path.isfile(os.path.join(saved, 'config.json'))
    model = timm.create_model(f'local-dir:{saved}')
    assert model.num_classes == cfg.num_classes
    with torch.no_grad():
        assert model(torch.randn(2, 3, cfg.img_size, cfg.img_size)).shape == (2, cfg.num_classes)


def test_demo_commands_are_valid_trainer_command_lines(tmp_path):
    cmds = demo.demo_commands(tmp_path / 'data', tmp_path / 'out', demo.DEFAULT_DEMO, teacher_checkpoint='t.pth.tar')
    assert set(cmds) == {'teacher', 'kd', 'energy_kd'}
    t, _ = parse_args(cmds['teacher'])
    assert t.teacher is None and t.model == demo.DEFAULT_DEMO.teacher
    kd, _ = parse_args(cmds['kd'])
    ekd, _ = parse_args(cmds['energy_kd'])
    assert kd.distill_loss == 'kd' and ekd.distill_loss == 'energy_kd'
    for a in (kd, ekd):  # the paper's CIFAR loss weights and temperature
        assert a.teacher == demo.DEFAULT_DEMO.teacher and a.teacher_checkpoint == 't.pth.tar'
        assert a.task_loss_weight == 0.1 and a.distill_loss_weight == 0.9 and a.kd_temperature == 4
    # the default demo uses the project's CIFAR models, not ImageNet ones
    assert demo.DEFAULT_DEMO.teacher.startswith('cifar_') and demo.DEFAULT_DEMO.student.startswith('cifar_')
