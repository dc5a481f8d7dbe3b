"""The trainer is installed: a console command and ``python -m timm_energykd.train``; the root script is a shim."""
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_console_command_points_at_the_trainer():
    eps = {ep.name: ep.value for ep in entry_points(group='console_scripts')}
    assert eps.get('timm-energykd-train') == 'timm_energykd.train:cli'


def test_root_script_is_a_few_line_shim():
    code = [ln for ln in (REPO / 'train_energykd.py').read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith('#')]
    assert len(code) <= 10 and 'from timm_energykd.train import cli' in code


def test_module_and_shim_refuse_bad_input_in_one_line(tmp_path):
    for cmd in ([sys.executable, '-m', 'timm_energykd.train'], [sys.executable, str(REPO / 'train_energykd.py')]):
        r = subprocess.run(cmd + [str(tmp_path / 'missing'), '--device', 'cpu'], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == f'train_energykd.py: error: --data-dir: folder not found: ' \
                                                     f'{tmp_path / "missing"}'
