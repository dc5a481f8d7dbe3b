"""Helpers shared by the benchmark scripts: environment facts, statistics, atomic writes, markdown tables.

Kept free of anything specific to one benchmark so both scripts report their machine the same way.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

# The benchmarks run from a checkout without `pip install`, like the tests.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def core_available() -> Optional[str]:
    """None when timm_energykd's task/energy/temperature/mixing modules import, else the import error."""
    try:
        import timm_energykd.task  # noqa: F401
        import timm_energykd.energy  # noqa: F401
        import timm_energykd.temperature  # noqa: F401
        import timm_energykd.mixing  # noqa: F401
    except Exception as e:  # ImportError, or an error inside a half-landed module
        return f'{type(e).__name__}: {e}'
    return None


def machine_info() -> Dict[str, Any]:
    """What ran the benchmark: versions, device name, CPU count, UTC time."""
    import torch
    import timm
    info = {
        'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'platform': platform.platform(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'cuda': torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info['device_name'] = torch.cuda.get_device_name()
        info['cuda_version'] = torch.version.cuda
    else:
        info['device_name'] = f'CPU ({os.cpu_count()} cores)'
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    if not values:
        return float('nan'), float('nan')
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def write_text_atomic(path: os.PathLike, text: str) -> None:
    """Write a file via a temp file in the same folder + os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed as given (format numbers before)."""
    lines = ['| ' + ' | '.join(str(h) for h in header) + ' |',
             '|' + '|'.join('---' for _ in header) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
    return '\n'.join(lines)


def command_line(argv: Optional[List[str]] = None, script: str = '') -> str:
    """The command as typed, for the record."""
    argv = sys.argv[1:] if argv is None else argv
    return ' '.join(['python', script or sys.argv[0]] + [str(a) for a in argv])


def hbar_png(labels: Sequence[str], values: Sequence[float], path: os.PathLike, title: str,
             value_fmt: str = '{:.2f}', errors: Optional[Sequence[float]] = None, axis_min: float = 0.0,
             axis_note: str = '', grey: Sequence[str] = (), value_labels: Optional[Sequence[str]] = None) -> None:
    """A small horizontal bar chart drawn with Pillow (no matplotlib): one bar per label, value at the end,
    an optional +-error whisker, bars starting at ``axis_min``."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    label_w, bar_w, row_h, top, right = 170, 420, 26, 40, 160
    width = max(label_w + bar_w + right, 12 + int(font.getlength(title)) if hasattr(font, 'getlength') else 0)
    height = top + row_h * max(len(values), 1) + 30
    img = Image.new('RGB', (width, height), 'white')
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill='black', font=font)
    errors = list(errors) if errors is not None else [0.0] * len(values)
    hi = max([v + e for v, e in zip(values, errors)] or [1.0])
    scale = bar_w / max(hi - axis_min, 1e-9)
    for i, (label, v, e) in enumerate(zip(labels, values, errors)):
        y = top + i * row_h
        d.text((10, y + 5), str(label), fill='black', font=font)
        x_end = label_w + (v - axis_min) * scale
        colour = (150, 150, 150) if label in grey else (70, 110, 180)
        d.rectangle([label_w, y + 4, max(label_w + 1, x_end), y + row_h - 4], fill=colour)
        if e > 0:
            xl, xr, ym = label_w + (v - e - axis_min) * scale, label_w + (v + e - axis_min) * scale, y + row_h // 2
            d.line([xl, ym, xr, ym], fill='black')
            d.line([xl, ym - 4, xl, ym + 4], fill='black')
            d.line([xr, ym - 4, xr, ym + 4], fill='black')
        text = value_labels[i] if value_labels is not None else value_fmt.format(v)
        d.text((label_w + bar_w + 8, y + 5), text, fill='black', font=font)
    if axis_note:
        d.text((label_w, height - 22), axis_note, fill=(90, 90, 90), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
