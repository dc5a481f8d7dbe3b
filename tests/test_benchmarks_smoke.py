"""Smoke tests of the benchmark scripts: their --tiny modes run end to end on CPU.

The throughput smoke needs timm_energykd.task (and friends); the accuracy smoke needs train_energykd.py.
Each test skips with the reason when its dependency has not landed in this checkout.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / 'benchmarks'


def _load(name: str):
    """A benchmark script as a module, from its file (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_common = _load('_common')


def test_throughput_baselines_tiny(tmp_path):
    """timm's own tasks only: runs without the plugin core."""
    throughput = _load('throughput')
    out = tmp_path / 'tp.json'
    res = throughput.main(['--tiny', '--variants', 'ce', 'timm_kd', '--json', str(out)])
    for v in ('ce', 'timm_kd'):
        assert res['variants'][v]['median_s'] > 0, res['variants'][v]
    saved = json.loads(out.read_text())
    assert saved['config']['setting'] == 'tiny'
    assert all(t['status'] in ('n/a', 'not judged (tiny)') for t in saved['targets'])


@pytest.mark.slow
def test_throughput_tiny_core_variants(tmp_path):
    missing = _common.core_available()
    if missing:
        pytest.skip(f'timm_energykd core not importable yet: {missing}')
    throughput = _load('throughput')
    # the core variants (ce / timm_kd are covered above); one HE-DA rate keeps the test short
    variants = ['timm_kd', 'kd', 'energy_kd', 'energy_dkd', 'gradation', 'he_da_r0.5']
    res = throughput.main(['--tiny', '--variants', *variants, '--he-da-rates', '0.5',
                           '--json', str(tmp_path / 'tp.json')])
    errors = {k: v['error'] for k, v in res['variants'].items() if v.get('error')}
    assert not errors, errors
    assert list(res['variants']) == variants
    assert res['calibration']['rate_ratio'] > 0
    assert [e['he_da_rate'] for e in res['epoch_table']] == [0.0, 0.5]
    # every target is reported, none judged in tiny mode
    assert len(res['targets']) == 3 + 1
    assert all(t['status'] == 'not judged (tiny)' for t in res['targets'])


def test_throughput_rejects_bad_input():
    throughput = _load('throughput')
    with pytest.raises(ValueError, match='--variants'):
        throughput.parse_args(['--tiny', '--variants', 'nope'])
    with pytest.raises(ValueError, match='--he-da-rates'):
        throughput.parse_args(['--tiny', '--he-da-rates', '0.7'])


def test_accuracy_dry_run_commands(tmp_path, capsys):
    """The trainer command lines: same base args for every run, teacher first, variant flags appended."""
    accuracy = _load('accuracy')
    data = accuracy.make_tiny_imagefolder(tmp_path / 'data', num_classes=3, train_per_class=2, val_per_class=1)
    accuracy.main(['--data-dir', str(data), '--epochs', '2', '--seeds', '0', '1', '--dry-run',
                   '--extra-losses', 'kd_ls', '--output', str(tmp_path / 'out')])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 2 * (len(accuracy.BASE_VARIANTS) + 2 + 1)  # teacher + seeds x (base + 2 HE-DA + extra)
    assert '--model cifar_resnet32x4' in lines[0] and '--teacher ' not in lines[0]
    ce = [ln for ln in lines if '--experiment ce-s0' in ln][0]
    assert '--teacher' not in ce and '--num-classes 3' in ce
    heda = [ln for ln in lines if '--experiment kd_heda_r0.5-s1' in ln][0]
    assert '--he-da cutmix --he-da-rate 0.5' in heda and '--seed 1' in heda
    assert any('--experiment kd_cutmix-s0' in ln and '--cutmix 1.0' in ln for ln in lines)
    assert any('--distill-loss kd_ls' in ln for ln in lines)
    assert all('--teacher-checkpoint' in ln for ln in lines[1:] if '--experiment ce-' not in ln)


def test_accuracy_rejects_bad_input(tmp_path):
    accuracy = _load('accuracy')
    with pytest.raises(FileNotFoundError, match='--data-dir'):
        accuracy.parse_args(['--data-dir', str(tmp_path / 'missing')])
    data = accuracy.make_tiny_imagefolder(tmp_path / 'd', num_classes=2, train_per_class=1, val_per_class=1)
    with pytest.raises(ValueError, match='--he-da-rates'):
        accuracy.parse_args(['--data-dir', str(data), '--he-da-rates', '0.9'])
    with pytest.raises(ValueError, match='--variants'):
        accuracy.parse_args(['--data-dir', str(data), '--variants', 'nope'])


def test_accuracy_table_and_plot(tmp_path):
    accuracy = _load('accuracy')
    from PIL import Image
    runs = [dict(variant='ce', status='ran', final_top1=70.0, best_top1=71.0),
            dict(variant='ce', status='kept', final_top1=72.0, best_top1=72.5),
            dict(variant='kd', status='failed')]
    rows = accuracy.aggregate(runs, ['ce', 'kd'])
    assert rows[0]['n'] == 2 and rows[0]['final_mean'] == pytest.approx(71.0)
    assert rows[0]['final_std'] == pytest.approx(2 ** 0.5)  # sample std of 70, 72
    assert rows[1]['n'] == 0 and rows[1]['failed'] == 1
    table = accuracy.format_table(rows)
    assert '71.00 ± 1.41' in table and 'n/a' in table
    accuracy.bar_plot(rows, tmp_path / 'p.png', 'title')
    assert Image.open(tmp_path / 'p.png').size[0] > 100


def test_prepare_cifar10(tmp_path, shared_data):
    prepare_cifar10 = _load('prepare_cifar10')
    from PIL import Image
    npz = shared_data / 'cifar10-jpeg' / 'cifar10_canonical_order_jpeg.npz'
    if not npz.is_file():
        pytest.skip('cifar10 archive absent')
    counts = prepare_cifar10.main(['--npz', str(npz), '--out', str(tmp_path / 'c10'), '--per-class', '2'])
    assert counts == {'train': 20, 'validation': 20}
    files = sorted((tmp_path / 'c10' / 'train').glob('*/*.jpg'))
    assert len(files) == 20 and len({f.parent.name for f in files}) == 10
    assert Image.open(files[0]).size == (32, 32)
    # canonical train image 0 is a frog (label 6); bytes copied as-is
    assert (tmp_path / 'c10' / 'train' / 'frog' / '00000.jpg').is_file()


@pytest.mark.slow
def test_accuracy_tiny(tmp_path):
    accuracy = _load('accuracy')
    if not accuracy.TRAINER.is_file():
        pytest.skip('train_energykd.py has not landed in this checkout')
    missing = _common.core_available()
    if missing:
        pytest.skip(f'timm_energykd core not importable yet: {missing}')
    # a subset keeps the test short: no teacher (ce), an energy loss, HE-DA; `--tiny` alone runs them all
    res = accuracy.main(['--tiny', '--output', str(tmp_path / 'acc'), '--variants', 'ce', 'energy_kd',
                         'kd_heda_r0.5'])
    failed = [r['experiment'] for r in res['runs'] if r['status'] == 'failed']
    assert not failed, failed
    assert [r['variant'] for r in res['rows']] == ['teacher', 'ce', 'energy_kd', 'kd_heda_r0.5']
    assert all(r['n'] == 1 for r in res['rows'])
    for f in ('results.md', 'results.json', 'accuracy.png'):
        assert (tmp_path / 'acc' / f).is_file()


def test_loss_gradients_table():
    loss_gradients = _load('loss_gradients')
    text = loss_gradients.main(['--losses', 'dkd', 'r2kd', '--batch-sizes', '8', '--seeds', '1'])
    rows = {line.split('|')[1].strip(): line.split('|')[2].strip() for line in text.splitlines()
            if line.startswith('| ') and not line.startswith('| loss')}
    assert list(rows) == ['kd', 'dkd', 'r2kd'] and rows['kd'] == '1.00'
    assert float(rows['dkd']) > 1  # measured past the DKD warm-up, not at its zero start
    with pytest.raises(SystemExit, match='--losses: unknown'):
        loss_gradients.main(['--losses', 'nope'])


def test_teacher_replay_tiny(tmp_path):
    """Issue 19's benchmark: step times (live / replayed / student-only) and the sweep with and without the store."""
    missing = _common.core_available()
    if missing:
        pytest.skip(f'timm_energykd core not importable yet: {missing}')
    bench = _load('teacher_replay')
    res = bench.main(['--tiny', '--json', str(tmp_path / 'replay.json')])
    assert set(res['steps']['median_s']) == {'live', 'replayed', 'student_only'}
    assert all(v > 0 for v in res['steps']['median_s'].values())
    assert set(res['sweep']['wall_s']) == {'live', 'store'}
    runs = res['sweep']['runs']
    assert len(runs) == 16 and res['sweep']['store_bytes_per_seed'] > 0
    assert all(r['epochs_trained'] == 1 for r in runs)
    # with the store: the first run of each seed records, the other 3 replay
    assert [r['replayed'] for r in runs if r['mode'] == 'store'] == [False, True, True, True] * 2
    assert not any(r['replayed'] for r in runs if r['mode'] == 'live')
    assert json.loads((tmp_path / 'replay.json').read_text())['config']['tiny'] is True
