"""Two gloo processes with uneven sample counts get identical thresholds, equal to the single-process value."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_energykd.energy import EnergyThresholds, calibrate_thresholds, energy_score  # noqa
from timm_energykd.thresholds import RunningThresholds  # noqa

COUNTS = (23, 14)  # uneven per-rank sample counts


def _data():
    g = torch.Generator().manual_seed(3)
    teacher = torch.nn.Linear(6, 7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    data = torch.randn(sum(COUNTS), 6, generator=g)
    return teacher, data


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        teacher, data = _data()
        start = sum(COUNTS[:rank])
        mine = data[start:start + COUNTS[rank]]
        loader = [(mine[i:i + 5], None) for i in range(0, mine.shape[0], 5)]
        thr = calibrate_thresholds(teacher, loader, 0.2, num_bins=4, progress=False)
        # running estimator gathers equal-size batches across ranks
        est = RunningThresholds(0.2, momentum=0.5, num_bins=4)
        low, high, _ = est(energy_score(teacher(data[rank * 8:(rank + 1) * 8]).detach()))
        torch.save({'thr': thr.to_dict(), 'run': (float(low), float(high))}, os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_thresholds_identical(tmp_path):
    init_file = tmp_path / 'init'
    mp.spawn(_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in range(2))
    assert r0['thr'] == r1['thr']
    teacher, data = _data()
    with torch.no_grad():
        ref = EnergyThresholds.from_energies(energy_score(teacher(data)), 0.2, num_bins=4)
        ref_run = EnergyThresholds.from_energies(energy_score(teacher(data[:16])), 0.2, num_bins=4)
    got = EnergyThresholds.from_dict(r0['thr'])
    assert (got.low, got.high, got.bin_edges, got.num_samples) == (ref.low, ref.high, ref.bin_edges, 37)
    assert r0['run'] == r1['run']
    assert r0['run'] == pytest.approx((ref_run.low, ref_run.high), rel=1e-6)


def _task_worker(rank, world, init_file, out_dir):
    import numpy as np
    import torch.nn as nn
    from timm_energykd.mixing import HighEnergyMix
    from timm_energykd.task import EnergyDistillationTask

    def tiny(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
        m.pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}
        return m

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        task = EnergyDistillationTask(
            tiny(0), tiny(1), distill_loss='energy_kd', threshold_mode='running', energy_rate=0.3,
            he_da=HighEnergyMix('cutmix', generator=np.random.default_rng(rank)), verbose=False)
        task.prepare_distributed()
        task.train()
        opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank -> different HE-DA counts
        for _ in range(2):
            x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
            out = task(x, y)
            opt.zero_grad()
            out['loss'].backward()
            opt.step()
        est = task.threshold_estimator
        torch.save({
            'params': [p.detach().clone() for p in task.trainable_module.module.parameters()],
            'running': (est.low.clone(), est.high.clone()),
            'finite': bool(torch.isfinite(out['loss'])),
        }, os.path.join(out_dir, f'task{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_task_with_he_da_stays_in_sync(tmp_path):
    mp.spawn(_task_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'task{r}.pt', weights_only=False) for r in range(2))
    assert r0['finite'] and r1['finite']
    for a, b in zip(r0['params'], r1['params']):
        torch.testing.assert_close(a, b)  # DDP averaged the gradients despite different HE-DA batch sizes
    assert torch.equal(r0['running'][0], r1['running'][0]) and torch.equal(r0['running'][1], r1['running'][1])
