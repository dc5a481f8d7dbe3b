"""Issue 13, hostile runs: resume identity (2), non-finite values (4), late failures (5), caches (7), two runs
in one folder (8), messages (9).

Each case goes through the console entry ``trainer.cli(argv)`` (what ``python train_energykd.py`` runs) and
asserts the exit status, the one-line message on stderr, and what is left on disk. Runs are CPU, workers 0,
``test_resnet`` at 32 px on a tiny generated ImageFolder.
"""
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.energy import EnergyThresholds
from timm_energykd.files import load_checkpoint_file
from timm_energykd.train import trainer
from timm_energykd.train.outdir import claim_output_dir

from helpers import random_teacher_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')


def _argv(data, out, *extra, teacher=None, exp='run'):
    argv = [str(data), '--model', 'test_resnet', '--img-size', '32', '--batch-size', '4', '--workers', '0',
            '--device', 'cpu', '--output', str(out), '--epochs', '1', '--warmup-epochs', '0', '--log-interval', '2',
            '--experiment', exp]
    if teacher:
        argv += ['--teacher', 'test_resnet', '--teacher-checkpoint', teacher]
    return argv + list(extra)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp('hostile_run')
    data = make_demo_imagefolder(root / 'data', train_per_class=3, val_per_class=1, size=32, num_classes=4)
    teacher = random_teacher_checkpoint(root / 't.pth.tar', seed=0)
    out = root / 'out'
    assert trainer.cli(_argv(data, out, teacher=teacher, exp='ok')) == 0
    return dict(root=root, data=data, teacher=teacher, out=out, ok=out / 'ok')


def _cli(capsys, argv):
    """(exit status, the last stderr line, number of stderr lines that are not log lines)."""
    capsys.readouterr()
    rc = trainer.cli(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith('train_energykd.py: error:')]
    return rc, (err[-1] if err else ''), len(err)


def _refused(capsys, argv, match, out=None, rc=2):
    before = set(os.listdir(out)) if out and os.path.isdir(out) else None
    got, line, n = _cli(capsys, argv)
    assert got == rc and n == 1, (got, line)
    assert match in line, line
    if before is not None:  # nothing new is left behind
        assert set(os.listdir(out)) == before
    return line


# ---- class 2: resume that would change the experiment ----------------------------------------------------

@pytest.mark.parametrize('extra,diff', [
    (['--energy-rate', '0.3'], 'energy_rate 0.2 -> 0.3'),
    (['--temp-direction', 'reverse'], "temp_direction 'paper' -> 'reverse'"),
    (['--calibration', 'running'], "calibration 'dataset' -> 'running'"),
    (['--distill-loss', 'energy_dkd'], "distill_loss 'energy_kd' -> 'energy_dkd'"),
    (['--kd-temperature', '3'], 'kd_temperature 4.0 -> 3.0'),
    (['--seed', '7'], 'seed 42 -> 7'),
])
def test_resume_with_another_setting_is_refused(env, capsys, extra, diff):
    argv = _argv(env['data'], env['out'], '--resume', str(env['ok'] / 'last.pth.tar'), '--epochs', '2',
                 teacher=env['teacher'], exp='ok') + extra
    before = sorted(os.listdir(env['ok']))
    line = _refused(capsys, argv, diff)
    assert 'was trained with other settings' in line
    assert sorted(os.listdir(env['ok'])) == before


def test_resume_without_the_teacher_checkpoint_is_refused(env, capsys):
    """Before: a random teacher. Now the named teacher's weights are required: timm's pretrained ones (offline
    here: one line), else the run stops; a random teacher only with --no-teacher-pretrained."""
    argv = _argv(env['data'], env['out'], '--resume', str(env['ok'] / 'last.pth.tar'), '--epochs', '2',
                 '--teacher', 'test_resnet', exp='ok')
    before = sorted(os.listdir(env['ok']))
    _refused(capsys, argv, "--teacher-pretrained: timm's pretrained weights for 'test_resnet'")
    assert sorted(os.listdir(env['ok'])) == before
    # asking for a random teacher explicitly: still not the teacher the checkpoint was distilled from
    _refused(capsys, argv + ['--no-teacher-pretrained'], 'teacher_checkpoint_sha256 ')


def test_resume_on_another_data_folder_is_refused(env, capsys, tmp_path):
    other = tmp_path / 'data'
    shutil.copytree(env['data'], other)
    argv = _argv(other, env['out'], '--resume', str(env['ok'] / 'last.pth.tar'), '--epochs', '2',
                 teacher=env['teacher'], exp='ok')
    line = _refused(capsys, argv, 'data_dir ')
    assert 'was trained with other settings' in line


def test_resume_after_images_replaced_in_place_is_refused(env, capsys, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(env['data'], data)
    out = tmp_path / 'out'
    assert trainer.cli(_argv(data, out, teacher=env['teacher'], exp='a')) == 0
    img = sorted((data / 'train').rglob('*.png'))[0]
    img.write_bytes(sorted((data / 'train').rglob('*.png'))[1].read_bytes() + b'\0')  # same name, new content
    argv = _argv(data, out, '--resume', str(out / 'a' / 'last.pth.tar'), '--epochs', '2', teacher=env['teacher'],
                 exp='a')
    _refused(capsys, argv, 'data_fingerprint ')


# ---- class 4: non-finite values ---------------------------------------------------------------------------

@pytest.mark.parametrize('extra,flag', [
    (['--kd-temperature', 'inf'], '--kd-temperature'),
    (['--distill-loss-weight', 'nan'], '--distill-loss-weight'),
    (['--lr', 'nan'], '--lr'),
    (['--mean', '0.5', 'nan', '0.5'], '--mean'),
    (['--energy-temperature=-inf'], '--energy-temperature'),
    (['--temp-delta-low', 'inf'], '--temp-delta-low'),
])
def test_non_finite_flags_are_refused(env, capsys, tmp_path, extra, flag):
    _refused(capsys, _argv(env['data'], tmp_path / 'out', *extra, teacher=env['teacher']),
             f'{flag} must be a finite number')
    assert not (tmp_path / 'out').exists()


def test_diverging_run_stops_without_saving_nan_weights(env, capsys, tmp_path):
    out = tmp_path / 'out'
    assert trainer.cli(_argv(env['data'], out, teacher=env['teacher'], exp='d')) == 0
    good = load_checkpoint_file(out / 'd' / 'last.pth.tar')
    argv = _argv(env['data'], out, '--resume', str(out / 'd' / 'last.pth.tar'), '--epochs', '3', '--lr', '1e30', '--no-resume-opt',
                 '--warmup-epochs', '0', teacher=env['teacher'], exp='d')
    line = _refused(capsys, argv, 'non-finite', rc=3)
    assert 'the run stopped before saving' in line or 'weights are not finite' in line
    kept = load_checkpoint_file(out / 'd' / 'last.pth.tar')
    assert kept['epoch'] == good['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in kept['state_dict'].values() if v.is_floating_point())


# ---- class 5: failures that used to come late --------------------------------------------------------------

@pytest.mark.parametrize('extra,match', [
    (['--log-interval', '0'], '--log-interval must be >= 1'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist must be >= 1'),
    (['--val-interval', '0'], '--val-interval must be >= 1'),
    (['--push-to-hub', 'not a repo!!'], "--push-to-hub: 'not a repo!!' is not a Hub repo id"),
    (['--push-to-hub', 'justaname'], '--push-to-hub: \'justaname\': expected USER/NAME'),
    (['--model-dtype', 'float8'], '--model-dtype must be float32, float16 or bfloat16'),
    (['--pretrained-path', 'x.pth'], '--pretrained-path is loaded as the pretrained weights: add --pretrained'),
    (['--opt-kwargs', 'bogus=1'], '--opt sgd / --opt-kwargs'),
])
def test_bad_settings_stop_before_any_work(env, capsys, tmp_path, extra, match):
    _refused(capsys, _argv(env['data'], tmp_path / 'out', *extra, teacher=env['teacher']), match)
    assert not (tmp_path / 'out' / 'run').exists()


def test_calibration_cache_that_is_a_folder(env, capsys, tmp_path):
    (tmp_path / 'cache').mkdir()
    _refused(capsys, _argv(env['data'], tmp_path / 'out', '--calibration-cache', str(tmp_path / 'cache'),
                           teacher=env['teacher']), '--calibration-cache: ')
    assert not (tmp_path / 'out' / 'run').exists()


def test_calibration_cache_under_a_file(env, capsys, tmp_path):
    (tmp_path / 'f').write_text('x')
    _refused(capsys, _argv(env['data'], tmp_path / 'out', '--calibration-cache', str(tmp_path / 'f' / 'c.json'),
                           teacher=env['teacher']), 'exists and is not a folder')


def test_export_into_the_runs_own_folder(env, capsys, tmp_path):
    out = tmp_path / 'out'
    _refused(capsys, _argv(env['data'], out, '--export-hub', str(out / 'run'), teacher=env['teacher']),
             "is the run's own output folder")
    assert not out.exists() or not (out / 'run').exists()


def test_export_under_a_file(env, capsys, tmp_path):
    (tmp_path / 'f').write_text('x')
    _refused(capsys, _argv(env['data'], tmp_path / 'out', '--export-hub', str(tmp_path / 'f' / 'hub'),
                           teacher=env['teacher']), '--export-hub: cannot create')


# ---- class 7: caches trusted too far -----------------------------------------------------------------------

def _damaged_cache(env, tmp_path, edit):
    cache = tmp_path / 'cache.json'
    d = json.loads((env['ok'] / 'energy_thresholds.json').read_text())
    edit(d)
    cache.write_text(json.dumps(d))
    return cache


@pytest.mark.parametrize('edit,match', [
    (lambda d: d.update(low=float('nan')), 'energy thresholds are not finite'),
    (lambda d: d.update(low=d['high'] + 1.0), 'is above high threshold'),
])
def test_cache_with_bad_values_is_refused(env, capsys, tmp_path, edit, match):
    cache = _damaged_cache(env, tmp_path, edit)
    _refused(capsys, _argv(env['data'], tmp_path / 'out', '--calibration-cache', str(cache),
                           teacher=env['teacher']), match)
    assert not (tmp_path / 'out' / 'run').exists()


def test_cache_of_other_images_is_refused(env, capsys, tmp_path):
    cache = _damaged_cache(env, tmp_path, lambda d: d['identity'].update(data_fingerprint='0' * 64))
    _refused(capsys, _argv(env['data'], tmp_path / 'out', '--calibration-cache', str(cache),
                           teacher=env['teacher']), 'was computed for data_fingerprint=')


def test_thresholds_values_are_checked_in_float64():
    """The cache check is the same rule as a float64 restatement: finite and low <= high."""
    from timm_energykd.calibration import check_threshold_values
    e = torch.arange(20, dtype=torch.float64)
    t = EnergyThresholds.from_energies(e, 0.2)
    assert math.isfinite(t.low) and t.low <= t.high
    check_threshold_values(t, 'x')


# ---- class 8: two runs, one folder -------------------------------------------------------------------------

def test_second_run_with_the_same_experiment_is_refused(env, capsys):
    before = sorted(os.listdir(env['ok']))
    summary = (env['ok'] / 'summary.csv').read_text()
    _refused(capsys, _argv(env['data'], env['out'], teacher=env['teacher'], exp='ok'),
             '--experiment ok: ')
    assert sorted(os.listdir(env['ok'])) == before and (env['ok'] / 'summary.csv').read_text() == summary


def test_reloading_args_yaml_does_not_write_into_the_original_run(env, capsys):
    summary = (env['ok'] / 'summary.csv').read_text()
    line = _refused(capsys, [str(env['data']), '--config', str(env['ok'] / 'args.yaml')], 'already holds a run')
    assert '--resume' in line
    assert (env['ok'] / 'summary.csv').read_text() == summary


def test_live_second_writer_is_refused(tmp_path):
    path, created, lock = claim_output_dir(str(tmp_path), 'exp', named=True, resume=None)
    try:
        with pytest.raises(ValueError, match='is in use by another run'):
            claim_output_dir(str(tmp_path), 'exp', named=True, resume=None)
    finally:
        lock.close()
    # the lock dies with its holder: a killed run's folder can be claimed again (e.g. to resume)
    _, _, again = claim_output_dir(str(tmp_path), 'exp', named=True, resume=None)
    again.close()


def test_default_named_runs_in_the_same_second_get_their_own_folders(tmp_path):
    a, _, la = claim_output_dir(str(tmp_path), '20261202-000000-resnet-32', named=False, resume=None)
    b, _, lb = claim_output_dir(str(tmp_path), '20261202-000000-resnet-32', named=False, resume=None)
    la.close(), lb.close()
    assert a != b and b == a + '-1'


# ---- class 9: messages -------------------------------------------------------------------------------------

def test_malformed_yaml_is_one_line(env, capsys, tmp_path):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('lr: [0.1\nepochs: 3\n')
    with pytest.raises(SystemExit) as e:
        trainer.cli([str(env['data']), '--config', str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'not valid YAML (line' in err


def test_recipe_class_count_must_match_the_folder(env, capsys, tmp_path):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(yaml.safe_dump(dict(num_classes=100, model='test_resnet')))
    _refused(capsys, [str(env['data']), '--config', str(cfg), '--img-size', '32', '--device', 'cpu', '--workers',
                      '0', '--batch-size', '4', '--output', str(tmp_path / 'out')],
             "--num-classes 100 does not match the dataset's 4")


def test_recipe_teacher_without_weights_is_refused(env, capsys, tmp_path):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(yaml.safe_dump(dict(teacher='cifar_resnet32x4', model='cifar_resnet8x4')))
    _refused(capsys, [str(env['data']), '--config', str(cfg), '--device', 'cpu', '--output', str(tmp_path / 'o')],
             '--teacher cifar_resnet32x4: timm has no pretrained weights for it; give --teacher-checkpoint')
    # asking for a random teacher by name is allowed
    args = [str(env['data']), '--teacher', 'test_resnet', '--no-teacher-pretrained'] + _argv(
        env['data'], tmp_path / 'o2')[1:]
    assert trainer.cli(args) == 0


def test_local_dir_model_with_unknown_model_args(env, capsys, tmp_path):
    folder = tmp_path / 'm'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(architecture='test_resnet', num_classes=4,
                                                        model_args=dict(not_an_arg=3))))
    _refused(capsys, _argv(env['data'], tmp_path / 'out') + ['--model', f'local-dir:{folder}'],
             f'--model local-dir:{folder}: cannot build it')
