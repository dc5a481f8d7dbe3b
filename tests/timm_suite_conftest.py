"""conftest.py for timm's own ``tests/test_models.py``, narrowed to the models this package registers.

``tests/test_timm_model_suite.py`` copies this file next to the ``tests/`` folder of timm's unpacked source
package and runs timm's tests there. It changes which models timm's tests are parametrized with and nothing
else: no test body, assertion, size limit or filter list of timm's is touched.
"""
import os

import pytest
import timm

import timm_energykd  # registers our models before pytest imports timm's test module
from timm_energykd.models.profile import package_model_names

for _module, _var in ((timm, 'TIMM_SUITE_EXPECT_TIMM'), (timm_energykd, 'TIMM_SUITE_EXPECT_PACKAGE')):
    # the runner's own imports, so these are timm's tests of the timm (and the package) under test
    if os.environ.get(_var) and os.path.realpath(_module.__file__) != os.path.realpath(os.environ[_var]):
        raise pytest.UsageError(f'{_module.__name__} imported from {_module.__file__}, expected {os.environ[_var]}')

OURS = frozenset(package_model_names())

_timm_list_models = timm.list_models


def _list_our_models(filter='', module='', *args, **kwargs):
    """timm's ``list_models`` (its filters, exclude filters, ``name_matches_cfg`` ...) restricted to our models.

    timm's test module imports ``list_models`` at import time and parametrizes each test with its result, so
    restricting it here keeps collection small (a few hundred items, not tens of thousands). A ``module``
    filter in timm's tests selects the families that implement ``forward_intermediates`` /
    ``prune_intermediate_layers`` (``FEAT_INTER_FILTERS``); every family here implements them, so ours count
    as members of any such list.
    """
    names = _timm_list_models(filter, '', *args, **kwargs)
    return [n for n in names if n.split('.')[0] in OURS]


timm.list_models = _list_our_models


def pytest_collection_modifyitems(config, items):
    # Tests parametrized with fixed timm model names (resnet18, convnext_atto, ...) or with no model at all
    # check timm's own models; they are deselected, not run.
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        name = callspec.params.get('model_name') if callspec is not None else None
        (keep if isinstance(name, str) and name.split('.')[0] in OURS else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
