"""The per-energy-bin report against a per-sample reference computed here."""
import csv

import pytest
import timm
import torch
from PIL import Image

from timm_energykd.energy import EnergyThresholds, energy_score
from timm_energykd.energy_report import (
    ENERGY_BIN_COLUMNS, energy_bin_report, energy_bin_rows, read_energy_bin_csv, write_energy_bin_report)


def _models():
    torch.manual_seed(0)
    teacher = timm.create_model('test_resnet', num_classes=5).eval()
    student = timm.create_model('test_resnet', num_classes=5).train()
    return teacher, student


def _loader(n=37, batch=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], x, y


def _reference(edges, energy, y, t_logits, s_logits, lo_thr, hi_thr):
    """Per-sample loop: which bin, then plain means."""
    rows = []
    bounds = [float('-inf')] + list(edges) + [float('inf')]
    for b in range(len(bounds) - 1):
        members = [i for i in range(len(energy)) if bounds[b] < energy[i] <= bounds[b + 1]]
        r = {'bin': b, 'count': len(members)}
        if members:
            tp = [int(t_logits[i].argmax()) for i in members]
            sp = [int(s_logits[i].argmax()) for i in members]
            r['teacher_acc'] = 100 * sum(p == int(y[i]) for p, i in zip(tp, members)) / len(members)
            r['student_acc'] = 100 * sum(p == int(y[i]) for p, i in zip(sp, members)) / len(members)
            r['agreement'] = 100 * sum(a == b for a, b in zip(tp, sp)) / len(members)
            r['teacher_conf'] = 100 * sum(float(t_logits[i].softmax(0).max()) for i in members) / len(members)
            r['student_conf'] = 100 * sum(float(s_logits[i].softmax(0).max()) for i in members) / len(members)
        lo_e, hi_e = max(bounds[b], min(energy)), min(bounds[b + 1], max(energy))
        r['group'] = 'low' if hi_e <= lo_thr else 'high' if lo_e >= hi_thr else 'mid'
        rows.append(r)
    return rows


def _check(rows, ref):
    assert len(rows) == len(ref)
    for got, want in zip(rows, ref):
        for k, v in want.items():
            assert got[k] == (pytest.approx(v) if isinstance(v, float) else v), (got['bin'], k)


def test_report_with_calibration_edges_matches_per_sample_reference(tmp_path):
    teacher, student = _models()
    loader, x, y = _loader()
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student.eval()(x)
    student.train()
    energy = energy_score(t_logits, 2.0)
    # calibration on other ("training") energies: its 5-bin edges and r = 0.2 thresholds are used as they are
    th = EnergyThresholds.from_energies(energy + 0.05 * torch.randn(37, generator=torch.Generator().manual_seed(2)),
                                        0.2, energy_temperature=2.0, num_bins=5)
    rows = energy_bin_report(teacher, student, loader, thresholds=th)
    assert student.training  # mode restored
    assert sum(r['count'] for r in rows) == 37 and len(rows) == 5
    _check(rows, _reference(th.bin_edges, energy.tolist(), y, t_logits, s_logits, th.low, th.high))
    assert [r['energy_high'] for r in rows[:-1]] == pytest.approx(th.bin_edges)
    assert rows[0]['group'] == 'low' and rows[-1]['group'] == 'high'

    csv_path, png_path = write_energy_bin_report(rows, tmp_path)
    with open(csv_path, newline='') as f:
        assert next(csv.reader(f)) == list(ENERGY_BIN_COLUMNS)
    back = read_energy_bin_csv(csv_path)
    for got, want in zip(back, rows):
        for k in ENERGY_BIN_COLUMNS:
            assert got[k] == (pytest.approx(want[k]) if isinstance(want[k], float) else want[k]), k
    img = Image.open(png_path)
    assert img.size == (900, 620) and img.format == 'PNG'


def test_report_quantile_bins_without_thresholds():
    teacher, student = _models()
    loader, x, y = _loader(n=40)
    rows = energy_bin_report(teacher, student, loader, energy_temperature=4.0, num_bins=4)
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student.eval()(x)
    energy = energy_score(t_logits, 4.0)
    e = energy.sort().values
    edges = [float(e[40 * k // 4]) for k in range(1, 4)]  # quantile_index(N, k / 4)
    ref = _reference(edges, energy.tolist(), y, t_logits, s_logits, 0, 0)
    for r in ref:
        r.pop('group')
    _check(rows, ref)
    assert [r['count'] for r in rows] == [11, 10, 10, 9]  # E <= edge goes to the lower bin
    assert 'group' not in rows[0]


def test_rows_soft_targets_and_empty_bins():
    t = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.9]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    rows = energy_bin_rows(energy_score(t), target, t, s, bin_edges=[-100.0, -4.0], low=-100.0, high=-4.0)
    assert [r['count'] for r in rows] == [0, 2, 1]
    assert rows[0]['teacher_acc'] is None and rows[0]['group'] == 'low'
    assert rows[1]['teacher_acc'] == 100.0 and rows[1]['student_acc'] == 50.0 and rows[1]['agreement'] == 50.0
    assert rows[2]['teacher_acc'] == 0.0 and rows[2]['student_acc'] == 100.0 and rows[2]['group'] == 'high'
