"""docs/CORE.md's training-loop example runs as written (with tiny random data for the names it leaves open)."""
from pathlib import Path

import torch

DOC = (Path(__file__).resolve().parents[1] / 'docs' / 'CORE.md').read_text()


def test_core_loop_example_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    code = DOC.split('```python\n', 1)[1].split('```', 1)[0]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    env = dict(device=torch.device('cpu'), calib_loader=batches, loader_train=batches, num_epochs=1)
    exec(compile(code, 'docs/CORE.md', 'exec'), env)
    assert (tmp_path / 'thresholds.json').is_file()
    assert env['cal'].thresholds.low <= env['cal'].thresholds.high
    assert 'state_dict' in env['checkpoint'] and 'task_state' in env['checkpoint']
    # a second call reads the cache instead of running the teacher
    again = env['calibrate_or_load'](lambda x: 1 / 0, batches, rate=0.2, cache='thresholds.json',
                                     identity={'teacher': 'resnet18', 'dataset': 'cifar100'})
    assert again.from_cache and again.thresholds.low == env['cal'].thresholds.low
