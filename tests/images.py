"""Checks of the timeline PNG that ``python -m syncdeco plot`` draws, by
decoding it: a header alone says nothing of what was drawn."""

from __future__ import annotations

from pathlib import Path

from syncdeco._trace import _BODY, _FAILED, _OTHERS, _PALETTE


def _rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


# The bar colours of syncdeco._trace.plot: in a decorated function, waiting
# at each sync point (one colour each, and one for the rest), a failure.
BARS_RGB = tuple(_rgb(c) for c in (_BODY, *_PALETTE, _OTHERS, _FAILED))


def assert_timeline_png(path: Path, ranks: int) -> None:
    """``path`` decodes as a timeline of ``ranks`` rows: a wide image, not
    blank, whose axes hold one horizontal band of bars for each rank."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(path)  # raises unless it decodes as a PNG
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    height, width = image.shape[:2]
    # 11 inches at 110 dpi, cropped to what was drawn; one row per rank
    assert 800 <= width <= 1600 and 100 <= height < width, (width, height)
    rgb = np.rint(image[..., :3] * 255).astype(int)
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colours > 10, f"{colours} distinct colours: a blank image"
    drawn = float((rgb != 255).any(axis=-1).mean())
    assert 0.05 < drawn < 0.95, f"{drawn:.1%} of the pixels are not white background"
    bars = np.zeros((height, width), dtype=bool)
    for colour in BARS_RGB:
        bars |= np.abs(rgb - np.array(colour)).sum(axis=-1) <= 6
    assert bars.mean() > 0.02, f"bars cover only {bars.mean():.2%} of the image"
    # The axes' top and bottom edges are the only dark lines across most of
    # the width; between them, bars (the legend's patches lie below).
    dark = rgb.sum(axis=-1) < 3 * 80
    edges = np.flatnonzero(dark.sum(axis=1) > width // 2)
    assert len(edges) >= 2, "no axes found"
    inside = bars[edges.min() + 1 : edges.max()]
    rows = (inside.sum(axis=1) >= 3).astype(int)
    bands = int(rows[0]) + int((np.diff(rows) == 1).sum())  # runs of rows with bars
    assert bands == ranks, f"{bands} bands of bars in the axes for {ranks} ranks"
