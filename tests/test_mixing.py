import numpy as np
import pytest
import torch

from timm_energykd.mixing import HighEnergyMix, cutmix_box, cutmix_images, mix_targets, mixup_images


@pytest.mark.parametrize('h,w', [(32, 32), (7, 13), (224, 160)])
def test_cutmix_box_within_image_and_lam_exact(h, w):
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.7, 1.0):
        y0, y1, x0, x1, lam_adj = cutmix_box(h, w, lam, rng)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        assert lam_adj == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (h * w))
    assert cutmix_box(h, w, 1.0, rng)[-1] == 1.0


def test_cutmix_and_mixup_images_arithmetic():
    a, b = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    out = cutmix_images(a, b, (1, 3, 2, 5))
    assert out[:, :, 1:3, 2:5].eq(1).all() and out.sum() == 2 * 3 * 2 * 3
    torch.testing.assert_close(mixup_images(a, b, 0.25), torch.full_like(a, 0.75))
    t = mix_targets(torch.tensor([0, 1]), torch.tensor([2, 0]), 0.6, 3)
    torch.testing.assert_close(t, torch.tensor([[0.6, 0.0, 0.4], [0.4, 0.6, 0.0]]))


@pytest.mark.parametrize('mode', ['cutmix', 'mixup'])
def test_mixes_exactly_selected_samples(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 6, generator=g)
    x_before = x.clone()
    energy = torch.tensor([0., 5., 1., 6., 2., 7., 3., 4.])
    mix = HighEnergyMix(mode, alpha=1.0, generator=np.random.default_rng(1))
    res = mix(x, energy, high=4.0)
    assert sorted(res.index.tolist()) == [1, 3, 5]
    assert set(res.partner.tolist()) == {1, 3, 5} and (res.partner != res.index).all()
    assert torch.equal(x, x_before)  # the input batch is untouched (others stay bit-identical)
    assert res.mixed.shape == (3, 3, 6, 6)
    assert float(res.fraction) == pytest.approx(3 / 8)
    for k, (i, j) in enumerate(zip(res.index.tolist(), res.partner.tolist())):
        if mode == 'mixup':
            torch.testing.assert_close(res.mixed[k], res.lam * x[i] + (1 - res.lam) * x[j])
        else:
            from_i = (res.mixed[k] == x[i]).all(0)
            from_j = (res.mixed[k] == x[j]).all(0)
            assert (from_i | from_j).all()
            assert float(from_i.float().mean()) == pytest.approx(res.lam, abs=1e-6) or res.lam in (0.0, 1.0)


@pytest.mark.parametrize('n_high', [0, 1])
def test_zero_or_one_selected_mixes_nothing(n_high):
    x = torch.randn(4, 3, 5, 5)
    energy = torch.tensor([0., 1., 2., 10.])
    high = 5.0 if n_high == 1 else 50.0
    res = HighEnergyMix('cutmix')(x, energy, high)
    assert res.num_mixed == 0 and res.mixed.shape == (0, 3, 5, 5) and float(res.fraction) == 0.0


def test_topk_fixed_shape_highest_energies():
    x = torch.randn(10, 3, 4, 4)
    energy = torch.arange(10.)
    res = HighEnergyMix('mixup', selection='topk', rate=0.25)(x, energy, high=100.0)
    assert sorted(res.index.tolist()) == [7, 8, 9]  # ceil(0.25 * 10) = 3, threshold ignored
    with pytest.raises(ValueError, match='rate'):
        HighEnergyMix(selection='topk')
    with pytest.raises(ValueError, match='mode'):
        HighEnergyMix('cutout')
