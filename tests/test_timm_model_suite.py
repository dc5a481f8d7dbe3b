"""timm's own ``tests/test_models.py``, of the installed timm release, passes on every model this package registers.

The test file comes from timm's source package of exactly the installed version (``pip download --no-binary``),
cached per version in pytest's cache folder. It runs in a pytest subprocess whose conftest
(``tests/timm_suite_conftest.py``) narrows the model selection to our models; timm's tests, assertions and
filters are used unchanged. Skipped, with the reason, when the source package cannot be fetched.

Which of timm's tests: those timm's own CI runs, i.e. the ones carrying a marker declared in timm's
``pyproject.toml`` (its test file says so in its docstring). That keeps this under ~2 minutes on 2 cores.
``TIMM_SUITE_ALL=1`` also runs the unmarked ones (1.0.31: ``test_model_forward_fx_torchscript`` and the slow
``test_prune_intermediate_layers_contract``).
"""
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import timm

import timm_energykd
from timm_energykd.models.profile import package_model_names

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE_CONFTEST = Path(__file__).with_name('timm_suite_conftest.py')

# The two tests that failed on every model before issue 14; they must run (not skip) on all of them.
REQUIRED_TESTS = ('test_model_default_cfgs', 'test_model_forward_torchscript')


def _fetch_timm_tests(version: str, root: Path) -> Path:
    """``root/timm-<version>`` with timm's ``tests/`` and ``pyproject.toml`` (its pytest markers), no ``timm/``:
    the subprocess must import the installed timm, not a source copy."""
    src = root / f'timm-{version}'
    done = src / '.complete'
    if done.is_file():
        return src
    download = root / 'download'
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-q',
         f'timm=={version}', '-d', str(download)],
        capture_output=True, text=True, timeout=600)
    sdists = sorted(download.glob(f'timm-{version}.tar.gz'))
    if proc.returncode != 0 or not sdists:
        reason = (proc.stderr.strip().splitlines() or [f'pip exited with {proc.returncode}'])[-1]
        pytest.skip(f"timm {version}'s source package could not be fetched: {reason}")
    prefix = f'timm-{version}/'
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + 'tests/') or m.name == prefix + 'pyproject.toml']
        if hasattr(tarfile, 'data_filter'):
            tar.extractall(root, members=members, filter='data')
        else:  # Python < 3.11.4 / 3.10.12
            tar.extractall(root, members=members)
    if not (src / 'tests' / 'test_models.py').is_file():
        pytest.skip(f"timm {version}'s source package has no tests/test_models.py")
    done.touch()
    return src


@pytest.fixture(scope='session')
def timm_test_dir(request, tmp_path_factory):
    version = timm.__version__
    cache = getattr(request.config, 'cache', None)  # absent with -p no:cacheprovider
    root = Path(cache.mkdir(f'timm-src-{version}')) if cache is not None else tmp_path_factory.mktemp('timm-src')
    return _fetch_timm_tests(version, root)


def _ci_marker_expression(timm_test_dir: Path) -> str:
    """``-m`` expression for the tests timm's CI runs: any marker its pyproject declares ("name: description")."""
    text = (timm_test_dir / 'pyproject.toml').read_text()
    block = re.search(r'^markers\s*=\s*\[(.*?)\]', text, re.M | re.S)
    names = re.findall(r'["\'](\w+):', block.group(1)) if block else []
    assert names, "no pytest markers found in timm's pyproject.toml"
    return ' or '.join(names)


def _outcomes(junit_xml: Path):
    """{(test function, model name): 'passed' | 'failed' | 'skipped'} from pytest's JUnit XML report."""
    out = {}
    for case in ET.parse(junit_xml).iter('testcase'):
        name = case.get('name')
        func, _, params = name.partition('[')
        model = params.rstrip(']').split('-')[-1]
        kinds = {child.tag for child in case}
        out[func, model] = ('failed' if kinds & {'failure', 'error'} else
                            'skipped' if 'skipped' in kinds else 'passed')
    return out


@pytest.mark.slow
def test_timm_own_model_tests_pass_on_every_registered_model(timm_test_dir, tmp_path):
    (timm_test_dir / 'conftest.py').write_text(SUITE_CONFTEST.read_text())
    env = dict(os.environ)
    # our checkout first (not an installed copy of the package), then whatever selected this timm
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.setdefault('OMP_NUM_THREADS', '1')  # batch-1 tiny models: one thread is fastest on a shared CPU
    # the conftest refuses to run if the subprocess imports another timm or timm_energykd than this process
    env['TIMM_SUITE_EXPECT_TIMM'] = timm.__file__
    env['TIMM_SUITE_EXPECT_PACKAGE'] = timm_energykd.__file__
    report = tmp_path / 'report.xml'

    select = [] if os.environ.get('TIMM_SUITE_ALL') == '1' else ['-m', _ci_marker_expression(timm_test_dir)]
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', 'tests/test_models.py', '-q', '-p', 'no:cacheprovider', *select,
         '-W', 'ignore::pytest.PytestUnknownMarkWarning',  # timm's @pytest.mark.timeout without pytest-timeout
         f'--junitxml={report}', '-o', 'junit_family=xunit2'],
        cwd=timm_test_dir, env=env, capture_output=True, text=True, timeout=900)
    tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
    assert proc.returncode == 0, f'timm {timm.__version__} tests/test_models.py failed:\n{tail}'

    outcomes = _outcomes(report)
    ours = set(package_model_names())
    assert {model for _, model in outcomes} == ours, tail
    assert not [k for k, v in outcomes.items() if v == 'failed'], tail
    for func in REQUIRED_TESTS:
        passed = {model for (f, model), v in outcomes.items() if f == func and v == 'passed'}
        assert passed == ours, f'{func} did not pass on {sorted(ours - passed)}:\n{tail}'
    print(f'\ntimm {timm.__version__} tests/test_models.py on {len(ours)} models: '
          f'{sum(v == "passed" for v in outcomes.values())} passed, '
          f'{sum(v == "skipped" for v in outcomes.values())} skipped, '
          f'{len({f for f, _ in outcomes})} test functions; {proc.stdout.strip().splitlines()[-1]}')
