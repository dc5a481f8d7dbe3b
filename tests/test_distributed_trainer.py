"""Issue 6, distributed consistency (gloo, CPU).

* Task level (2 forked processes): given the same global batch, the calibrated thresholds, the HE-DA selection
  and a step's loss and gradients match one process.
* Trainer level (``torchrun --nproc_per_node 2 train_energykd.py``): it trains, the thresholds equal a
  single-process run's, and only rank 0 writes files.
* A failure on one rank stops every rank with the error shown (no hang: the test has a timeout).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from timm_energykd.train import trainer as train_energykd
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.energy import EnergyThresholds, calibrate_thresholds
from timm_energykd.mixing import HighEnergyMix
from timm_energykd.task import EnergyDistillationTask

from helpers import random_teacher_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, WORLD = 16, 2


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the in-process runs below use one thread; leave the session as it was


def _tiny(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    m.pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}  # no BN: per-rank == global forward
    return m


def _step(rank, world, init_file, out_dir):
    """One calibration + one training step on this rank's share of a fixed global batch (world=1: all of it)."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(N, 3, 8, 8, generator=g), torch.randint(0, 5, (N,), generator=g)
        teacher = _tiny(1)
        # calibration: a strided split, like the trainer's calibration loader under DDP
        idx = torch.arange(rank, N, world)
        loader = [(x[idx[i:i + 3]], None) for i in range(0, len(idx), 3)]
        thr = calibrate_thresholds(teacher, loader, 0.25, num_bins=4, progress=False)

        mine = slice(rank * N // world, (rank + 1) * N // world)  # contiguous shards of the global batch
        task = EnergyDistillationTask(_tiny(0), teacher, distill_loss='energy_kd', threshold_mode='dataset',
                                      he_da=HighEnergyMix('cutmix', generator=np.random.default_rng(0)),
                                      temperature_policy=None, verbose=False)
        task.set_thresholds(thr)
        with torch.no_grad():
            _, energy = task._energy(task.teacher_logits(x[mine]))
        high_energy = torch.nonzero(energy > task.he_da_high).squeeze(1) + mine.start  # E > high: per sample
        selected = task.he_da.select(energy, task.he_da_high) + mine.start  # what this rank mixes

        task.he_da = None  # the step's loss: HE-DA's random pairing is per rank by design (see docs/TRUST.md)
        if world > 1:
            task.prepare_distributed()
        task.train()
        out = task(x[mine], y[mine])
        out['loss'].backward()
        loss = out['loss'].detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
            gathered = []
            for t in (high_energy, selected):
                parts = [None] * world
                dist.all_gather_object(parts, t.tolist())
                gathered.append(parts)
            high_energy, selected = gathered
        else:
            high_energy, selected = [high_energy.tolist()], [selected.tolist()]
        module = task.trainable_module.module if world > 1 else task.trainable_module
        torch.save({'thr': thr.to_dict(), 'high_energy': high_energy, 'selected': selected, 'loss': loss,
                    'grads': [p.grad.clone() for p in module.parameters()]}, os.path.join(out_dir, f'w{world}r{rank}.pt'))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_task_step_matches_single_process(tmp_path):
    _step(0, 1, None, str(tmp_path))
    mp.start_processes(_step, args=(WORLD, str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method='fork')
    one = torch.load(tmp_path / 'w1r0.pt', weights_only=False)
    r0, r1 = (torch.load(tmp_path / f'w2r{r}.pt', weights_only=False) for r in range(WORLD))
    ref, got = EnergyThresholds.from_dict(one['thr']), EnergyThresholds.from_dict(r0['thr'])
    assert r0['thr'] == r1['thr']
    assert got.num_samples == ref.num_samples == N
    assert (got.low, got.high) == pytest.approx((ref.low, ref.high), rel=1e-6, abs=1e-6)
    assert got.bin_edges == pytest.approx(ref.bin_edges, rel=1e-6, abs=1e-6)
    # HE-DA: the same samples are high-energy (E > high) whichever rank holds them ...
    assert sum(r0['high_energy'], []) == one['high_energy'][0] and len(one['high_energy'][0]) >= 3
    # ... and each rank mixes its own high-energy samples among themselves; a rank holding fewer than 2 of them
    # mixes none (this batch: rank 1 has a single one), where one process would have mixed it with the others
    for per_rank_high, per_rank_sel in zip(r0['high_energy'], r0['selected']):
        assert per_rank_sel == (per_rank_high if len(per_rank_high) >= 2 else [])
    assert one['selected'] == one['high_energy']
    torch.testing.assert_close(r0['loss'], one['loss'], rtol=1e-5, atol=1e-6)  # the step's (global) loss
    for a, b, c in zip(r0['grads'], r1['grads'], one['grads']):
        torch.testing.assert_close(a, b)  # DDP-averaged gradients: identical on both ranks ...
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)  # ... and equal to the global-batch gradient


# ---- the trainer under torchrun ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp')
    data = make_demo_imagefolder(root / 'data', train_per_class=5, val_per_class=2, size=32, num_classes=4)
    teacher = random_teacher_checkpoint(root / 'teacher.pth.tar', seed=0)
    # with timm's train augmentation: calibration draws each image's augmentation from (seed, sample index), so
    # one and two processes see the same pixels; batch 3: partial last batches must count too
    argv = [str(data), '--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint', str(teacher),
            '--img-size', '32', '--batch-size', '3', '--workers', '0', '--device', 'cpu', '--epochs', '1',
            '--warmup-epochs', '0', '--log-interval', '1', '--he-da', 'cutmix', '--he-da-rate', '0.4']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    return dict(root=root, argv=argv, env=env)


def _torchrun(script, argv, env, timeout=240):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD),
           script] + argv
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_trainer_under_torchrun_rank0_writes_and_thresholds_match(tiny_run):
    out = tiny_run['root'] / 'out'
    r = _torchrun(os.path.join(REPO, 'train_energykd.py'),
                  tiny_run['argv'] + ['--output', str(out), '--experiment', 'ddp'], tiny_run['env'])
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert 'Distributed training: process 1 of 2' in log
    # one log for the run: rank 1 reports warnings and errors only (issue 16)
    assert log.count("Teacher '") == 1 and log.count('Calibrating energy thresholds: one teacher pass') == 1, log[-3000:]
    assert log.count('*** Best metric') == 1
    run_dir = out / 'ddp'
    assert os.listdir(out) == ['ddp']  # one folder: rank 1 made none
    names = sorted(os.listdir(run_dir))
    assert names == sorted(['args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
                            'energy_thresholds.json', 'energy_thresholds_he_da.json', 'energy_histogram.png',
                            'training_curves.png', 'energy_bins.csv', 'energy_bins.png']), names
    with open(run_dir / 'summary.csv') as f:
        assert len(f.read().strip().splitlines()) == 2  # header + one epoch row: written once
    ddp_thr = EnergyThresholds.load_json(run_dir / 'energy_thresholds.json')
    assert ddp_thr.identity['N'] == ddp_thr.num_samples == 20  # every image once, no sampler padding

    torch.set_num_threads(1)
    single = train_energykd.main(tiny_run['argv'] + ['--output', str(tiny_run['root'] / 'single'),
                                                     '--experiment', 'one'])
    ref = single['thresholds']
    assert ref.num_samples == 20
    assert (ddp_thr.low, ddp_thr.high) == pytest.approx((ref.low, ref.high), rel=1e-5)
    assert ddp_thr.bin_edges == pytest.approx(ref.bin_edges, rel=1e-5)
    he = EnergyThresholds.load_json(run_dir / 'energy_thresholds_he_da.json')
    he_ref = EnergyThresholds.load_json(os.path.join(single['output_dir'], 'energy_thresholds_he_da.json'))
    assert he.high == pytest.approx(he_ref.high, rel=1e-5)


_FAILING = textwrap.dedent('''
    """train_energykd.py with a RuntimeError injected into the first epoch of one rank."""
    import os, sys
    from timm_energykd.train import trainer as train_energykd

    if os.environ['RANK'] == os.environ['FAIL_RANK']:
        def train_one_epoch(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
        train_energykd.train_one_epoch = train_one_epoch
    sys.argv[0] = 'train_energykd.py'
    train_energykd.main()
''')


@pytest.mark.slow
def test_failure_on_one_rank_stops_all_ranks(tiny_run):
    script = tiny_run['root'] / 'failing.py'
    script.write_text(_FAILING)
    out = tiny_run['root'] / 'out-fail'
    env = dict(tiny_run['env'], FAIL_RANK='1')
    r = _torchrun(str(script), tiny_run['argv'] + ['--output', str(out), '--experiment', 'fail'], env, timeout=180)
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert 'RuntimeError: injected failure on rank 1' in log
    # rank 0 was waiting for rank 1 in a collective: torchrun stopped it too (the test's timeout shows no hang),
    # before any checkpoint
    assert 'injected failure on rank 0' not in log
    assert not (out / 'fail' / 'last.pth.tar').exists()
