import torch
from PIL import Image

from timm_energykd.energy import EnergyThresholds
from timm_energykd.plots import _HIGH_COLOUR, _LOW_COLOUR, plot_energy_histogram, render_energy_histogram


def test_histogram_png_marks_thresholds(tmp_path):
    e = torch.randn(2000, generator=torch.Generator().manual_seed(0)) - 8.0
    th = EnergyThresholds.from_energies(e, 0.2)
    path = plot_energy_histogram(th, tmp_path / 'energy.png')
    img = Image.open(path).convert('RGB')
    assert img.size == (720, 420)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert _LOW_COLOUR in colours and _HIGH_COLOUR in colours
    # the same works from the JSON dict form
    plot_energy_histogram(th.to_dict(), tmp_path / 'energy2.png')


def test_bar_colours_follow_thresholds():
    img = render_energy_histogram([1, 1, 1, 1], [0, 1, 2, 3, 4], low=1.0, high=3.0, size=(400, 200))
    # bar centres: 0.5 (low), 1.5 and 2.5 (mid), 3.5 (high); sample pixels near the bottom of each bar
    px = lambda v: img.getpixel((int(60 + v / 4 * (400 - 80)), 200 - 60 - 5))  # noqa: E731
    assert px(0.5) == _LOW_COLOUR and px(3.5) == _HIGH_COLOUR and px(2.0) == (150, 150, 150)
