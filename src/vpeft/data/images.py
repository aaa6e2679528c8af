"""Reading images safely: every PIL mode to 8-bit RGB by a fixed rule, and an up-front decode check of a split.

``Image.convert("RGB")`` clips 16-bit and float images instead of scaling them (a 16-bit PNG becomes 0 or 255
everywhere), so :func:`to_rgb` scales by the range of the image's *mode*, the same for every image of a dataset:

=============================  ==========================================================================
mode                           rule
=============================  ==========================================================================
``RGB``                        unchanged
``1``, ``L``, ``P``, ``CMYK``,  ``convert("RGB")`` (alpha is dropped)
``RGBA``, ``LA``, ``PA``,
``YCbCr``, ``La``, ``RGBa``
``I;16``, ``I;16L/B/N``        16-bit: ``round(v / 257)`` (65535 -> 255)
``I`` (32-bit int)             values must lie in [0, 65535] and are scaled as 16-bit; others: DataError
``F`` (32-bit float)           values in [0, 1] are scaled by 255; otherwise values in [0, 255] are taken
                               as 8-bit levels; NaN/inf or values outside [0, 255]: DataError
anything else (``LAB``, ...)   DataError naming the mode
=============================  ==========================================================================

:func:`check_images` opens, verifies and decodes every file of a split once per process (cached by path, size
and modification time), so a truncated or unreadable image fails when the dataset is built, not mid-epoch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.errors import DataError

__all__ = ["CONVERTIBLE_MODES", "check_images", "open_rgb", "to_rgb"]

_PLAIN = ("RGB", "1", "L", "P", "CMYK", "RGBA", "LA", "PA", "YCbCr", "La", "RGBa", "RGBX")
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")
CONVERTIBLE_MODES: tuple[str, ...] = _PLAIN + _SIXTEEN + ("I", "F")
"""PIL modes :func:`to_rgb` reads."""

_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _gray_to_rgb(levels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Convert ``img`` to 8-bit RGB by the rule of its mode (module docstring); ``where`` names it in errors.

    Raises:
        DataError: A mode without a rule, or values outside the mode's documented range.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _PLAIN:
        return img.convert("RGB")
    if mode in _SIXTEEN:
        return _gray_to_rgb(np.asarray(img, dtype=np.float64) / 257.0)
    if mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(
                f"{where}: 32-bit integer image (mode I) with values in [{a.min()}, {a.max()}]; vpeft reads mode I "
                "as 16-bit levels in [0, 65535]: convert it to an 8- or 16-bit image"
            )
        return _gray_to_rgb(a / 257.0)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise DataError(f"{where}: float image (mode F) holds NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return _gray_to_rgb(a * 255.0)
        if lo >= 0.0 and hi <= 255.0:
            return _gray_to_rgb(a)
        raise DataError(
            f"{where}: float image (mode F) with values in [{lo:g}, {hi:g}]; vpeft reads float images as "
            "intensities in [0, 1] (or 8-bit levels in [0, 255])"
        )
    raise DataError(f"{where}: unsupported image mode {mode!r}; supported modes: {', '.join(CONVERTIBLE_MODES)}")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, decode and convert one image file to RGB; any failure is a DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, f"image {path}")
    except _READ_ERRORS as exc:
        raise DataError(f"image {path} cannot be read ({type(exc).__name__}: {exc})") from None


_checked: dict[tuple[str, int, int], str | None] = {}
_lock = threading.Lock()


def _check_one(path: Path) -> str | None:
    """``None`` if ``path`` decodes (and its mode has a rule), else why not."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _checked:
            return _checked[key]
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums (PNG CRCs) without decoding
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))  # decode at reduced scale: all data is still read
            img.load()
            why = None if img.mode in CONVERTIBLE_MODES else f"unsupported image mode {img.mode!r}"
    except _READ_ERRORS as exc:
        why = f"{type(exc).__name__}: {exc}"
    with _lock:
        _checked[key] = why
    return why


def check_images(paths: Iterable[str | os.PathLike], what: str = "split") -> None:
    """Decode-check every image once per process (cached); raise one DataError listing the bad files.

    Raises:
        DataError: Some files are missing, truncated, not images, or of a mode without a conversion rule.
    """
    bad = []
    for p in paths:
        why = _check_one(Path(p))
        if why is not None:
            bad.append(f"{p} ({why})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable image(s) in {what}: {'; '.join(bad[:3])}{more}")
