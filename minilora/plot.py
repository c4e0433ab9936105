"""A small line-plot-to-PNG writer (NumPy + zlib), for loss curves and benchmark figures without a
plotting dependency. Axes with tick marks, one or more series, no text rendering beyond a legend
colour key: numbers belong in the JSON log next to the picture.
"""
import struct
import zlib

import numpy as np

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
# A 3 × 5 pixel font for tick values (rows top to bottom, 3 bits each).
GLYPHS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
          "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
          "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
          "e": "000111111100111", "+": "000010111010000", " ": "000000000000000"}


def _text(img, x, y, text, scale=2, colour=(60, 60, 60)):
    """Draw ``text`` (digits, '.', '-', '+', 'e') with its top-left corner at (x, y)."""
    for i, ch in enumerate(text):
        bits = GLYPHS.get(ch, GLYPHS[" "])
        for row in range(5):
            for col in range(3):
                if bits[row * 3 + col] == "1":
                    y0, x0 = int(y + row * scale), int(x + (i * 4 + col) * scale)
                    img[max(y0, 0):y0 + scale, max(x0, 0):x0 + scale] = colour


def _label(v):
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def _png(rgb):
    """Encode an ``(H, W, 3)`` uint8 image as PNG bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(img, x0, y0, x1, y1, colour, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            ok = (ys + dy >= 0) & (ys + dy < img.shape[0]) & (xs + dx >= 0) & (xs + dx < img.shape[1])
            img[ys[ok] + dy, xs[ok] + dx] = colour


def line_plot(series, path, size=(640, 400), log_y=False):
    """Write ``{name: (x, y)}`` as a PNG line plot at ``path``; returns the axis ranges used."""
    w, h = size
    left, right, top, bottom = 70, 20, 20, 40
    img = np.full((h, w, 3), 255, dtype=np.uint8)  # (H, W, 3)
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    finite = np.isfinite(ys) & (ys > 0 if log_y else True)
    if not finite.any():
        raise ValueError("nothing finite to plot")
    tf = np.log10 if log_y else (lambda v: v)
    x_lo, x_hi = float(xs.min()), float(xs.max()) or 1.0
    y_lo, y_hi = float(tf(ys[finite]).min()), float(tf(ys[finite]).max())
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    if x_hi == x_lo:
        x_hi = x_lo + 1

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                h - bottom - (tf(y) - y_lo) / (y_hi - y_lo) * (h - top - bottom))

    grey = (120, 120, 120)
    _line(img, left, h - bottom, w - right, h - bottom, grey, 1)  # x axis
    _line(img, left, top, left, h - bottom, grey, 1)  # y axis
    for t in np.linspace(0, 1, 6):  # ticks, labelled with their values
        xt, yt = left + t * (w - left - right), h - bottom - t * (h - top - bottom)
        _line(img, xt, h - bottom, xt, h - bottom + 5, grey, 1)
        _line(img, left - 5, yt, left, yt, grey, 1)
        xv = x_lo + t * (x_hi - x_lo)
        yv = y_lo + t * (y_hi - y_lo)
        _text(img, xt - 8, h - bottom + 10, _label(xv))
        _text(img, 4, yt - 5, _label(10 ** yv if log_y else yv))
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = np.isfinite(y) & (y > 0 if log_y else True)
        pts = [px(a, b) for a, b in zip(x[keep], y[keep])]
        for (a0, b0), (a1, b1) in zip(pts, pts[1:]):
            _line(img, a0, b0, a1, b1, colour)
        img[top + 4 + 10 * i: top + 10 + 10 * i, w - right - 30: w - right - 10] = colour  # legend key
    with open(path, "wb") as f:
        f.write(_png(img))
    return {"x": (x_lo, x_hi), "y": (y_lo, y_hi), "log_y": log_y, "series": list(series)}
