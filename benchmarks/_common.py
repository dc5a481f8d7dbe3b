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
