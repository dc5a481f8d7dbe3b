import json
import math

import pytest
import torch

from timm_energykd.thresholds import BatchQuantileThresholds, RunningThresholds
from timm_energykd.energy import (
    EnergyThresholds, calibrate_thresholds, energy_score,
    threshold_indices,
)


def _energy_reference(logits, T):
    """Float64 reference of Eq. 4: E = -T * log(sum_c exp(f_c / T)), with the max shift for stability."""
    out = []
    for row in logits.tolist():
        z = [v / T for v in row]
        m = max(z)
        out.append(-T * (m + math.log(sum(math.exp(v - m) for v in z))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize('T', [1.0, 4.0, 0.5])
def test_energy_matches_reference(T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g) * 5
    torch.testing.assert_close(energy_score(logits, T).double(), _energy_reference(logits, T), rtol=1e-6, atol=1e-5)
    assert energy_score(logits, T).dtype == torch.float32


def test_energy_large_logits_fp16_and_bf16_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [6e4, 6e4, 6e4]])
    for dt in (torch.float16, torch.bfloat16):
        e = energy_score(logits.to(dt), 4.0)
        assert e.dtype == torch.float32 and torch.isfinite(e).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(energy_score(logits * 10, 4.0)).all()


def test_threshold_indices_convention():
    assert threshold_indices(10, 0.2) == (2, 8)
    assert threshold_indices(10, 0.5) == (5, 5)
    assert threshold_indices(1, 0.5) == (0, 0)
    assert threshold_indices(100, 0.29) == (29, 71)
    assert threshold_indices(3, 0.1) == (0, 2)  # floor(2.7)=2 = N-1
    for bad in (0.0, -0.1, 0.51, 1.0):
        with pytest.raises(ValueError, match='rate'):
            threshold_indices(10, bad)
    with pytest.raises(ValueError, match='num_samples'):
        threshold_indices(0, 0.2)


def test_from_energies_small_array():
    e = torch.tensor([9., 1., 8., 2., 7., 3., 6., 4., 5., 0.])  # sorted: 0..9
    thr = EnergyThresholds.from_energies(e, 0.2, num_bins=5)
    assert (thr.low, thr.high) == (2.0, 8.0)
    assert thr.num_samples == 10
    assert thr.bin_counts == {'low': 3, 'mid': 6, 'high': 1}  # E<=2: 0,1,2 ; E>8: 9
    assert thr.bin_edges == [2.0, 4.0, 6.0, 8.0]  # indices floor(10*k/5)
    assert sum(thr.histogram['counts']) == 10 and len(thr.histogram['edges']) == 51


def test_from_energies_rejects_nonfinite():
    with pytest.raises(ValueError, match='not finite'):
        EnergyThresholds.from_energies(torch.tensor([1.0, float('nan'), 2.0]), 0.2)


def test_json_roundtrip_identity_and_corrupt(tmp_path):
    thr = EnergyThresholds.from_energies(torch.arange(20.), 0.2, identity={'teacher': 'resnet32x4', 'r': 0.2})
    p = tmp_path / 'sub' / 'thr.json'
    thr.save_json(p)
    assert [x.name for x in p.parent.iterdir()] == ['thr.json']  # no temp file left
    back = EnergyThresholds.load_json(p, expect_identity={'teacher': 'resnet32x4'})
    assert back == thr
    with pytest.raises(ValueError, match=r'was computed for teacher=resnet32x4, this run has resnet8x4'):
        EnergyThresholds.load_json(p, expect_identity={'teacher': 'resnet8x4'})
    with pytest.raises(ValueError, match='split=<missing>'):
        EnergyThresholds.load_json(p, expect_identity={'split': 'train'})
    bad = tmp_path / 'bad.json'
    bad.write_text('{"low": 1.0, ')
    with pytest.raises(ValueError, match='bad.json'):
        EnergyThresholds.load_json(bad)
    bad.write_text(json.dumps({'foo': 1}))
    with pytest.raises(ValueError, match='bad.json'):
        EnergyThresholds.load_json(bad)
    with pytest.raises(FileNotFoundError):
        EnergyThresholds.load_json(tmp_path / 'none.json')


def test_calibrate_equals_from_energies():
    g = torch.Generator().manual_seed(1)
    teacher = torch.nn.Linear(8, 5)
    data = torch.randn(37, 8, generator=g)
    loader = [(data[i:i + 10], torch.zeros(min(10, 37 - i))) for i in range(0, 37, 10)]
    thr = calibrate_thresholds(teacher, loader, 0.2, energy_temperature=2.0, num_bins=4, identity={'x': 1},
                               log_interval=1)
    with torch.no_grad():
        ref = EnergyThresholds.from_energies(energy_score(teacher(data), 2.0), 0.2, 2.0, num_bins=4)
    assert thr.low == ref.low and thr.high == ref.high and thr.bin_edges == ref.bin_edges
    assert thr.identity == {'x': 1, 'N': 37}


def test_batch_quantiles_match_dataset_convention():
    e = torch.tensor([9., 1., 8., 2., 7., 3., 6., 4., 5., 0.])
    low, high, edges = BatchQuantileThresholds(0.2, num_bins=5)(e)
    ref = EnergyThresholds.from_energies(e, 0.2, num_bins=5)
    assert float(low) == ref.low and float(high) == ref.high and edges.tolist() == ref.bin_edges


def test_running_thresholds_ema_and_state():
    est = RunningThresholds(0.2, momentum=0.5, num_bins=5)
    e1 = torch.arange(10.)
    e2 = torch.arange(10.) + 10
    low, high, _ = est(e1)
    assert (float(low), float(high)) == (2.0, 8.0)
    low, high, edges = est(e2)
    assert (float(low), float(high)) == (7.0, 13.0)  # 0.5*2 + 0.5*12, 0.5*8 + 0.5*18
    sd = est.state_dict()
    assert {'low', 'high', 'bin_edges', 'initialized'} <= set(sd)
    est2 = RunningThresholds(0.2, momentum=0.5, num_bins=5)
    est2.load_state_dict(sd)
    est2.eval()
    low2, high2, edges2 = est2(e1)  # eval: stored values, no update
    assert float(low2) == 7.0 and float(high2) == 13.0 and torch.equal(edges2, edges)
    with pytest.raises(ValueError, match='momentum'):
        RunningThresholds(0.2, momentum=1.0)


def test_calibrate_amp_and_progress_log(caplog):
    import logging
    teacher = torch.nn.Linear(8, 5)
    data = torch.randn(12, 8)
    loader = [(data[i:i + 4], None) for i in range(0, 12, 4)]
    with caplog.at_level(logging.INFO, logger='timm_energykd.energy'):
        thr = calibrate_thresholds(teacher, loader, 0.25, amp_dtype=torch.bfloat16, log_interval=2)
    assert math.isfinite(thr.low) and thr.low <= thr.high and thr.num_samples == 12
    text = caplog.text
    assert 'batch 2/3' in text and 'batch 3/3' in text and 'img/s' in text and 'ETA' in text
    with pytest.raises(ValueError, match='rate'):
        calibrate_thresholds(teacher, loader, 0.6)
