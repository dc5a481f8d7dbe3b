"""Tests of the CLI parser: timm train.py parity, --config YAML, validate_args messages."""
import logging

import pytest
import yaml

from timm_energykd.train import args as A
from timm_energykd.train import checks as C
from timm_energykd import losses

# Number of timm train.py option flags this parser accepts (see docs/FLAGS.md for the source of the list).
N_TIMM_FLAGS = 167


@pytest.fixture(autouse=True)
def energy_kd_registered(monkeypatch):
    """validate_args checks --distill-loss against the registry; make sure the default name exists."""
    if not losses.is_distill_loss('energy_kd'):
        monkeypatch.setitem(losses._DISTILL_LOSSES, 'energy_kd', losses.DistillLoss)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / 'data'
    d.mkdir()
    return str(d)


def parse(*argv):
    return A.parse_args([str(a) for a in argv])[0]


def test_design_card_command():
    args = parse('DATA', '--teacher', 'resnet50', '--model', 'mobilenetv1_100', '--energy-rate', '0.3')
    assert args.data == 'DATA' and args.data_dir == 'DATA'
    assert args.teacher == 'resnet50' and args.kd_model_name == 'resnet50'
    assert args.model == 'mobilenetv1_100'
    assert args.energy_rate == 0.3
    assert args.distill_loss == 'energy_kd'  # implied by a teacher


@pytest.mark.parametrize('dest,value', [
    ('lr', None), ('lr_base', 0.1), ('epochs', 300), ('batch_size', 128), ('opt', 'sgd'), ('sched', 'cosine'),
    ('smoothing', 0.1), ('kd_temperature', 4.0), ('momentum', 0.9), ('weight_decay', 2e-5), ('warmup_lr', 1e-5),
    ('min_lr', 0), ('warmup_epochs', 5), ('decay_milestones', [90, 180, 270]), ('decay_rate', 0.1),
    ('scale', [0.08, 1.0]), ('ratio', [3. / 4., 4. / 3.]), ('color_jitter', 0.4), ('reprob', 0.), ('mixup', 0.0),
    ('drop_path', None), ('model', 'resnet50'), ('dataset', ''), ('train_split', 'train'),
    ('val_split', 'validation'), ('workers', 4), ('seed', 42), ('device', 'cuda'), ('amp_dtype', 'float16'),
    ('model_ema_decay', 0.9998), ('checkpoint_hist', 10), ('eval_metric', 'top1'), ('dist_bn', 'reduce'),
    ('kd_model_name', None), ('kd_distill_type', 'logit'), ('kd_loss_type', 'kl'), ('distill_loss_weight', None),
    ('task_loss_weight', None), ('model_kwargs', {}), ('local_rank', 0), ('torchcompile', None),
    ('naflex_max_seq_len', 576), ('data', None), ('data_dir', None),
])
def test_timm_defaults(dest, value):
    assert getattr(parse(), dest) == value


@pytest.mark.parametrize('dest,value', [
    ('teacher', None), ('teacher_pretrained', None), ('teacher_checkpoint', None), ('distill_loss', None),
    ('energy_rate', 0.2), ('energy_temperature', 4.0), ('temp_delta_low', 2.0), ('temp_delta_high', -2.0),
    ('temp_low', None), ('temp_high', None), ('temp_direction', 'paper'), ('temp_policy', 'two_bin'),
    ('gradation_bins', 10), ('temp_min', 2.0), ('temp_max', 6.0), ('calibration', 'dataset'),
    ('calibration_cache', None), ('running_momentum', 0.9), ('he_da', 'off'), ('he_da_rate', 0.3),
    ('he_da_alpha', 1.0), ('he_da_weight', 1.0), ('he_da_selection', 'threshold'), ('dkd_alpha', 1.0),
    ('dkd_beta', 8.0), ('dkd_warmup', 20), ('imbalance_factor', None), ('imbalance_seed', 0), ('demo', False),
    ('push_to_hub', None), ('hub_private', False), ('hub_revision', None), ('export_hub', None),
])
def test_energykd_defaults(dest, value):
    assert getattr(parse(), dest) == value


def test_flag_count_and_no_collisions():
    timm = A.timm_flag_dests()
    ours = A.energykd_flag_dests()
    assert len(timm) == len(set(timm)) >= N_TIMM_FLAGS
    assert not set(timm) & set(ours)
    ns = vars(parse())
    assert set(timm) | set(ours) | {'data', 'config'} == set(ns)


def test_timm_short_and_alias_flags():
    args = parse('-b', '64', '-vb', '32', '-j', '2', '--dr', '0.5', '--local_rank', '1',
                 '--model-kwargs', 'drop_rate=0.1', 'act=gelu', '--input-size', '3', '32', '32', '--torchcompile')
    assert (args.batch_size, args.validation_batch_size, args.workers, args.decay_rate) == (64, 32, 2, 0.5)
    assert args.local_rank == 1 and args.model_kwargs == {'drop_rate': 0.1, 'act': 'gelu'}
    assert args.input_size == [3, 32, 32] and args.torchcompile == 'inductor'
    with pytest.raises(SystemExit):  # mutually exclusive, as in timm
        parse('--torchscript', '--torchcompile')


def _write_yaml(path, d):
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_config_roundtrip_timm_style_args_yaml(tmp_path):
    args, text = A.parse_args(['DATA', '--teacher', 'resnet50', '--model', 'resnet18', '--lr', '0.05',
                               '--mean', '0.5', '0.5', '0.5', '--energy-rate', '0.3', '--he-da', 'cutmix',
                               '--model-kwargs', 'drop_rate=0.1', '--decay-milestones', '10', '20'])
    assert yaml.safe_load(text) == {k: v for k, v in vars(args).items() if k != 'config'}
    # what timm's train.py adds at run time must be tolerated
    d = dict(yaml.safe_load(text), rank=0, world_size=1, distributed=False, prefetcher=True, device='cpu')
    cfg = _write_yaml(tmp_path / 'args.yaml', d)
    again = parse('--config', cfg)
    assert again.config == cfg
    for k, v in vars(args).items():
        if k not in ('config', 'device'):
            assert getattr(again, k) == v, k
    assert again.device == 'cpu'
    # the command line overrides the file, for timm flags, ours and the positional dir
    over = parse('--config', cfg, 'OTHER', '--lr', '0.1', '--energy-rate', '0.1', '--teacher', 'resnet101')
    assert over.lr == 0.1 and over.energy_rate == 0.1 and over.data_dir == 'DATA' and over.data == 'OTHER'
    assert over.teacher == over.kd_model_name == 'resnet101'  # the command line wins over the file's kd_model_name
    assert over.model == 'resnet18'


def test_config_kd_model_name_only(tmp_path):
    cfg = _write_yaml(tmp_path / 'c.yaml', dict(kd_model_name='resnet50', kd_temperature=2.0))
    args = parse('--config', cfg)
    assert args.teacher == 'resnet50' and args.kd_temperature == 2.0 and args.distill_loss == 'energy_kd'


def test_config_converts_and_checks_values(tmp_path):
    cfg = _write_yaml(tmp_path / 'ok.yaml', dict(lr='3e-4', epochs='10', mean=['0.5', 0.4, '0.3'], input_size=[3, 32, 32],
                                                 he_da='mixup', opt_kwargs={'foo': 1}))
    args = parse('--config', cfg)
    assert args.lr == 3e-4 and args.epochs == 10 and args.mean == [0.5, 0.4, 0.3] and args.he_da == 'mixup'
    for bad in (dict(lr='fast'), dict(input_size=224), dict(decay_milestones=[1, 'x']), dict(he_da='always'),
                dict(epochs=1.5), dict(amp='yes'), dict(model_kwargs=['a=1'])):
        with pytest.raises(SystemExit):
            parse('--config', _write_yaml(tmp_path / 'bad.yaml', bad))


def test_config_unknown_keys_refused(tmp_path, capsys):
    """A misspelt key is refused with one line and the closest valid name (it would train at the default)."""
    cfg = _write_yaml(tmp_path / 'c.yaml', dict(lr=0.5, energy_rat=0.3, rank=3))
    with pytest.raises(SystemExit) as e:
        parse('--config', cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown key 'energy_rat'" in err and "did you mean 'energy_rate'?" in err
    # timm's runtime keys (written into a timm args.yaml) stay tolerated
    args = parse('--config', _write_yaml(tmp_path / 'ok.yaml', dict(lr=0.5, rank=3, world_size=2)))
    assert args.lr == 0.5


def test_config_missing_file():
    with pytest.raises(SystemExit):
        parse('--config', '/nonexistent/cfg.yaml')


def test_args_to_yaml_roundtrip():
    args = parse('--teacher', 'resnet50', '--temp-low', '5.5')
    assert yaml.safe_load(A.args_to_yaml(args)) == {k: v for k, v in vars(args).items() if k != 'config'}


# ------------------------------------------------------------------------------------------------------
# validate_args
# ------------------------------------------------------------------------------------------------------

def valid(data_dir, *extra):
    return parse(data_dir, '--teacher', 'resnet50', *extra)


def test_valid_commands_pass(data_dir):
    C.validate_args(valid(data_dir))
    C.validate_args(valid(data_dir, '--he-da', 'cutmix', '--batch-size', '2', '--temp-policy', 'gradation'))
    C.validate_args(parse('--demo'))
    C.validate_args(parse('--dataset', 'torch/cifar100', '--dataset-download'))  # no folder needed
    C.validate_args(valid(data_dir, '--energy-rate', '0.5', '--imbalance-factor', '1'))


@pytest.mark.parametrize('extra,message', [
    (('--energy-rate', '0.7'), '--energy-rate: energy_rate=0.7 is out of range; expected 0 < energy_rate <= 0.5'),
    (('--energy-rate', '0'), '--energy-rate: energy_rate=0.0 is out of range'),
    (('--he-da-rate', '0.6'), '--he-da-rate: he_da_rate=0.6 is out of range; expected 0 < he_da_rate <= 0.5'),
    (('--gradation-bins', '1'), '--gradation-bins: num_bins=1; gradation needs at least 2 bins'),
    (('--kd-temperature', '0'), '--kd-temperature must be > 0, got 0.0'),
    (('--temp-delta-high', '-4'), '--temp-delta-high: delta_high=-4.0 (base + delta_high = 0.0) gives a high-energy temperature <= 0'),
    (('--temp-delta-low', '-5'), '--temp-delta-low: delta_low=-5.0 (base + delta_low = -1.0) gives a low-energy temperature <= 0'),
    (('--temp-low', '-1'), '--temp-low: low_temperature=-1.0 gives a low-energy temperature <= 0'),
    (('--temp-high', '0'), '--temp-high: high_temperature=0.0 gives a high-energy temperature <= 0'),
    (('--temp-min', '0'), '--temp-min: t_min=0.0; every temperature must be > 0'),
    (('--temp-max', '-1', '--temp-min', '-2'), '--temp-min: t_min=-2.0; every temperature must be > 0'),
    (('--temp-min', '7'), '--temp-min: t_min=7.0 is larger than t_max=6.0'),
    (('--energy-temperature', '0'), '--energy-temperature must be > 0, got 0.0'),
    (('--distill-loss', 'no_such_loss'), "--distill-loss 'no_such_loss' is unknown; expected one of:"),
    (('--kd-model-name', 'resnet34'), "--teacher and --kd-model-name name different teachers ('resnet50' vs 'resnet34')"),
    (('--imbalance-factor', '0'), '--imbalance-factor must be in (0, 1]'),
    (('--imbalance-factor', '100'), '--imbalance-factor must be in (0, 1]'),
    (('--he-da', 'cutmix', '--batch-size', '1'), '--he-da needs --batch-size >= 2'),
    (('--he-da', 'mixup', '--mixup', '0.8'), '--he-da cannot be combined with timm --mixup'),
    (('--running-momentum', '1'), '--running-momentum must be in [0, 1)'),
    (('--he-da-alpha', '0'), '--he-da-alpha: alpha=0.0; the Beta distribution needs alpha > 0'),
    (('--dkd-beta', '-1'), '--dkd-beta must be >= 0'),
    (('--dkd-warmup', '-1'), '--dkd-warmup must be >= 0'),
])
def test_validate_errors(data_dir, extra, message):
    with pytest.raises(ValueError) as e:
        C.validate_args(valid(data_dir, *extra))
    assert message in str(e.value) and '\n' not in str(e.value)


def test_policy_temperatures_checked_only_for_energy_losses(data_dir):
    # KD+LS's recipe (T = 2): the default T(-) = -2 would give a policy temperature of 0, but kd_ls never uses it
    C.validate_args(valid(data_dir, '--distill-loss', 'kd_ls', '--kd-temperature', '2'))
    with pytest.raises(ValueError, match=r'--temp-delta-high: delta_high=-2.0 \(base \+ delta_high = 0.0\)'):
        C.validate_args(valid(data_dir, '--distill-loss', 'energy_kd_ls', '--kd-temperature', '2'))


def test_validate_files(tmp_path, data_dir):
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='--teacher-checkpoint: file not found: .*nope.pth'):
        C.validate_args(valid(data_dir, '--teacher-checkpoint', missing))
    with pytest.raises(FileNotFoundError, match='--resume: file not found'):
        C.validate_args(valid(data_dir, '--resume', missing))
    with pytest.raises(ValueError, match='--resume auto .* not supported'):
        C.validate_args(valid(data_dir, '--resume', 'auto'))
    with pytest.raises(FileNotFoundError, match='--initial-checkpoint: file not found'):
        C.validate_args(valid(data_dir, '--initial-checkpoint', missing))
    ckpt = tmp_path / 'teacher.pth'
    ckpt.write_bytes(b'x')
    C.validate_args(valid(data_dir, '--teacher-checkpoint', str(ckpt), '--resume', str(ckpt)))


def test_validate_data_dir(tmp_path):
    with pytest.raises(ValueError, match='a data directory is required'):
        C.validate_args(parse('--teacher', 'resnet50'))
    with pytest.raises(FileNotFoundError, match='--data-dir: folder not found: .*missing'):
        C.validate_args(parse('--data-dir', str(tmp_path / 'missing'), '--dataset', 'ImageFolder'))
    with pytest.raises(FileNotFoundError, match='--data-dir: folder not found'):
        C.validate_args(parse(str(tmp_path / 'missing')))  # the positional dir too


def test_kd_model_name_synonym(data_dir):
    args = parse(data_dir, '--kd-model-name', 'resnet50')
    assert args.teacher == 'resnet50' and args.distill_loss == 'energy_kd'
    C.validate_args(args)
    same = parse(data_dir, '--kd-model-name', 'resnet50', '--teacher', 'resnet50')
    C.validate_args(same)
    with pytest.raises(ValueError, match='name different teachers'):
        C.validate_args(parse(data_dir, '--kd-model-name', 'resnet50', '--teacher', 'resnet18'))


@pytest.mark.parametrize('extra,flag', [
    (('--kd-distill-type', 'feature'), '--kd-distill-type'),
    (('--kd-distill-type', 'token'), '--kd-distill-type'),
    (('--kd-loss-type', 'mse'), '--kd-loss-type'),
    (('--torchscript',), '--torchscript'),
    (('--fuser', 'te'), '--fuser'),
    (('--split-bn',), '--split-bn'),
    (('--aug-splits', '3'), '--aug-splits'),
    (('--jsd-loss',), '--jsd-loss'),
    (('--naflex-loader',), '--naflex-loader'),
    (('--log-wandb',), '--log-wandb'),
    (('--train-img-sizes', '160', '224'), '--train-img-sizes'),
    (('--train-steps-per-epoch', '10'), '--train-batches-per-epoch'),
    (('--variable-batch-loss-scale', 'sqrt'), '--variable-batch-loss-scale'),
    (('--naflex-patchify-channels-first',), '--naflex-patchify-channels-first'),
    (('--drop-connect', '0.1'), '--drop-connect'),
])
def test_unsupported_timm_flags(data_dir, extra, flag):
    with pytest.raises(ValueError, match=f'^{flag} is not supported by train_energykd.py \\('):
        C.validate_args(valid(data_dir, *extra))


def test_unsupported_flags_at_default_pass(data_dir, tmp_path):
    # explicitly given with timm's default value is fine (e.g. from a timm args.yaml)
    C.validate_args(valid(data_dir, '--kd-distill-type', 'logit', '--kd-loss-type', 'kl', '--aug-splits', '0'))
    # nulls in a YAML mean "not set"
    cfg = _write_yaml(tmp_path / 'c.yaml', dict(split_bn=None, kd_distill_type=None, fuser=None, naflex_loader=None))
    args = parse('--config', cfg, data_dir, '--teacher', 'resnet50')
    assert args.split_bn is False and args.naflex_loader is False
    C.validate_args(args)


def test_distill_flags_without_teacher_warn(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="timm_energykd.train.args"):
        C.validate_args(parse(data_dir, '--energy-rate', '0.3', '--he-da', 'cutmix', '--imbalance-factor', '0.5'))
    assert 'no --teacher given' in caplog.text
    assert '--energy-rate' in caplog.text and '--he-da' in caplog.text
    assert '--imbalance-factor' not in caplog.text  # meaningful without a teacher
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timm_energykd.train.args"):
        C.validate_args(parse(data_dir))
    assert caplog.text == ''


def test_validate_hand_built_namespace(data_dir):
    # the trainer may build args programmatically; missing keys fall back to defaults
    import argparse
    C.validate_args(argparse.Namespace(teacher='resnet50', distill_loss='energy_kd', data_dir=data_dir))
    with pytest.raises(ValueError, match='--energy-rate'):
        C.validate_args(argparse.Namespace(energy_rate=0.9, demo=True))
