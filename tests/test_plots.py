"""The figures: colours, thresholds, labels and the values they show, recomputed here."""
import csv
import math

import pytest
import torch
from PIL import Image, ImageDraw

from timm_energykd.energy import EnergyThresholds
from timm_energykd.plots import (
    SERIES_COLOURS, HE_DA_COLOUR, HIGH_COLOUR, LOW_COLOUR, figure_font, plot_energy_histogram, plot_training_curves,
    read_summary_rows, render_energy_histogram, training_curve_series)


def test_histogram_png_marks_thresholds(tmp_path):
    e = torch.randn(2000, generator=torch.Generator().manual_seed(0)) - 8.0
    th = EnergyThresholds.from_energies(e, 0.2)
    he = EnergyThresholds.from_energies(e, 0.4)
    path = plot_energy_histogram(th, tmp_path / 'energy.png', he_da_thresholds=he)
    img = Image.open(path).convert('RGB')
    assert img.size == (720, 420)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert {LOW_COLOUR, HIGH_COLOUR, HE_DA_COLOUR} <= colours
    # the dashed HE-DA line sits at its threshold: x range = histogram range, plot from x=60 to 700
    edges = th.histogram['edges']
    x = 60 + (he.high - edges[0]) / (edges[-1] - edges[0]) * 640
    column = [img.getpixel((int(round(x)) + dx, y)) for dx in (-1, 0, 1) for y in range(80, 350)]
    assert column.count(HE_DA_COLOUR) > 50
    # the same works from the JSON dict form
    plot_energy_histogram(th.to_dict(), tmp_path / 'energy2.png', he_da_thresholds=he.to_dict())


def test_bar_colours_follow_thresholds():
    img = render_energy_histogram([1, 1, 1, 1], [0, 1, 2, 3, 4], low=1.0, high=3.0, size=(400, 200))
    # bar centres: 0.5 (low), 1.5 and 2.5 (mid), 3.5 (high); sample pixels near the bottom of each bar
    px = lambda v: img.getpixel((int(60 + v / 4 * (400 - 80)), 200 - 60 - 5))  # noqa: E731
    assert px(0.5) == LOW_COLOUR and px(3.5) == HIGH_COLOUR and px(2.0) == (150, 150, 150)


def _tinted(p, c):
    """Pixel p is colour c blended with white (antialiased text)."""
    d, e = [255 - v for v in p], [255 - v for v in c]
    if sum(d) < 80:
        return False
    r = sum(d) / sum(e)
    return all(abs(a - r * b) < 30 for a, b in zip(d, e))


def _label_extent(img, colour, y0, y1):
    xs = [x for x in range(img.size[0]) for y in range(y0, y1) if _tinted(img.getpixel((x, y)), colour)]
    return (min(xs), max(xs)) if xs else None


@pytest.mark.parametrize('high', [3.999, 1e6])
def test_labels_never_clipped_and_y_axis_labelled(high):
    # a high threshold at (or far beyond) the right end of the range: its label must stay whole in the image
    img = render_energy_histogram([5, 1, 1, 9], [0, 1, 2, 3, 4], low=0.001, high=high, he_da_high=high * 0.999)
    w = img.size[0]
    font = figure_font()
    d = ImageDraw.Draw(img)
    for colour, text in ((HIGH_COLOUR, f'high = {high:.3g}'), (LOW_COLOUR, 'low = 0.001'),
                         (HE_DA_COLOUR, f'HE-DA high = {high * 0.999:.3g}')):
        extent = _label_extent(img, colour, 18, 70)  # the label rows above the plot
        assert extent is not None, text
        assert extent[0] >= 1 and extent[1] <= w - 2, text
        assert extent[1] - extent[0] >= 0.85 * d.textlength(text, font=font), text  # drawn whole
    # the y-axis label is drawn (dark pixels in the left margin, rotated text)
    dark = [(x, y) for x in range(0, 22) for y in range(100, 320) if sum(img.getpixel((x, y))) < 300]
    assert len(dark) > 30


def _write_summary(path, rows):
    cols = list(rows[0])
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def test_training_curves_show_summary_values(tmp_path):
    rows = [dict(epoch=e, train_loss=2.0 / (e + 1), train_task_loss=1.5 / (e + 1), train_kd_loss=0.7 + 0.01 * e,
                 train_frac_low=0.2 + 0.01 * e, train_frac_mid=0.6, train_frac_high=0.2 - 0.01 * e,
                 train_temp_mean=4.0 + 0.1 * e, eval_loss=2.1 / (e + 1), eval_top1=30.0 + 5 * e, eval_top5=80.0,
                 lr=0.1 * math.cos(e / 4)) for e in range(4)]
    summary = tmp_path / 'summary.csv'
    _write_summary(summary, rows[:1])
    out = tmp_path / 'training_curves.png'
    assert plot_training_curves(tmp_path / 'missing.csv', out) is None and not out.exists()
    plot_training_curves(summary, out)
    first = out.read_bytes()
    _write_summary(summary, rows)
    plot_training_curves(summary, out)  # each epoch: the picture is replaced, atomically
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ['summary.csv', 'training_curves.png']  # no temp files
    panels = {title: dict(series) for title, _, series in training_curve_series(read_summary_rows(summary))}
    assert set(panels) == {'Loss', 'Top-1', 'Loss terms (train, before weights)', 'Energy groups (train)',
                           'Mean temperature (train)', 'Learning rate'}
    assert panels['Loss']['train'] == [(r['epoch'], pytest.approx(r['train_loss'])) for r in rows]
    assert panels['Loss']['eval'] == [(r['epoch'], pytest.approx(r['eval_loss'])) for r in rows]
    assert panels['Top-1']['eval'] == [(r['epoch'], pytest.approx(r['eval_top1'])) for r in rows]
    assert set(panels['Loss terms (train, before weights)']) == {'task', 'kd'}  # every term, found by name
    assert panels['Energy groups (train)']['low energy'] == [
        (r['epoch'], pytest.approx(100 * r['train_frac_low'])) for r in rows]
    assert panels['Energy groups (train)']['high energy'][-1] == (3, pytest.approx(17.0))
    assert panels['Mean temperature (train)']['mean T'][-1] == (3, pytest.approx(4.3))
    img = Image.open(out).convert('RGB')
    colours = {c for _, c in img.getcolors(maxcolors=1 << 18)}
    assert set(SERIES_COLOURS[:2]) <= colours
