"""Sample-grid drawing: plain grids as torchvision writes them, labelled grids upscaled and legible."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from diffdistill.utils.images import _fit_font, grid_image, save_grid, save_side_by_side, side_by_side_image


def _images(n=8, c=1, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_save_grid_matches_torchvision(tmp_path):
    x = _images(12, 3)
    save_grid(x, tmp_path / "ours.png", nrow=4)
    save_image((x + 1) / 2, tmp_path / "tv.png", nrow=4, padding=1, pad_value=1.0)
    assert np.array_equal(_rgb(tmp_path / "ours.png"), _rgb(tmp_path / "tv.png"))


def test_plain_side_by_side_is_the_grids_with_a_gap(tmp_path):
    a, b = _images(seed=1), _images(seed=2)
    out = _rgb(save_side_by_side([a, b], tmp_path / "s.png", nrow=4, gap=4))
    g = make_grid((a + 1) / 2, nrow=4, padding=1, pad_value=1.0)
    h, w = g.shape[1:]
    assert out.shape == (h, 2 * w + 4, 3)
    assert np.array_equal(out[:, :w], np.asarray(grid_image(a, nrow=4)))
    assert np.array_equal(out[:, w + 4 :], np.asarray(grid_image(b, nrow=4)))
    assert (out[:, w : w + 4] == 255).all()


def test_labelled_grid_is_upscaled_and_carries_its_headers():
    a, b = _images(8, 1, 8, 8, seed=3), _images(8, 1, 8, 8, seed=4)
    labels = ["teacher: Heun 18 steps (35 NFE)", "student (EMA 0.999): 1 step (1 NFE)"]
    img = np.asarray(side_by_side_image([a, b], labels, title="dmd: training step 200", nrow=8, gap=16))
    base = np.asarray(grid_image(a, nrow=8))  # 8 cells of 8 px + padding = 73 px
    k = -(-512 // base.shape[1])  # smallest integer scale reaching 512 px
    up = np.asarray(grid_image(a, nrow=8, scale=k))
    assert up.shape[1] >= 512 and np.array_equal(up[::k, ::k], base)  # nearest neighbour: blocks of one pixel
    # the panels sit at the bottom, below the title and header rows, with the 16 px margins
    ph, pw = up.shape[:2]
    assert img.shape[1] == 2 * pw + 3 * 16
    top = img.shape[0] - 16 - ph
    assert np.array_equal(img[top : top + ph, 16 : 16 + pw], up)
    # text above each panel (dark pixels), nothing but white in the margins
    for x0 in (16, 16 + pw + 16):
        assert (img[16:top, x0 : x0 + pw] < 100).any()
    assert (img[:16] == 255).all() and (img[:, :16] == 255).all()


def test_a_long_label_shrinks_to_fit_its_panel():
    from PIL import features

    if not features.check("freetype2"):
        pytest.skip("Pillow without FreeType: one fixed-size bitmap font")
    label = "student (EMA 0.9999): 4 steps (4 NFE), longer than its panel"
    assert _fit_font(label, 10_000, 24).size == 24
    font = _fit_font(label, 400, 24)
    assert 8 < font.size < 24 and font.getlength(label) <= 400


def test_label_count_must_match_panels():
    with pytest.raises(ValueError, match="2 labels for 1 panels"):
        side_by_side_image([_images()], ["a", "b"])
