"""Energy diagnostics figures, drawn with Pillow only (no matplotlib).

    from timm_energykd.plots import plot_energy_histogram
    plot_energy_histogram(thresholds, 'output/train/run/energy_hist.png')

The histogram of teacher energies ``E(x) = -T_E * logsumexp(f(x) / T_E)`` over the calibration set, with
the low threshold (``E <= low``: low-energy, confident samples) and the high threshold (``E > high``:
high-energy, uncertain samples) drawn as vertical lines and the three groups shaded.
"""
import io
from typing import Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from .files import write_atomic

__all__ = ['plot_energy_histogram', 'render_energy_histogram']

_LOW_COLOUR = (31, 119, 180)
_MID_COLOUR = (150, 150, 150)
_HIGH_COLOUR = (214, 39, 40)


def _fmt(v: float) -> str:
    return f'{v:.3g}'


def render_energy_histogram(
        counts: Sequence[float],
        edges: Sequence[float],
        low: Optional[float] = None,
        high: Optional[float] = None,
        title: str = 'Teacher energy',
        size: Tuple[int, int] = (720, 420),
) -> Image.Image:
    """Draw a histogram (``len(edges) == len(counts) + 1``) with the thresholds marked; returns a PIL image.

    Bars left of ``low`` are blue (low energy), right of ``high`` red (high energy), others grey.
    """
    counts = [float(c) for c in counts]
    edges = [float(e) for e in edges]
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(f'histogram needs len(edges) == len(counts) + 1 > 1, got {len(edges)} edges and '
                         f'{len(counts)} counts')
    w, h = size
    left, right, top, bottom = 60, 20, 40, 60
    pw, ph = w - left - right, h - top - bottom
    img = Image.new('RGB', size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    cmax = max(counts) or 1.0

    def x_of(v: float) -> float:
        return left + (v - lo) / span * pw

    for c, e0, e1 in zip(counts, edges[:-1], edges[1:]):
        mid = 0.5 * (e0 + e1)
        colour = _MID_COLOUR
        if low is not None and mid <= low:
            colour = _LOW_COLOUR
        elif high is not None and mid > high:
            colour = _HIGH_COLOUR
        x0, x1 = x_of(e0), x_of(e1)
        y0 = top + ph * (1 - c / cmax)
        if c > 0:
            d.rectangle([x0, y0, max(x0 + 1, x1 - 1), top + ph], fill=colour)

    # axes and ticks
    d.line([left, top + ph, left + pw, top + ph], fill=(0, 0, 0))
    d.line([left, top, left, top + ph], fill=(0, 0, 0))
    for i in range(5):
        v = lo + span * i / 4
        x = x_of(v)
        d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
        d.text((x - 12, top + ph + 6), _fmt(v), fill=(0, 0, 0), font=font)
    d.text((left - 50, top - 4), _fmt(cmax), fill=(0, 0, 0), font=font)
    d.text((left - 14, top + ph - 6), '0', fill=(0, 0, 0), font=font)
    d.text((left + pw // 2 - 60, h - 22), 'energy E(x) (lower = more confident)', fill=(0, 0, 0), font=font)
    d.text((left, 10), title, fill=(0, 0, 0), font=font)

    for v, colour, name in ((low, _LOW_COLOUR, 'low'), (high, _HIGH_COLOUR, 'high')):
        if v is None:
            continue
        x = x_of(min(max(v, lo), hi))
        for y in range(top, top + ph, 6):  # dashed line
            d.line([x, y, x, min(y + 3, top + ph)], fill=colour, width=2)
        # labels in the margin above the plot (over the bars they would be hidden by the same colour):
        # 'low' ends left of its line, 'high' starts right of its line, so they never overlap
        label = f'{name} = {_fmt(v)}'
        lx = x - d.textlength(label, font=font) - 3 if name == 'low' else x + 3
        d.text((lx, top - 14), label, fill=colour, font=font)
    return img


def plot_energy_histogram(thresholds, path, title: Optional[str] = None, size: Tuple[int, int] = (720, 420)) -> str:
    """Write the energy histogram of an ``EnergyThresholds`` (or its ``to_dict()``) as a PNG, atomically.

    Returns the path written.
    """
    get = thresholds.get if isinstance(thresholds, dict) else (lambda k: getattr(thresholds, k))
    hist = get('histogram') or {}
    if not hist.get('counts'):
        raise ValueError('plot_energy_histogram: the thresholds hold no histogram (calibrate with the dataset mode)')
    if title is None:
        n, rate, t_e = get('num_samples'), get('rate'), get('energy_temperature')
        title = f'Teacher energy over {n} samples (r = {rate}, T_E = {t_e})'
    img = render_energy_histogram(hist['counts'], hist['edges'], get('low'), get('high'), title=title, size=size)
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    write_atomic(path, buf.getvalue())
    return str(path)
