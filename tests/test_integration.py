"""Release path end to end: train_energykd.py --export-hub -> timm.create_model, card vs args.yaml/summary.csv,
the standalone `python -m timm_energykd.hub export|push` on a real trainer output folder, push failures.

One tiny run (4-class generated ImageFolder, 32 px, 2 epochs, CPU): student `test_resnet` (native to timm, so it
must load without the plugin), teacher `cifar_resnet8` from our registry, energy_kd with non-default energy
settings, HE-DA and EMA on, so the card has something to get wrong.
"""
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
import yaml

import train_energykd
from timm_energykd import hub
from timm_energykd.args import parse_args
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.io import load_checkpoint_file

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = 'hf_INTEGtokenMustNotLeak9876543210'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    root = tmp_path_factory.mktemp('integ')
    data = make_demo_imagefolder(root / 'data', train_per_class=8, val_per_class=4, size=32, num_classes=4)
    argv = [str(data), '--img-size', '32', '--batch-size', '8', '--workers', '0', '--device', 'cpu',
            '--output', str(root / 'out'), '--experiment', 'student', '--warmup-epochs', '0', '--lr', '0.05',
            '--model', 'test_resnet', '--teacher', 'cifar_resnet8', '--distill-loss', 'energy_kd',
            '--epochs', '2', '--energy-rate', '0.25', '--energy-temperature', '2', '--kd-temperature', '3',
            '--temp-direction', 'reverse', '--he-da', 'cutmix', '--he-da-rate', '0.4', '--model-ema',
            '--task-loss-weight', '0.1', '--distill-loss-weight', '0.9', '--export-hub', str(root / 'export')]
    try:
        result = train_energykd.main(argv)
    finally:
        torch.set_num_threads(n)
    out = Path(result['output_dir'])
    best = load_checkpoint_file(out / 'model_best.pth.tar')
    ref_model = timm.create_model('test_resnet', num_classes=4)
    ref_model.load_state_dict(best['state_dict'])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model.eval()(x)
    return dict(root=root, argv=argv, result=result, out=out, export=root / 'export', best=best, x=x, ref=ref)


def _summary_row(out, epoch):
    with open(out / 'summary.csv') as f:
        return next(r for r in csv.DictReader(f) if int(r['epoch']) == int(epoch))


def test_export_layout_and_local_dir_identical_logits(run):
    assert sorted(p.name for p in run['export'].iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    model = timm.create_model(f"local-dir:{run['export']}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(run['x']), run['ref'])
    cfg = json.loads((run['export'] / 'config.json').read_text())
    assert cfg['architecture'] == 'test_resnet' and cfg['num_classes'] == 4
    assert cfg['label_names'] == sorted(p.name for p in (Path(run['argv'][0]) / 'train').iterdir())
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]


@pytest.mark.slow  # fresh interpreter importing timm: ~5 s
def test_offline_hub_cache_load_without_plugin(run, tmp_path):
    """hf-hub: from a pre-populated cache with HF_HUB_OFFLINE=1 in an interpreter that never imports the plugin."""
    cache = tmp_path / 'hf_home' / 'hub'
    commit = 'b' * 40
    repo = cache / 'models--someuser--energykd-student'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    shutil.copytree(run['export'], repo / 'snapshots' / commit)
    torch.save({'x': run['x'], 'ref': run['ref']}, tmp_path / 'io.pt')
    code = (
        'import sys, torch, timm\n'
        "m = timm.create_model('hf-hub:someuser/energykd-student', pretrained=True).eval()\n"
        f"d = torch.load(r'{tmp_path / 'io.pt'}', weights_only=True)\n"
        'with torch.no_grad():\n'
        "    assert torch.equal(m(d['x']), d['ref'])\n"
        "assert not any(k.startswith('timm_energykd') for k in sys.modules), 'plugin was imported'\n"
        "print('OK-NATIVE')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'PYTHONPATH')}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
    # run outside the repository so `timm_energykd` is not importable from the working directory
    res = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'OK-NATIVE' in res.stdout


def _card_lines(card):
    return {line[4:].split(':** ', 1)[0]: line.split(':** ', 1)[1] for line in card.splitlines()
            if line.startswith('- **') and ':** ' in line}


def test_card_matches_args_yaml_and_summary(run):
    args = yaml.safe_load((run['out'] / 'args.yaml').read_text())
    card = (run['export'] / 'README.md').read_text()
    got = _card_lines(card)
    fmt = hub._fmt
    expected = {
        'Teacher': args['teacher'], 'Distillation loss': args['distill_loss'],
        'KD temperature T': fmt(args['kd_temperature']), 'Energy temperature T_E': fmt(args['energy_temperature']),
        'Threshold rate r': fmt(args['energy_rate']), 'Temperature direction': args['temp_direction'],
        'Temperature policy': args['temp_policy'], 'Delta for low-energy samples': fmt(args['temp_delta_low']),
        'Delta for high-energy samples': fmt(args['temp_delta_high']), 'Threshold calibration': args['calibration'],
        'HE-DA': args['he_da'], 'HE-DA rate': fmt(args['he_da_rate']),
        'Task (CE) loss weight': fmt(args['task_loss_weight']),
        'Distillation loss weight': fmt(args['distill_loss_weight']),
        'Epochs': fmt(args['epochs']), 'Batch size': fmt(args['batch_size']), 'Dataset': 'image folder',
    }
    assert (args['energy_rate'], args['energy_temperature'], args['temp_direction'], args['he_da']) == \
        (0.25, 2.0, 'reverse', 'cutmix')
    for label, value in expected.items():
        assert got.get(label) == value, (label, got.get(label), value)
    # reverse direction with T=3, T(+)=2, T(-)=-2: low-energy samples get 1, high-energy samples 5
    assert got['Temperature of low-energy samples (E <= low)'] == '1'
    assert got['Temperature of high-energy samples (E > high)'] == '5'
    # thresholds: the ones the run used (checkpoint task state), in the trainer's own dict format
    th = run['best']['task_state']['thresholds']
    assert got['Low-energy threshold'] == fmt(th['low']) and got['High-energy threshold'] == fmt(th['high'])
    assert got['T_E used for calibration'] == '2' and got['Calibration samples N'] == fmt(th['num_samples'])
    he = run['best']['task_state']['he_da_thresholds']
    assert got[f"HE-DA high threshold (rate {fmt(he['rate'])})"] == fmt(he['high'])
    # final top-1/top-5: the best checkpoint's epoch row of summary.csv (the weights that were exported)
    row = _summary_row(run['out'], run['best']['epoch'])
    assert f"| top-1 (%) | {float(row['eval_top1']):.2f} |" in card
    assert f"| top-5 (%) | {float(row['eval_top5']):.2f} |" in card
    assert f"at epoch {run['best']['epoch']}" in card
    assert str(run['root']) not in card and 'import timm_energykd' not in card


def test_standalone_cli_export_of_trainer_output(run, tmp_path):
    """`python -m timm_energykd.hub export` reads the real checkpoint (Namespace args, EMA, task state)."""
    assert 'state_dict_ema' in run['best'] and type(run['best'].get('args')).__name__ == 'Namespace'
    assert hub.main(['export', str(run['out']), str(tmp_path / 'cli')]) == 0
    # auto = the weights the trainer picked its best checkpoint by (plain model; EMA is logged as eval_ema_*)
    a = (tmp_path / 'cli' / 'model.safetensors').read_bytes()
    assert a == (run['export'] / 'model.safetensors').read_bytes()
    drop = {'Other settings'}
    cli, trainer = _card_lines((tmp_path / 'cli' / 'README.md').read_text()), \
        _card_lines((run['export'] / 'README.md').read_text())
    for key in set(trainer) - drop:
        assert cli.get(key) == trainer[key], key
    # the EMA weights with the EMA's own metrics
    assert hub.main(['export', str(run['out']), str(tmp_path / 'ema'), '--weights', 'ema']) == 0
    ema = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True).eval()
    ref = timm.create_model('test_resnet', num_classes=4)
    ref.load_state_dict(run['best']['state_dict_ema'])
    with torch.no_grad():
        assert torch.equal(ema(run['x']), ref.eval()(run['x']))
    row = _summary_row(run['out'], run['best']['epoch'])
    assert f"| top-1 (%) | {float(row['eval_ema_top1']):.2f} |" in (tmp_path / 'ema' / 'README.md').read_text()


class _FailingApi:
    def __init__(self, token=None, **kwargs):
        self.token = token or os.environ.get('HF_TOKEN')  # as the real client resolves it

    def create_repo(self, repo_id, **kwargs):
        try:
            import httpx2 as client
        except ImportError:
            import httpx as client
        raise client.ConnectError(f'[Errno -3] Temporary failure in name resolution (token {self.token})')


def test_trainer_push_failure_keeps_export_and_never_leaks_token(run, tmp_path, monkeypatch, caplog):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', _FailingApi)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    folder = tmp_path / 'push-export'
    args, _ = parse_args(run['argv'] + ['--export-hub', str(folder), '--push-to-hub', 'someuser/energykd-student'])
    args.num_classes = run['result']['model'].num_classes
    r = run['result']
    caplog.set_level(logging.DEBUG)
    with pytest.raises(hub.HubPushError, match='someuser/energykd-student.*ConnectError.*local export kept'):
        train_energykd._export_hub(args, r['task'], str(run['out']), r['eval_metrics'], r['thresholds'], None)
    # the export written before the push is complete and loads
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(run['x']), run['ref'])
    for p in folder.rglob('*'):
        assert TOKEN.encode() not in p.read_bytes(), p
    assert TOKEN not in caplog.text
    # the standalone push command: exit code 1, one clear line, token masked
    monkeypatch.setenv('MY_TOKEN', TOKEN)
    assert hub.main(['push', str(folder), 'someuser/energykd-student', '--token-env', 'MY_TOKEN']) == 1


def test_cli_push_failure_message(run, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', _FailingApi)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('MY_TOKEN', TOKEN)
    before = {p.name: p.read_bytes() for p in run['export'].iterdir()}
    assert hub.main(['push', str(run['export']), 'someuser/energykd-student', '--token-env', 'MY_TOKEN']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: push to someuser/energykd-student failed: ConnectError')
    assert 'local export kept' in err and TOKEN not in err and err.count('\n') == 1
    assert {p.name: p.read_bytes() for p in run['export'].iterdir()} == before


def test_plugin_architecture_export_loads_after_import(tmp_path):
    """A student of our registry exports and loads back through local-dir: once timm_energykd is imported."""
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet8', num_classes=7).eval()
    out = hub.export_for_hub(model, tmp_path / 'e', run_info={'model': 'cifar_resnet8', 'teacher': 'cifar_resnet32x4'})
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert 'import timm_energykd' in (out / 'README.md').read_text()
