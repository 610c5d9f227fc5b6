"""Overlays carry the relevance scale: a colour bar drawn in the heat map's colour map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from client.explain import class_label
from core.explain.overlay import HEAT_CMAP, render_overlay


def _has_colour(picture: np.ndarray, rgb: np.ndarray, tolerance: float = 6.0) -> bool:
    return bool((np.abs(picture - rgb).max(axis=-1) <= tolerance).any())


@pytest.mark.parametrize("depth", [1, 6])
def test_overlay_has_a_colour_bar_from_zero_to_one(tmp_path, depth):
    image = torch.rand(1, depth, 32, 32)
    relevance = torch.rand(depth, 32, 32)
    relevance /= relevance.max()
    path = render_overlay(image, relevance, tmp_path / "case.png", spacing=(3.0, 1.0, 1.0))
    with Image.open(path) as png:
        picture = np.asarray(png.convert("RGB"), dtype=np.float64)
    cmap = colormaps[HEAT_CMAP]
    top, bottom = (np.array(cmap(v)[:3]) * 255 for v in (1.0, 0.0))
    # The heat map is blended over a grey image at alpha <= 0.45, so the colour map's own
    # opaque end colours appear only in the colour bar.
    assert _has_colour(picture, top) and _has_colour(picture, bottom)
    mid = np.array(cmap(0.5)[:3]) * 255
    assert _has_colour(picture, mid)


def test_class_labels_use_the_site_names():
    names = ("no lesion", "lesion")
    assert class_label(1, names) == "lesion"
    assert class_label(torch.tensor(0), names) == "no lesion"
    assert class_label(torch.tensor([1.0, 0.0, 1.0]), ("a", "b", "c")) == "a, c"
    assert class_label(2, None) == "2"
    assert class_label(None, names) == "the predicted class"
