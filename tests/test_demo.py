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
    # stage headers with elapsed time, one per run, and the plain sentence on what the numbers can show
    for i in (1, 2, 3):
        assert f'=== demo stage {i}/3:' in out and f'=== demo stage {i}/3 done:' in out
    assert 's elapsed) ===' in out and demo.CAVEAT in out and 'one seed' in demo.CAVEAT
    # plain KD does not use the energy temperatures: its row has no low/high or mean-T columns
    kd_row = next(line for line in out.splitlines() if line.startswith('student, KD '))
    ekd_row = next(line for line in out.splitlines() if line.startswith('student, Energy KD'))
    assert '%' not in kd_row and '%' in ekd_row
    assert len(kd_row.split()[2:]) == 4 and len(ekd_row.split()[3:]) == 7  # model, top-1, top-5, time (+ low/high, T)
    # the printed load command gives the trained weights: exactly the export's, exactly model_best's
    saved = summary['saved']
    load_line = next(line for line in out.splitlines() if line.startswith('load it with: '))
    code = load_line[len('load it with: '):]
    assert "pretrained=True" in code and code == summary['load']
    scope = {}
    exec(code.replace('timm.create_model(', 'model = timm.create_model(', 1), scope)
    model = scope['model']
    from safetensors.torch import load_file
    exported = load_file(os.path.join(saved, 'model.safetensors'))
    from timm_energykd.files import load_checkpoint_file
    best = load_checkpoint_file(os.path.join(results['energy_kd']['output_dir'], 'model_best.pth.tar'))['state_dict']
    state = model.state_dict()
    assert set(state) == set(exported) == set(best)
    for k, v in state.items():
        assert torch.equal(v, exported[k]) and torch.equal(v, best[k]), k
    assert model.num_classes == cfg.num_classes
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, cfg.img_size, cfg.img_size)).shape == (2, cfg.num_classes)
    # without pretrained=True timm would build random weights: the check above would fail
    random = timm.create_model(f'local-dir:{saved}')
    assert not all(torch.equal(v, random.state_dict()[k]) for k, v in state.items() if v.is_floating_point())


def test_format_results_kd_row_without_temperature_columns(tmp_path):
    class _Task:
        def __init__(self, energy):
            self.uses_energy_temperature = energy
    (tmp_path / 'summary.csv').write_text('epoch,train_frac_low,train_frac_high,train_temp_mean\n0,0.3,0.25,4.06\n')
    metrics = {'top1': 50.0, 'top5': 90.0}
    rows = [('student, KD', 'm', dict(eval_metrics=metrics, time_s=1.0, output_dir=str(tmp_path), task=_Task(False))),
            ('student, Energy KD', 'm', dict(eval_metrics=metrics, time_s=1.0, output_dir=str(tmp_path),
                                             task=_Task(True)))]
    table = demo.format_results(rows, 2.0, 10).splitlines()
    assert table[2].rstrip().endswith('1.0') and '30%/ 25%' in table[3] and table[3].rstrip().endswith('4.06')
    assert table[-1] == demo.CAVEAT


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
