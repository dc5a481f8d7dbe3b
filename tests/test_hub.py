"""Hub export / load / push tests: offline, tiny native timm model, no network."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
import yaml

from timm_energykd import hub
from timm_energykd.hub import HubPushError, export_for_hub, push_to_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = 'hf_TESTtokenDoNotLeak0123456789'
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.tar', '.pkl', '.pickle', '.ckpt')

RUN_INFO = dict(
    model='test_resnet', teacher='resnet50', teacher_checkpoint='/home/alice/ckpt/teacher_r50.pth',
    distill_loss='energy_kd', kd_temperature=4.0, energy_temperature=4.0, energy_rate=0.2,
    temp_direction='reverse', temp_policy='two_bin', temp_delta_low=2.0, temp_delta_high=-2.0,
    gradation_bins=1, temp_min=1.0, temp_max=8.0, calibration='train', he_da=True, he_da_rate=0.4,
    dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20, task_loss_weight=0.1, distill_loss_weight=0.9,
    dataset='torch/cifar100', data_dir='/home/alice/data/cifar', epochs=2, batch_size=4, lr=0.05, seed=42,
    input_size=[3, 32, 32], mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762],
    thresholds=dict(low=-11.25, high=-6.5, rate=0.2, energy_temperature=4.0, num_samples=64),
    hub_token=TOKEN, sched='cosine',
)


def _train_tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('test_resnet', num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32)
        y = torch.randint(0, num_classes, (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    model = _train_tiny()
    out = tmp_path_factory.mktemp('hub') / 'export'
    path = export_for_hub(model, out, run_info=dict(RUN_INFO), metrics={'top1': 61.2345, 'top5': 93.5},
                          label_names=['cat', 'dog', 'eel', 'fox', 'gnu'])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    return path, model, x, ref


def _all_files(folder):
    return sorted(p for p in Path(folder).rglob('*') if p.is_file())


def test_export_layout_safetensors_only(exported):
    path, model, _, _ = exported
    assert sorted(p.name for p in Path(path).iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in _all_files(path) if p.name.endswith(PICKLE_SUFFIXES)]
    # no leftover temp siblings
    assert [p.name for p in Path(path).parent.iterdir()] == ['export']
    from safetensors.torch import load_file
    sd = load_file(str(Path(path) / 'model.safetensors'))
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_config_json(exported):
    path, _, _, _ = exported
    cfg = json.loads((Path(path) / 'config.json').read_text())
    assert cfg['architecture'] == 'test_resnet'
    assert cfg['num_classes'] == 5
    assert cfg['label_names'] == ['cat', 'dog', 'eel', 'fox', 'gnu']
    pc = cfg['pretrained_cfg']
    assert pc['input_size'] == [3, 32, 32]
    assert pc['mean'] == RUN_INFO['mean'] and pc['std'] == RUN_INFO['std']
    assert pc['num_classes'] == 5
    # provenance of the architecture's ImageNet weights must not be claimed for the student
    for key in ('tag', 'hf_hub_id', 'url', 'license', 'test_input_size'):
        assert key not in pc


def test_load_local_dir_identical_logits(exported):
    path, _, x, ref = exported
    loaded = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert loaded.pretrained_cfg['label_names'] == ['cat', 'dog', 'eel', 'fox', 'gnu']
    assert tuple(loaded.pretrained_cfg['input_size']) == (3, 32, 32)


@pytest.mark.slow  # a fresh interpreter importing timm: ~5 s on 2 CPU cores
def test_load_from_offline_hub_cache_subprocess(exported, tmp_path):
    """hf-hub: load from a pre-populated cache, HF_HUB_OFFLINE=1, in a fresh interpreter (env read at import)."""
    path, _, x, ref = exported
    cache = tmp_path / 'hf_home' / 'hub'
    commit = 'a' * 40
    repo = cache / 'models--someuser--tiny-student'
    snap = repo / 'snapshots' / commit
    snap.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    for p in Path(path).iterdir():
        shutil.copy(p, snap / p.name)
    torch.save(x, tmp_path / 'x.pt')
    torch.save(ref, tmp_path / 'ref.pt')
    code = (
        'import sys, torch, timm\n'
        "m = timm.create_model('hf-hub:someuser/tiny-student', pretrained=True).eval()\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True)\n"
        f"ref = torch.load(r'{tmp_path / 'ref.pt'}', weights_only=True)\n"
        'with torch.no_grad():\n'
        '    assert torch.equal(m(x), ref), (m(x) - ref).abs().max()\n'
        "assert m.pretrained_cfg['label_names'][0] == 'cat'\n"
        "print('OK-HUB')\n"
    )
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1',
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    env.pop('HF_TOKEN', None)
    res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'OK-HUB' in res.stdout


def test_model_card_records_run_info(exported):
    path, _, _, _ = exported
    card = (Path(path) / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card
    expected = {
        'Teacher': 'resnet50', 'Distillation loss': 'energy_kd', 'KD temperature T': '4',
        'Energy temperature T_E': '4', 'Threshold rate r': '0.2', 'Temperature direction': 'reverse',
        'Temperature policy': 'two_bin', 'Delta for low-energy samples': '2',
        'Delta for high-energy samples': '-2', 'Threshold calibration': 'train', 'HE-DA': 'enabled',
        'HE-DA rate': '0.4',
        # reverse direction: the low-energy group gets T + T(-), the high-energy group T + T(+)
        'Temperature of low-energy samples (E <= low)': '2', 'Temperature of high-energy samples (E > high)': '6',
        'Task (CE) loss weight': '0.1', 'Distillation loss weight': '0.9', 'Dataset': 'torch/cifar100',
        'Epochs': '2', 'Batch size': '4', 'Learning rate': '0.05', 'Seed': '42',
        'Low-energy threshold': '-11.25', 'High-energy threshold': '-6.5', 'Calibration samples N': '64',
        'Teacher checkpoint (file name)': 'teacher_r50.pth',
    }
    for label, value in expected.items():
        assert f'- **{label}:** {value}\n' in card, label
    assert '| top-1 (%) | 61.23 |' in card and '| top-5 (%) | 93.50 |' in card
    # DKD knobs are not shown for a non-DKD loss, nor the gradation policy's for two_bin; no local paths
    assert 'DKD alpha' not in card and 'Gradation bins' not in card and 'Minimum temperature' not in card
    assert '/home/alice' not in card
    # a local export: the usage block loads the folder itself (no hf-hub placeholder), native arch: no plugin
    assert f"model = timm.create_model('local-dir:{path}', pretrained=True).eval()" in card
    assert '<user>/<repo>' not in card and 'import timm_energykd' not in card
    # the re-export command names the class names that this export's config.json holds
    assert 'python -m timm_energykd.hub export OUTPUT_DIR EXPORT_DIR --label-names config.json' in card


def test_card_front_matter_is_a_model_index(exported):
    from huggingface_hub import ModelCard
    path, _, _, _ = exported
    card = ModelCard.load(Path(path) / 'README.md')
    data = card.data.to_dict()
    assert data['library_name'] == 'timm' and data['pipeline_tag'] == 'image-classification'
    assert 'license' not in data  # never chosen for the user
    assert {'timm', 'knowledge-distillation', 'timm-energykd'} <= set(data['tags'])
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results['top-1 accuracy'].metric_value == pytest.approx(61.2345)
    assert results['top-5 accuracy'].metric_value == pytest.approx(93.5)
    assert results['top-1 accuracy'].metric_type == 'accuracy'
    assert results['top-1 accuracy'].dataset_type == RUN_INFO['dataset']
    assert card.data.model_name
    card.validate  # noqa: B018  (the card object exists; validating needs the network)


def test_card_lists_only_result_shaping_settings():
    noise = {f'naflex_{i}': i for i in range(20)} | {'workers': 8, 'log_interval': 50, 'pin_mem': True,
                                                     'output': '/home/alice/out', 'experiment': 'x'}
    # flags the run's other flags switch off are not listed either (step decay under cosine, AMP dtype without AMP)
    info = dict(RUN_INFO, momentum=0.9, warmup_epochs=5, smoothing=0.1, decay_epochs=90, decay_milestones=[90, 180],
                amp=False, amp_dtype='float16', lr_base=0.1, imbalance_seed=0, distill_loss_kwargs={}, **noise)
    card = hub.build_model_card(info, None, architecture='test_resnet', num_classes=5)
    for key in noise:
        assert f'`{key}`' not in card, key
    assert 'naflex' not in card and '/home/alice' not in card
    assert 'Other settings' not in card
    for key in ('decay_epochs', 'decay_milestones', 'amp_dtype', 'lr_base'):
        assert f'`{key}`' not in card, key
    assert 'Long-tail subset seed' not in card and 'Loss options' not in card
    assert '- `momentum`: 0.9\n' in card and '- `warmup_epochs`: 5\n' in card and '- `smoothing`: 0.1\n' in card
    record = hub.RunRecord.from_run_info(info)
    assert set(record.settings) <= set(hub.RESULT_SETTINGS) and set(record.recipe) <= set(hub.RECIPE_SETTINGS)
    assert 'hub_token' not in record.settings and 'hub_token' not in card


def test_card_with_hub_repo_and_figures(tmp_path):
    from PIL import Image
    model = _train_tiny()
    curves, bins_png, bins_csv = tmp_path / 'c.png', tmp_path / 'b.png', tmp_path / 'b.csv'
    Image.new('RGB', (8, 8)).save(curves)
    Image.new('RGB', (8, 8)).save(bins_png)
    bins_csv.write_text('bin\n0\n')
    rows = [dict(bin=0, group='low', energy_low=-12.0, energy_high=-9.5, count=30, teacher_acc=96.6667,
                 teacher_conf=91.25, student_acc=90.0, student_conf=80.5, agreement=93.3333),
            dict(bin=1, group='high', energy_low=-9.5, energy_high=-1.0, count=10, teacher_acc=40.0,
                 teacher_conf=35.0, student_acc=30.0, student_conf=25.0, agreement=50.0)]
    record = hub.RunRecord.from_run_info(
        dict(RUN_INFO, push_to_hub='someuser/tiny'), {'top1': 50.0}, energy_bins=rows,
        figures={'training_curves.png': str(curves), 'energy_bins.png': str(bins_png),
                 'energy_bins.csv': str(bins_csv)})
    out = export_for_hub(model, tmp_path / 'e', run_info=dict(RUN_INFO), record=record)
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.EXPORT_FILES + hub.OPTIONAL_FILES)
    assert (out / 'training_curves.png').read_bytes() == curves.read_bytes()
    card = (out / 'README.md').read_text()
    assert "timm.create_model('hf-hub:someuser/tiny', pretrained=True)" in card and 'local-dir:' not in card
    assert '![Training curves](training_curves.png)' in card and '![Per-energy-bin report](energy_bins.png)' in card
    assert '| (-12, -9.5] | 0 | low | 30 | 96.7 | 91.2 | 90.0 | 80.5 | 93.3 |' in card
    assert '| (-9.5, -1] | 1 | high | 10 | 40.0 | 35.0 | 30.0 | 25.0 | 50.0 |' in card
    # an export holding the figures is still an earlier export: it may be replaced
    export_for_hub(model, out, run_info={})
    assert not (out / 'energy_bins.png').exists()
    with pytest.raises(ValueError, match='figure'):
        hub.export_for_hub(model, tmp_path / 'f', record=hub.RunRecord(figures={'x.png': str(curves)}))


def test_card_missing_keys_and_no_metrics(tmp_path):
    model = _train_tiny()
    out = export_for_hub(model, tmp_path / 'e', run_info={'model': 'test_resnet', 'distill_loss': 'dkd',
                                                          'dkd_alpha': 1.0, 'dkd_beta': 8.0})
    card = (out / 'README.md').read_text()
    assert 'Not evaluated' in card and 'top-1 (%) |' not in card
    assert '- **DKD beta (NCKD weight):** 8\n' in card
    for absent in ('Teacher:', 'Energy temperature', 'HE-DA', 'Epochs', 'Energy thresholds'):
        assert absent not in card, absent
    partial = hub.build_model_card({'model': 'm'}, {'top1': 70.0}, architecture='test_resnet', num_classes=5)
    assert '| top-1 (%) | 70.00 |' in partial and '| top-5 (%) | not evaluated |' in partial


def test_token_never_written(exported):
    path, _, _, _ = exported
    for p in _all_files(path):
        assert TOKEN.encode() not in p.read_bytes(), p
        assert b'hub_token' not in p.read_bytes(), p


def test_export_replaces_earlier_export_and_refuses_other_folders(tmp_path):
    model = _train_tiny()
    out = tmp_path / 'e'
    export_for_hub(model, out, run_info={'epochs': 1})
    export_for_hub(model, out, run_info={'epochs': 7})
    assert '- **Epochs:** 7' in (out / 'README.md').read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['e']
    other = tmp_path / 'busy'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not an earlier export'):
        export_for_hub(model, other, run_info={})
    assert (other / 'notes.txt').read_text() == 'keep me'
    with pytest.raises(ValueError, match='label_names'):
        export_for_hub(model, tmp_path / 'f', run_info={}, label_names=['a'])
    assert not (tmp_path / 'f').exists()


def test_export_channels_last_model(tmp_path):
    model = _train_tiny().to(memory_format=torch.channels_last)
    out = export_for_hub(model, tmp_path / 'e', run_info={})
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():  # channels-last kernels round differently: same weights, close logits
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not model.conv1[0].weight.is_contiguous()  # the caller's model is left as it was


def test_export_failure_leaves_no_half_folder(tmp_path, monkeypatch):
    model = _train_tiny()

    def boom(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(hub.export, 'build_model_card', boom)
    with pytest.raises(RuntimeError, match='disk full'):
        export_for_hub(model, tmp_path / 'e', run_info={})
    assert list(tmp_path.iterdir()) == []


class _RecordingApi:
    calls = []
    fail_with = None

    def __init__(self, token=None, **kwargs):
        type(self).calls.append(('init', {'token': token, **kwargs}))

    def create_repo(self, repo_id, **kwargs):
        type(self).calls.append(('create_repo', {'repo_id': repo_id, **kwargs}))
        if type(self).fail_with is not None:
            raise type(self).fail_with
        from huggingface_hub import RepoUrl
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def create_branch(self, repo_id, **kwargs):
        type(self).calls.append(('create_branch', {'repo_id': repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        staged = Path(kwargs['folder_path'])  # what is uploaded, read while the call runs
        kwargs['files'] = {p.name: p.read_bytes() for p in staged.iterdir()}
        type(self).calls.append(('upload_folder', kwargs))
        return 'https://huggingface.co/x/y/commit/abc'


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub
    _RecordingApi.calls = []
    _RecordingApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, 'HfApi', _RecordingApi)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    return _RecordingApi


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in _all_files(folder)}


def test_push_calls_client(exported, fake_api):
    path, _, _, _ = exported
    url = push_to_hub(path, 'someuser/tiny', private=True, revision='v1', token=TOKEN, commit_message='msg')
    assert url == 'https://huggingface.co/someuser/tiny'
    names = [c[0] for c in fake_api.calls]
    assert names == ['init', 'create_repo', 'create_branch', 'upload_folder']
    assert fake_api.calls[0][1]['token'] == TOKEN
    assert fake_api.calls[1][1]['private'] is True and fake_api.calls[1][1]['exist_ok'] is True
    up = fake_api.calls[3][1]
    assert up['repo_id'] == 'someuser/tiny' and up['revision'] == 'v1' and up['commit_message'] == 'msg'
    # the uploaded folder: the export's files, its card loading hf-hub:REPO instead of the local folder
    assert Path(up['folder_path']) != Path(path) and not Path(up['folder_path']).exists()  # staging removed
    assert sorted(up['files']) == ['README.md', 'config.json', 'model.safetensors']
    assert up['files']['model.safetensors'] == (Path(path) / 'model.safetensors').read_bytes()
    card = up['files']['README.md'].decode()
    assert "timm.create_model('hf-hub:someuser/tiny', pretrained=True)" in card
    assert str(path) not in card and 'local-dir:' not in card and 'Share it with' not in card
    assert f'local-dir:{path}' in (Path(path) / 'README.md').read_text()  # the export is left as it was
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ['export']


def _client_error(kind):
    """An exception of the kind huggingface_hub's HTTP stack raises (its client module differs by version)."""
    from huggingface_hub.errors import HfHubHTTPError
    try:
        import httpx2 as client
    except ImportError:
        import httpx as client
    if kind == 'connection':
        return client.ConnectError('Name or service not known')
    if kind == 'http':
        response = client.Response(401, request=client.Request('POST', 'https://huggingface.co/api/repos/create'))
        return HfHubHTTPError(f'401 Unauthorized for token {TOKEN}\nsecond line', response=response)
    return OSError('Network is unreachable')


@pytest.mark.parametrize('error', ['connection', 'http', 'oserror'])
def test_push_network_failure(exported, fake_api, error):
    path, _, _, _ = exported
    before = _snapshot(path)
    fake_api.fail_with = _client_error(error)
    with pytest.raises(HubPushError) as info:
        push_to_hub(path, 'someuser/tiny', token=TOKEN)
    msg = str(info.value)
    assert 'someuser/tiny' in msg and '\n' not in msg and TOKEN not in msg
    assert _snapshot(path) == before


def test_push_offline_mode_and_bad_input(exported, fake_api, monkeypatch, tmp_path):
    import huggingface_hub
    path, _, _, _ = exported
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(HubPushError, match='offline'):
        push_to_hub(path, 'someuser/tiny')
    assert fake_api.calls == []
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    with pytest.raises(ValueError, match='repo_id'):
        push_to_hub(path, 'no slash here')
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / 'missing', 'someuser/tiny')
    bad = tmp_path / 'bad'
    shutil.copytree(path, bad)
    torch.save({}, bad / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='pickle'):
        push_to_hub(bad, 'someuser/tiny')
    assert fake_api.calls == []


def test_cli_push_token_env(exported, fake_api, monkeypatch, capsys):
    path, _, _, _ = exported
    monkeypatch.setenv('MY_HF_TOKEN', TOKEN)
    assert hub.main(['push', str(path), 'someuser/tiny', '--private', '--token-env', 'MY_HF_TOKEN']) == 0
    out = capsys.readouterr()
    assert 'https://huggingface.co/someuser/tiny' in out.out and TOKEN not in out.out + out.err
    assert fake_api.calls[0][1]['token'] == TOKEN
    monkeypatch.delenv('MY_HF_TOKEN')
    assert hub.main(['push', str(path), 'someuser/tiny', '--token-env', 'MY_HF_TOKEN']) == 1
    assert 'MY_HF_TOKEN' in capsys.readouterr().err


def _fake_training_output(folder, with_ema):
    folder.mkdir()
    model = _train_tiny(seed=3)
    ema = _train_tiny(seed=4)
    args = dict(RUN_INFO, num_classes=5, output=str(folder))
    (folder / 'args.yaml').write_text(yaml.safe_dump(args))
    ckpt = {'epoch': 1, 'arch': 'test_resnet', 'state_dict': model.state_dict(), 'metric': 55.5,
            'task_state': {'thresholds': {'low': torch.tensor(-3.5), 'high': torch.tensor(-1.25), 'rate': 0.2}}}
    if with_ema:
        ckpt['state_dict_ema'] = ema.state_dict()
    torch.save(ckpt, folder / 'model_best.pth.tar')
    (folder / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
        '0,2.0,1.9,40.0,80.0,0.05\n'
        '1,1.5,1.4,55.5,91.25,0.04\n')
    return model, ema


@pytest.mark.parametrize('with_ema', [False, True])
def test_cli_export_from_training_output(tmp_path, with_ema):
    model, ema = _fake_training_output(tmp_path / 'run', with_ema)
    assert hub.main(['export', str(tmp_path / 'run'), str(tmp_path / 'exp')]) == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "exp"}', pretrained=True).eval()
    want = ema if with_ema else model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), want(x))
    card = (tmp_path / 'exp' / 'README.md').read_text()
    assert '| top-1 (%) | 55.50 |' in card and '| top-5 (%) | 91.25 |' in card and 'at epoch 1' in card
    assert '- **Low-energy threshold:** -3.5' in card and str(tmp_path / 'run') not in card
    assert f"timm.create_model('local-dir:{tmp_path / 'exp'}', pretrained=True)" in card
    assert not [p for p in _all_files(tmp_path / 'exp') if p.name.endswith(PICKLE_SUFFIXES)]


def test_cli_export_plain_weights_when_ema_evaluated_drops_metrics(tmp_path):
    model, _ = _fake_training_output(tmp_path / 'run', with_ema=True)
    assert hub.main(['export', str(tmp_path / 'run' / 'model_best.pth.tar'), str(tmp_path / 'exp'),
                     '--weights', 'model']) == 0
    card = (tmp_path / 'exp' / 'README.md').read_text()
    assert 'Not evaluated' in card
    assert hub.main(['export', str(tmp_path / 'nothing'), str(tmp_path / 'exp2')]) == 1


def test_card_usage_imports_plugin_only_for_plugin_architectures():
    assert not hub.needs_plugin('resnet18')
    assert hub.needs_plugin('cifar_arch_not_registered_here')
    card = hub.build_model_card({}, None, architecture='cifar_arch_not_registered_here', num_classes=10)
    assert 'import timm_energykd' in card


def test_card_policy_and_trainer_he_da_values():
    """The trainer stores --he-da as 'off'/'cutmix'/'mixup' and both policies' flags in every run."""
    base = dict(RUN_INFO, he_da='off', temp_direction='paper', dataset='', data_dir='/home/alice/imgs')
    card = hub.build_model_card(base, None, architecture='test_resnet', num_classes=5)
    assert '- **HE-DA:** disabled\n' in card and 'HE-DA rate' not in card
    assert '- **Dataset:** image folder\n' in card and '/home/alice' not in card
    assert '- **Temperature of low-energy samples (E <= low):** 6\n' in card
    card = hub.build_model_card(dict(base, he_da='cutmix', temp_policy='gradation', gradation_bins=10,
                                     temp_min=2.0, temp_max=6.0,
                                     he_da_thresholds={'high': -3.25, 'rate': 0.4}),
                                None, architecture='test_resnet', num_classes=5)
    assert '- **HE-DA:** cutmix\n' in card and '- **HE-DA rate:** 0.4\n' in card
    assert '- **HE-DA high threshold (rate 0.4):** -3.25\n' in card
    assert '- **Gradation bins:** 10\n' in card and '- **Maximum temperature:** 6\n' in card
    assert 'Delta for low-energy' not in card and 'Temperature of low-energy' not in card


def test_card_loss_options_declared_by_the_loss(monkeypatch):
    """Where the losses declare their trainer options (``losses.loss_options``) the card lists exactly those."""
    import timm_energykd.losses as losses
    declared = {'wttm': {'wttm_gamma': 'gamma'}, 'dkd': {'dkd_alpha': 'alpha', 'dkd_beta': 'beta', 'dkd_warmup': 'w'}}
    monkeypatch.setattr(losses, 'loss_options', lambda name: declared.get(name, {}), raising=False)
    info = dict(RUN_INFO, distill_loss='wttm', wttm_gamma=0.5, unrelated_flag=3)
    record = hub.RunRecord.from_run_info(info)
    assert record.loss_options == ('wttm_gamma',) and record.settings['wttm_gamma'] == 0.5
    assert 'dkd_alpha' not in record.settings and not record.energy_loss and record.temperatures is None
    card = hub.build_model_card(record, architecture='test_resnet', num_classes=5)
    assert '- **Loss option `wttm_gamma`:** 0.5\n' in card and 'DKD alpha' not in card and 'unrelated' not in card
    assert 'Temperature of low-energy' not in card  # wttm uses the fixed temperature
    card = hub.build_model_card(dict(info, distill_loss='dkd'), None, architecture='test_resnet', num_classes=5)
    assert '- **DKD beta (NCKD weight):** 8\n' in card and 'wttm_gamma' not in card
