import pytest
import torch

from timm_energykd.temperature import GradedTemperature, TwoBinTemperature, create_temperature_policy


def test_two_bin_paper_direction_low_energy_gets_higher_t():
    pol = TwoBinTemperature()
    e = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])
    t = pol(e, low=-5.0, high=5.0)
    assert t.tolist() == [6.0, 6.0, 4.0, 4.0, 2.0]  # E<=low -> 6 ; E>high -> 2
    assert t.dtype == torch.float32


def test_two_bin_reverse_flips_and_tensor_thresholds():
    pol = TwoBinTemperature(direction='reverse')
    e = torch.tensor([-10.0, 0.0, 10.0])
    assert pol(e, torch.tensor(-5.0), torch.tensor(5.0)).tolist() == [2.0, 4.0, 6.0]


def test_two_bin_explicit_and_validation():
    pol = TwoBinTemperature(base=3.0, low_temperature=7.0, high_temperature=1.0)
    assert pol(torch.tensor([-1.0, 0.0, 1.0]), -1.0, 0.5).tolist() == [7.0, 3.0, 1.0]
    with pytest.raises(ValueError, match='delta_high'):
        TwoBinTemperature(base=2.0, delta_high=-2.0)
    with pytest.raises(ValueError, match='low_temperature'):
        TwoBinTemperature(low_temperature=0.0)
    with pytest.raises(ValueError, match='direction'):
        TwoBinTemperature(direction='up')


def test_gradation_bins_and_direction():
    pol = GradedTemperature(2.0, 6.0, num_bins=5)
    edges = torch.tensor([1.0, 2.0, 3.0, 4.0])
    e = torch.tensor([0.0, 1.0, 1.5, 2.5, 3.5, 4.0, 9.0])
    # bins: <=1 ->0, (1,2] ->1, (2,3] ->2, (3,4] ->3, >4 ->4 ; paper: bin0 -> 6 ... bin4 -> 2
    assert pol(e, 1.0, 4.0, edges).tolist() == [6.0, 6.0, 5.0, 4.0, 3.0, 3.0, 2.0]
    rev = GradedTemperature(2.0, 6.0, num_bins=5, direction='reverse')
    assert rev(e, 1.0, 4.0, edges).tolist() == [2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 6.0]
    with pytest.raises(ValueError, match='bin_edges'):
        pol(e, 1.0, 4.0, torch.tensor([1.0, 2.0]))
    for kw in (dict(num_bins=1), dict(t_min=0.0), dict(t_min=7.0)):
        with pytest.raises(ValueError):
            GradedTemperature(**kw)


def test_factory():
    assert isinstance(create_temperature_policy('two_bin', base=4.0), TwoBinTemperature)
    assert isinstance(create_temperature_policy('gradation', num_bins=3), GradedTemperature)
    with pytest.raises(ValueError, match='unknown temperature policy'):
        create_temperature_policy('nope')
