"""Diagnostics figures, drawn with Pillow only (no matplotlib), written atomically as PNG.

    from timm_energykd.plots import plot_energy_histogram, plot_training_curves, plot_energy_bins
    plot_energy_histogram(thresholds, 'run/energy_histogram.png', he_da_thresholds=he)  # calibration energies
    plot_training_curves('run/summary.csv', 'run/training_curves.png')                 # after every epoch
    plot_energy_bins(rows, 'run/energy_bins.png')                # rows of timm_energykd.energy_report

* The energy histogram: teacher energies ``E(x) = -T_E * logsumexp(f(x) / T_E)`` over the calibration set,
  the low threshold (``E <= low``: low-energy, confident samples), the high threshold (``E > high``:
  high-energy, uncertain samples) and HE-DA's own high threshold drawn as vertical lines, groups shaded.
* The training curves: one panel per quantity of ``summary.csv`` (loss, top-1, each loss term, the shares
  of low- / high-energy samples, the mean temperature), epochs on the x-axis.
* The per-energy-bin report: accuracy, agreement and confidence of teacher and student per teacher-energy bin.
"""
import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from .files import write_atomic

__all__ = ['plot_energy_histogram', 'render_energy_histogram', 'plot_training_curves', 'render_training_curves',
           'read_summary_rows', 'training_curve_series', 'plot_energy_bins', 'render_energy_bins', 'CURVE_PANELS', 'SERIES_COLOURS',
           'LOW_COLOUR', 'MID_COLOUR', 'HIGH_COLOUR', 'HE_DA_COLOUR', 'figure_font']

LOW_COLOUR = (31, 119, 180)
MID_COLOUR = (150, 150, 150)
HIGH_COLOUR = (214, 39, 40)
HE_DA_COLOUR = (255, 127, 14)
_BLACK, _GRID = (0, 0, 0), (225, 225, 225)
# line / bar colours in the order series are drawn (tab10)
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))

# training-curve panels: (title, y label, [(summary.csv column, legend)], scale); a panel whose columns are
# all absent is not drawn; '*_loss' terms are found by name (every loss term the task logs)
CURVE_PANELS = (
    ('Loss', 'loss', [('train_loss', 'train'), ('eval_loss', 'eval')], 1.0),
    ('Top-1', 'accuracy (%)', [('eval_top1', 'eval'), ('eval_ema_top1', 'eval EMA')], 1.0),
    ('Loss terms (train, before weights)', 'loss', 'train_*_loss', 1.0),
    ('Energy groups (train)', 'share of samples (%)',
     [('train_frac_low', 'low energy'), ('train_frac_high', 'high energy'), ('train_he_da_frac', 'HE-DA mixed')], 100.0),
    ('Mean temperature (train)', 'temperature', [('train_temp_mean', 'mean T')], 1.0),
    ('Learning rate', 'lr', [('lr', 'lr')], 1.0),
)


def figure_font(size: int = 12):
    """The figures' font: Pillow's scalable default at ``size`` px (its bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f'{v:.3g}'


def _fmt_for(span: float, extra: int = 0):
    """A number format that tells values ``span / 10`` apart (``.3g`` would print -7.153 and -7.158 alike)."""
    if not math.isfinite(span) or span <= 0 or span >= 1e5:
        return lambda v: f'{v:.3g}'
    decimals = max(0, 1 - int(math.floor(math.log10(span))) + extra)
    return lambda v: f'{v:.{decimals}f}'


def _text(d: ImageDraw.ImageDraw, xy, text: str, fill=_BLACK, font=None, width: Optional[int] = None,
          anchor_right: bool = False) -> float:
    """Draw text with x clamped to [2, width - textwidth - 2] (never clipped); returns the x used."""
    font = font or figure_font()
    tw = d.textlength(text, font=font)
    x = xy[0] - tw if anchor_right else xy[0]
    if width is not None:
        x = min(max(2, x), width - tw - 2)
    d.text((x, xy[1]), text, fill=fill, font=font)
    return x


def _vertical_label(img: Image.Image, text: str, x: int, y_centre: int, font) -> None:
    """A y-axis label, rotated 90 degrees, centred on ``y_centre``."""
    probe = ImageDraw.Draw(img)
    tw = int(probe.textlength(text, font=font)) + 4
    tile = Image.new('RGB', (tw, 16), (255, 255, 255))
    ImageDraw.Draw(tile).text((2, 1), text, fill=_BLACK, font=font)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (x, max(0, y_centre - tile.size[1] // 2)))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _save_png(img: Image.Image, path) -> str:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    write_atomic(path, buf.getvalue())
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# energy histogram

def render_energy_histogram(
        counts: Sequence[float],
        edges: Sequence[float],
        low: Optional[float] = None,
        high: Optional[float] = None,
        title: str = 'Teacher energy',
        size: Tuple[int, int] = (720, 420),
        he_da_high: Optional[float] = None,
) -> Image.Image:
    """Draw a histogram (``len(edges) == len(counts) + 1``) with the thresholds marked; returns a PIL image.

    Bars left of ``low`` are blue (low energy), right of ``high`` red (high energy), others grey; the
    x-range covers every threshold, so a threshold outside the histogram's range is still drawn.
    """
    counts = [float(c) for c in counts]
    edges = [float(e) for e in edges]
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(f'histogram needs len(edges) == len(counts) + 1 > 1, got {len(edges)} edges and '
                         f'{len(counts)} counts')
    w, h = size
    left, right, top, bottom = 60, 20, 72, 60
    pw, ph = w - left - right, h - top - bottom
    img = Image.new('RGB', size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = figure_font()
    marks = [(v, c, n) for v, c, n in ((low, LOW_COLOUR, 'low'), (high, HIGH_COLOUR, 'high'),
                                       (he_da_high, HE_DA_COLOUR, 'HE-DA high')) if v is not None]
    lo = min([edges[0]] + [v for v, _, _ in marks])
    hi = max([edges[-1]] + [v for v, _, _ in marks])
    span = (hi - lo) or 1.0
    cmax = max(counts) or 1.0

    def x_of(v: float) -> float:
        return left + (v - lo) / span * pw

    for c, e0, e1 in zip(counts, edges[:-1], edges[1:]):
        mid = 0.5 * (e0 + e1)
        colour = MID_COLOUR
        if low is not None and mid <= low:
            colour = LOW_COLOUR
        elif high is not None and mid > high:
            colour = HIGH_COLOUR
        x0, x1 = x_of(e0), x_of(e1)
        if c > 0:
            d.rectangle([x0, top + ph * (1 - c / cmax), max(x0 + 1, x1 - 1), top + ph], fill=colour)

    d.line([left, top + ph, left + pw, top + ph], fill=_BLACK)
    d.line([left, top, left, top + ph], fill=_BLACK)
    tick_fmt, label_fmt = _fmt_for(span), _fmt_for(span, extra=1)
    for v in _nice_ticks(lo, hi, 6):
        x = x_of(v)
        d.line([x, top + ph, x, top + ph + 4], fill=_BLACK)
        tw = d.textlength(tick_fmt(v), font=font)
        _text(d, (x - tw / 2, top + ph + 6), tick_fmt(v), font=font, width=w)
    for v in [t for t in _nice_ticks(0.0, cmax, 4) if float(t).is_integer()]:  # counts: whole numbers
        y = top + ph * (1 - v / cmax)
        d.line([left - 4, y, left, y], fill=_BLACK)
        _text(d, (left - 6, y - 7), f'{v:g}', font=font, anchor_right=True)
    _vertical_label(img, 'samples per bin', 4, top + ph // 2, font)
    xlabel = 'teacher energy E(x) (lower = more confident)'
    _text(d, (left + pw / 2 - d.textlength(xlabel, font=font) / 2, h - 22), xlabel, font=font, width=w)
    _text(d, (left, 6), title, font=font, width=w)

    rows: List[List[Tuple[float, float]]] = [[], [], []]  # label extents per row above the plot
    for v, colour, name in marks:
        x = x_of(v)
        # a white-edged dashed line in a darker shade, so it stays visible over bars of its own colour
        line = tuple(int(c * 0.55) for c in colour) if name != 'HE-DA high' else colour
        d.line([x, top, x, top + ph], fill=(255, 255, 255), width=4)
        for y in range(top, top + ph, 6):
            d.line([x, y, x, min(y + 3, top + ph)], fill=line, width=2)
        # labels in the margin above the plot, 'low' left of its line, the others right of theirs; clamped
        # inside the image and moved to the second row when they would overlap a label already placed
        label = f'{name} = {label_fmt(v)}'
        tw = d.textlength(label, font=font)
        x0 = min(max(2.0, x - tw - 3 if name == 'low' else x + 3), w - tw - 2)
        row = next((i for i, placed in enumerate(rows) if all(x0 + tw < a or x0 > b for a, b in placed)), 2)
        rows[row].append((x0 - 4, x0 + tw + 4))
        d.text((x0, top - 50 + 16 * row), label, fill=colour, font=font)
    return img


def plot_energy_histogram(thresholds, path, title: Optional[str] = None, size: Tuple[int, int] = (720, 420),
                          he_da_thresholds=None) -> str:
    """Write the energy histogram of an ``EnergyThresholds`` (or its ``to_dict()``) as a PNG, atomically.

    ``he_da_thresholds`` (HE-DA's own, wider-rate thresholds) adds its high threshold. Returns the path.
    """
    def getter(obj):
        return obj.get if isinstance(obj, dict) else (lambda k: getattr(obj, k, None))
    get = getter(thresholds)
    hist = get('histogram') or {}
    if not hist.get('counts'):
        raise ValueError('plot_energy_histogram: the thresholds hold no histogram (calibrate with the dataset mode)')
    if title is None:
        n, rate, t_e = get('num_samples'), get('rate'), get('energy_temperature')
        title = f'Teacher energy over {n} samples (r = {rate}, T_E = {t_e})'
    he_high = getter(he_da_thresholds)('high') if he_da_thresholds is not None else None
    img = render_energy_histogram(hist['counts'], hist['edges'], get('low'), get('high'), title=title, size=size,
                                  he_da_high=he_high)
    return _save_png(img, path)


# ---------------------------------------------------------------------------------------------------------
# panels shared by the training curves and the per-bin report

def _panel(img: Image.Image, box, title: str, ylabel: str, xlabel: str, y_lo: float, y_hi: float,
           x_lo: float, x_hi: float, x_ticks: Optional[Sequence[Tuple[float, str]]] = None):
    """Axes, grid, ticks and labels in ``box`` (x0, y0, x1, y1); returns the value -> pixel maps."""
    d, font = ImageDraw.Draw(img), figure_font(11)
    x0, y0, x1, y1 = box
    n_lines = max((label.count('\n') + 1 for _, label in (x_ticks or [])), default=1)
    left, top, right, bottom = x0 + 62, y0 + 38, x1 - 10, y1 - 22 - 12 * n_lines
    if y_hi <= y_lo:  # one value (or a flat line): a range around it at its own scale
        half = abs(y_lo) * 0.5 or 0.5
        y_lo, y_hi = y_lo - half, y_hi + half
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def px(v):
        return left + (v - x_lo) / (x_hi - x_lo) * (right - left)

    def py(v):
        return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)
    for v in _nice_ticks(y_lo, y_hi, 4):
        d.line([left, py(v), right, py(v)], fill=_GRID)
        _text(d, (left - 5, py(v) - 6), f'{v:.4g}', font=font, anchor_right=True)
    ticks = x_ticks if x_ticks is not None else [(v, f'{v:g}') for v in _nice_ticks(x_lo, x_hi, 6)
                                                 if float(v).is_integer()]
    for v, label in ticks:
        d.line([px(v), bottom, px(v), bottom + 3], fill=_BLACK)
        for k, part in enumerate(label.split('\n')):
            _text(d, (px(v) - d.textlength(part, font=font) / 2, bottom + 4 + 12 * k), part, font=font,
                  width=img.size[0])
    d.rectangle([left, top, right, bottom], outline=_BLACK)
    _text(d, (left, y0 + 4), title, font=figure_font(12), width=img.size[0])
    _text(d, ((left + right) / 2 - d.textlength(xlabel, font=font) / 2, bottom + 6 + 12 * n_lines), xlabel,
          font=font)
    _vertical_label(img, ylabel, x0 + 2, (top + bottom) // 2, font)
    return px, py, (left, top, right, bottom)


def _legend(d: ImageDraw.ImageDraw, plot_box, names: Sequence[str]) -> None:
    """One legend row between the panel title and the plot (never over the data)."""
    font = figure_font(11)
    x, y = plot_box[0], plot_box[1] - 16
    for i, name in enumerate(names):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        d.rectangle([x, y + 5, x + 10, y + 8], fill=colour)
        d.text((x + 14, y), name, fill=colour, font=font)
        x += 14 + d.textlength(name, font=font) + 12


# ---------------------------------------------------------------------------------------------------------
# training curves

def read_summary_rows(path) -> List[Dict[str, float]]:
    """timm's ``summary.csv`` as a list of {column: float} (non-numeric / empty cells left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline='') as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    pass
            if 'epoch' in row:
                rows.append(row)
    return rows


def _panel_series(rows: List[Dict[str, float]], columns) -> List[Tuple[str, str]]:
    if columns == 'train_*_loss':
        found = sorted({k for r in rows for k in r if k.startswith('train_') and k.endswith('_loss') and k != 'train_loss'})
        return [(k, k[len('train_'):-len('_loss')]) for k in found]
    return [(k, name) for k, name in columns if any(k in r for r in rows)]


def training_curve_series(rows: List[Dict[str, float]]) -> List[Tuple[str, str, List[Tuple[str, List[Tuple[float, float]]]]]]:
    """What the curves show: ``[(panel title, y label, [(legend, [(epoch, value)])])]``, values as plotted
    (shares in percent); panels without any of their columns are left out."""
    panels = []
    for title, ylabel, columns, scale in CURVE_PANELS:
        series = [(name, [(r['epoch'], r[key] * scale) for r in rows if key in r and math.isfinite(r[key])])
                  for key, name in _panel_series(rows, columns)]
        if series:
            panels.append((title, ylabel, series))
    return panels


def render_training_curves(rows: List[Dict[str, float]], title: str = 'Training curves',
                           size: Tuple[int, int] = (1080, 640)) -> Image.Image:
    """One panel per ``training_curve_series`` entry (3 columns), epoch on the x-axis."""
    panels = training_curve_series(rows)
    if not rows or not panels:
        raise ValueError('render_training_curves: no summary rows with plottable columns')
    cols = 3
    n_rows = (len(panels) + cols - 1) // cols
    w, h = size
    img = Image.new('RGB', (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    _text(d, (8, 6), title, font=figure_font(13), width=w)
    epochs = [r['epoch'] for r in rows]
    cw, ch = w // cols, (h - 26) // n_rows
    for i, (ptitle, ylabel, series) in enumerate(panels):
        box = ((i % cols) * cw, 26 + (i // cols) * ch, (i % cols + 1) * cw, 26 + (i // cols + 1) * ch)
        values = [v for _, pts in series for _, v in pts]
        px, py, plot_box = _panel(img, box, ptitle, ylabel, 'epoch', min(values, default=0.0),
                                  max(values, default=1.0), min(epochs), max(epochs))
        for j, (_, pts) in enumerate(series):
            colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
            xy = [(px(e), py(v)) for e, v in pts]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            for x, y in xy:
                d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        _legend(d, plot_box, [name for name, _ in series])
    return img


def plot_training_curves(summary_csv, path, title: Optional[str] = None,
                         size: Tuple[int, int] = (1080, 640)) -> Optional[str]:
    """Draw ``summary.csv`` as training curves and write the PNG atomically; None when there are no rows yet.

    Meant to be called after each epoch's summary row: a reader never sees a half-written file.
    """
    rows = read_summary_rows(summary_csv)
    if not rows:
        return None
    epochs = f'{len(rows)} epoch' + ('s' if len(rows) != 1 else '')
    img = render_training_curves(rows, title or f'Training curves ({epochs}, {Path(summary_csv).parent.name})',
                                 size=size)
    return _save_png(img, path)


# ---------------------------------------------------------------------------------------------------------
# per-energy-bin report

_BIN_PANELS = (
    ('Accuracy and agreement per teacher-energy bin', 'percent',
     [('teacher_acc', 'teacher acc'), ('student_acc', 'student acc'), ('agreement', 'student = teacher')]),
    ('Confidence (mean top softmax probability)', 'percent',
     [('teacher_conf', 'teacher conf'), ('student_conf', 'student conf')]),
)


def render_energy_bins(rows: Sequence[Dict], title: str = 'Per energy bin (validation set)',
                       size: Tuple[int, int] = (900, 620)) -> Image.Image:
    """Grouped bars per energy bin (low energy left): accuracy / agreement, then confidence, in percent.

    The x labels give each bin's group (low / mid / high against the calibration thresholds) and sample count.
    """
    rows = list(rows)
    if not rows:
        raise ValueError('render_energy_bins: no rows')
    w, h = size
    img = Image.new('RGB', size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    _text(d, (8, 6), title, font=figure_font(13), width=w)
    n = len(rows)
    ticks = [(i, f"{i} {r.get('group') or ''}\nn={r.get('count', '')}") for i, r in enumerate(rows)]
    ph = (h - 26) // len(_BIN_PANELS)
    for p, (ptitle, ylabel, series) in enumerate(_BIN_PANELS):
        box = (0, 26 + p * ph, w, 26 + (p + 1) * ph)
        px, py, plot_box = _panel(img, box, ptitle, ylabel, 'teacher-energy bin, low energy (confident) left; '
                                  'group vs. the thresholds; n: samples', 0.0, 100.0, -0.5, n - 0.5, x_ticks=ticks)
        bw = (px(1) - px(0)) * 0.8 / len(series)
        for i, r in enumerate(rows):
            for j, (key, _) in enumerate(series):
                v = r.get(key)
                if v is None or not math.isfinite(float(v)):
                    continue
                x0 = px(i) - bw * len(series) / 2 + j * bw
                d.rectangle([x0, py(float(v)), x0 + bw - 1, py(0.0)], fill=SERIES_COLOURS[j])
        _legend(d, plot_box, [name for _, name in series])
    return img


def plot_energy_bins(rows: Sequence[Dict], path, title: Optional[str] = None,
                     size: Tuple[int, int] = (900, 620)) -> str:
    """Write ``render_energy_bins(rows)`` as a PNG, atomically; returns the path."""
    return _save_png(render_energy_bins(rows, title or 'Per teacher-energy bin (validation set)', size=size), path)
