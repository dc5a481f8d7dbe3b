"""timm flag parity that cannot drift: the parser is the generated table plus our flags, and no timm flag is
parsed and then ignored (each is read by the trainer or by the timm helper it hands ``args`` to, or refused)."""
import ast
import hashlib
import inspect
import os
from pathlib import Path

import pytest

import timm.data
import timm.optim
import timm.scheduler
import timm.utils
from timm_energykd.train import args as A
from timm_energykd.train import checks as C
from timm_energykd.train import gen_timm_flags, timm_flags

PKG = Path(A.__file__).resolve().parents[1]
# the modules that read the trainer's args (the trainer package and the dataset builder)
TRAINER_SOURCES = sorted((PKG / 'train').glob('*.py')) + [PKG / 'data.py']
# timm helpers the trainer hands the whole args to; whatever they read is used with timm's meaning
TIMM_HELPERS = (timm.optim.optimizer_kwargs, timm.scheduler.scheduler_kwargs, timm.data.resolve_data_config,
                timm.utils.init_distributed_device)
GENERATED = ('timm_flags.py', 'timm_help.py', 'gen_timm_flags.py', 'args.py', 'checks.py')


def _names_read(tree: ast.AST):
    """``args.X``, ``getattr(args, 'X')``, ``cfg.X``, ``args['X']`` / ``args.get('X')`` in a syntax tree."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ('args', 'cfg'):
            out.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'getattr' and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant):
            out.add(node.args[1].value)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            out.add(node.slice.value)
        elif isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'get' and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)  # e.g. keys in a `for name in ('a', 'b')` over getattr(args, name)
    return out


def _read_by_trainer():
    read = set()
    for path in TRAINER_SOURCES:
        if path.name in GENERATED:
            continue  # the parser and the refusals name every flag: they do not count as use
        read |= _names_read(ast.parse(path.read_text()))
    for fn in TIMM_HELPERS:
        read |= _names_read(ast.parse(inspect.getsource(fn).lstrip()))
    return read


def test_parser_is_generated_table_plus_ours():
    parser = A.build_parser()
    got = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    table = {f['dest']: f for f in timm_flags.FLAGS}
    ours = set(A.energykd_flag_dests())
    assert set(got) == set(table) | ours
    assert not set(table) & ours, 'our flags must not shadow a timm dest'
    for dest, f in table.items():
        a = got[dest]
        assert list(a.option_strings or [dest]) == list(f['flags']) or dest == 'data', dest
        default = f.get('default', False if f.get('action') == 'store_true' else None)
        assert a.default == default, dest
        assert a.nargs == f.get('nargs', 0 if f.get('action') == 'store_true' else None), dest
        assert (list(a.choices) if a.choices else None) == (list(f['choices']) if f.get('choices') else None), dest
        want_type = {'int': int, 'float': float, 'str': str}.get(f.get('type'))
        assert a.type is want_type, dest


def test_every_timm_flag_is_used_or_refused():
    read = _read_by_trainer()
    timm_dests = [f['dest'] for f in timm_flags.FLAGS]
    # the positional ``data`` is resolved into ``data_dir`` at parse time, as timm's train.py does
    neither = [d for d in timm_dests if d not in read | {'data'} and d not in C.UNSUPPORTED]
    assert not neither, f'timm flags parsed but neither used nor refused: {neither}'
    refused_but_read = [d for d in C.UNSUPPORTED if d in read and d not in ('torchscript', 'local_rank')]
    assert not refused_but_read, f'refused flags that the trainer reads anyway: {refused_but_read}'


@pytest.mark.parametrize('dest', sorted(C.UNSUPPORTED))
def test_each_refused_flag_stops_with_one_line(dest, tmp_path):
    parser = A.build_parser()
    action = next(a for a in parser._actions if a.dest == dest)
    if action.nargs == 0:
        argv = [action.option_strings[-1]]
    else:
        choices = [c for c in (action.choices or []) if c != action.default]
        value = choices[0] if choices else {int: '3', float: '0.5'}.get(action.type, 'x')
        argv = [action.option_strings[-1]] + [str(value)] * (2 if action.nargs in ('+', '*') else 1)
    args, _ = A.parse_args([str(tmp_path)] + argv)
    flag = '--' + dest.replace('_', '-')
    with pytest.raises(ValueError, match=f'^{flag} is not supported') as e:
        C.validate_args(args)
    assert '\n' not in str(e.value)


def test_table_records_its_source():
    assert timm_flags.SOURCE['repo'] == 'huggingface/pytorch-image-models'
    assert len(timm_flags.SOURCE['commit']) == 40 and len(timm_flags.SOURCE['sha256']) == 64
    # 171 option flags and the positional data dir at the recorded commit
    assert len(timm_flags.FLAGS) == 172


def test_regenerating_from_the_recorded_source_changes_nothing():
    """Needs timm's train.py at the recorded commit: TIMM_TRAIN_PY=path (git show COMMIT:train.py)."""
    path = os.environ.get('TIMM_TRAIN_PY')
    if not path or not os.path.isfile(path):
        pytest.skip('set TIMM_TRAIN_PY to timm train.py at commit ' + timm_flags.SOURCE['commit'])
    raw = Path(path).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == timm_flags.SOURCE['sha256'], 'not the recorded train.py'
    text = gen_timm_flags.render(gen_timm_flags.parse_train_py(raw.decode()), timm_flags.SOURCE)
    assert text == Path(timm_flags.__file__).read_text()


def test_flags_doc_lists_every_refused_flag_with_its_reason():
    doc = (PKG.parent / 'docs' / 'FLAGS.md').read_text()
    rows = [ln for ln in doc.splitlines() if ln.startswith('| `--')]
    for dest, reason in C.UNSUPPORTED.items():
        flag = '`--' + dest.replace('_', '-') + '`'
        assert any(flag in row and row.rstrip().endswith(f'| {reason} |') for row in rows), dest
    assert timm_flags.SOURCE['commit'] in doc


def test_newer_timm_keys_load_when_off_and_are_refused_when_on(tmp_path, capsys):
    import yaml
    off = tmp_path / 'off.yaml'
    off.write_text(yaml.safe_dump(dict(lr=0.5, stop_epoch=None, pretrained_cfg_overlay={})))
    args, _ = A.parse_args(['--config', str(off), str(tmp_path)])
    assert args.lr == 0.5 and not hasattr(args, 'stop_epoch')
    on = tmp_path / 'on.yaml'
    on.write_text(yaml.safe_dump(dict(stop_epoch=3)))
    with pytest.raises(SystemExit):
        A.parse_args(['--config', str(on), str(tmp_path)])
    assert "key 'stop_epoch' is a timm train.py flag newer than the source" in capsys.readouterr().err
