"""Per-energy-bin report: where did distillation help? (the paper's Figures 3 and 4, for any run)

The evaluation set is split into bins of the teacher's energy ``E(x) = -T_E * logsumexp(t(x) / T_E)``
(low energy = confident teacher). Per bin: the teacher's and the student's accuracy and confidence (mean
top softmax probability) and the student's agreement with the teacher (same arg-max), in percent::

    from timm_energykd.energy_report import energy_bin_report, write_energy_bin_report
    rows = energy_bin_report(task.teacher_logits, student, loader_eval, thresholds=thresholds)
    write_energy_bin_report(rows, output_dir)          # energy_bins.csv + energy_bins.png, atomically

Bins: the calibration thresholds' ``bin_edges`` (quantiles of the *training* energies) when given, else
``num_bins`` quantiles of the evaluation energies; bin ``i`` holds ``edges[i-1] < E <= edges[i]``, the
``torch.bucketize`` convention of the gradation policy. A bin's ``group`` is ``low`` when it lies at or
below the low threshold (``E <= low``), ``high`` when at or above the high threshold, ``mid`` otherwise.
"""
import contextlib
import csv
import io
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .energy import energy_score, quantile_index
from .files import write_atomic

__all__ = ['ENERGY_BIN_COLUMNS', 'energy_bin_report', 'energy_bin_rows', 'write_energy_bin_report',
           'read_energy_bin_csv']

ENERGY_BIN_COLUMNS = ('bin', 'group', 'energy_low', 'energy_high', 'count', 'teacher_acc', 'teacher_conf',
                      'student_acc', 'student_conf', 'agreement')
_PERCENT_COLUMNS = ENERGY_BIN_COLUMNS[5:]


def _get(obj: Any, key: str):
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def energy_bin_rows(
        energy: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        *,
        bin_edges: Optional[Sequence[float]] = None,
        num_bins: int = 10,
        low: Optional[float] = None,
        high: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Rows of the report from whole-set tensors: energy [N], target [N], logits [N, C] (vectorised).

    Args:
        bin_edges: ascending interior edges (``num_bins - 1`` of them); default: quantiles of ``energy``.
        num_bins: number of quantile bins when ``bin_edges`` is not given.
        low / high: thresholds naming each bin's group (``low`` / ``mid`` / ``high``); no group without them.
    """
    energy = energy.detach().double().reshape(-1).cpu()
    n = energy.numel()
    if n == 0:
        raise ValueError('energy_bin_rows: no samples')
    if bin_edges is None or len(bin_edges) == 0:
        if num_bins < 1:
            raise ValueError(f'num_bins={num_bins}; expected >= 1')
        e_sorted = torch.sort(energy).values
        bin_edges = [float(e_sorted[quantile_index(n, k / num_bins)]) for k in range(1, num_bins)]
    edges = torch.tensor([float(e) for e in bin_edges], dtype=torch.float64)
    idx = torch.bucketize(energy, edges)  # bin i: edges[i-1] < E <= edges[i]
    nb = edges.numel() + 1
    t_prob = teacher_logits.detach().float().softmax(-1).cpu()
    s_prob = student_logits.detach().float().softmax(-1).cpu()
    t_conf, t_pred = t_prob.max(-1)
    s_conf, s_pred = s_prob.max(-1)
    target = target.detach().cpu()
    if target.ndim > 1:  # soft / one-hot targets
        target = target.argmax(-1)
    stats = torch.stack([(t_pred == target).double(), t_conf.double(), (s_pred == target).double(),
                         s_conf.double(), (s_pred == t_pred).double()], 1)  # [N, 5]
    sums = torch.zeros(nb, 5, dtype=torch.float64).index_add_(0, idx, stats)
    counts = torch.bincount(idx, minlength=nb)
    e_min = torch.full((nb,), float('inf'), dtype=torch.float64).scatter_reduce(0, idx, energy, 'amin')
    e_max = torch.full((nb,), float('-inf'), dtype=torch.float64).scatter_reduce(0, idx, energy, 'amax')
    rows = []
    for i in range(nb):  # one row per bin (a handful), not per sample
        c = int(counts[i])
        lo_edge = float(edges[i - 1]) if i > 0 else float(e_min[i]) if c else float(energy.min())
        hi_edge = float(edges[i]) if i < nb - 1 else float(e_max[i]) if c else float(energy.max())
        row: Dict[str, Any] = {'bin': i, 'energy_low': lo_edge, 'energy_high': hi_edge, 'count': c}
        if low is not None and high is not None:
            row['group'] = 'low' if hi_edge <= low else 'high' if lo_edge >= high else 'mid'
        for key, value in zip(_PERCENT_COLUMNS, sums[i].tolist()):
            row[key] = 100.0 * value / c if c else None
        rows.append(row)
    return rows


@torch.no_grad()
def energy_bin_report(
        teacher_logits_fn: Callable[[torch.Tensor], torch.Tensor],
        student: nn.Module,
        loader,
        *,
        thresholds: Any = None,
        energy_temperature: Optional[float] = None,
        num_bins: int = 10,
        device: Optional[torch.device] = None,
        amp_autocast: Callable = contextlib.nullcontext,
) -> List[Dict[str, Any]]:
    """Run teacher and student over ``loader`` (no grad, batched) and return the per-energy-bin rows.

    Args:
        teacher_logits_fn: images (normalised for the student, as the loader yields them) -> teacher logits,
            e.g. ``EnergyDistillationTask.teacher_logits``.
        student: the student (put in eval mode for the pass, its mode restored afterwards).
        loader: yields ``(images, targets)``; timm's eval loader or any DataLoader.
        thresholds: ``EnergyThresholds`` (or its dict): ``bin_edges``, ``low`` / ``high`` and ``energy_temperature``
            are taken from it.
        energy_temperature: ``T_E``; default the thresholds', else 4.
        num_bins: quantile bins over the evaluation energies when the thresholds carry no ``bin_edges``.
        device: where the batches go; default the student's device.
        amp_autocast: context manager for the forward passes (the energy and softmax run in float32).
    """
    t_e = energy_temperature or _get(thresholds, 'energy_temperature') or 4.0
    device = device or next(student.parameters()).device
    was_training = student.training
    student.eval()
    parts: Dict[str, List[torch.Tensor]] = {'energy': [], 'target': [], 't': [], 's': []}
    try:
        for images, target in loader:
            images = images.to(device)
            with amp_autocast():
                t_logits = teacher_logits_fn(images)
                s_logits = student(images)
            parts['energy'].append(energy_score(t_logits.float(), float(t_e)).cpu())
            parts['target'].append(target.cpu())
            parts['t'].append(t_logits.float().cpu())
            parts['s'].append(s_logits.float().cpu())
    finally:
        student.train(was_training)
    if not parts['energy']:
        raise ValueError('energy_bin_report: the loader yielded no batches')
    return energy_bin_rows(
        torch.cat(parts['energy']), torch.cat(parts['target']), torch.cat(parts['t']), torch.cat(parts['s']),
        bin_edges=_get(thresholds, 'bin_edges') or None, num_bins=num_bins,
        low=_get(thresholds, 'low'), high=_get(thresholds, 'high'))


def write_energy_bin_report(rows: Sequence[Dict[str, Any]], output_dir, name: str = 'energy_bins',
                            title: Optional[str] = None) -> Tuple[str, str]:
    """Write ``NAME.csv`` (``ENERGY_BIN_COLUMNS``) and ``NAME.png`` to ``output_dir``, each atomically.

    Returns ``(csv_path, png_path)``.
    """
    from .plots import plot_energy_bins
    out = Path(output_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ENERGY_BIN_COLUMNS), extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ('' if r.get(k) is None else r[k]) for k in ENERGY_BIN_COLUMNS})
    csv_path = write_atomic(out / f'{name}.csv', buf.getvalue())
    png_path = plot_energy_bins(rows, out / f'{name}.png', title=title)
    return str(csv_path), str(png_path)


def read_energy_bin_csv(path) -> List[Dict[str, Any]]:
    """Rows written by ``write_energy_bin_report`` (numbers as int / float, empty cells as None)."""
    rows = []
    with Path(path).open(newline='') as f:
        for raw in csv.DictReader(f):
            row: Dict[str, Any] = {}
            for k, v in raw.items():
                if v in ('', None):
                    row[k] = None
                elif k in ('bin', 'count'):
                    row[k] = int(float(v))
                elif k == 'group':
                    row[k] = v
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows
