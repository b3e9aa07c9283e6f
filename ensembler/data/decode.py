"""Image decoding that fails loudly: :func:`decode_image` and :func:`verify_images`.

A missing, corrupt or truncated file, or one over Pillow's decompression-bomb limit, raises
:class:`~ensembler.errors.ImageDecodeError` naming it. Every image becomes RGB (EXIF
orientation applied, transparency composited over white, 16-bit greyscale scaled to 8 bits).
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ImageDecodeError


def decode_image(path: str | os.PathLike):
    """Open an image fully and return it as an RGB ``PIL.Image``.

    - ``load()`` runs now, so a truncated or corrupt file fails here, never later in a batch;
      Pillow's ``LOAD_TRUNCATED_IMAGES`` is left False and ``MAX_IMAGE_PIXELS`` untouched: an
      image over the decompression-bomb limit (warning or error in Pillow) is refused.
      Every failure is an :class:`ImageDecodeError` naming the file.
    - EXIF orientation is applied (``ImageOps.exif_transpose``), so phone photos stand upright
      as they are displayed.
    - Modes become RGB: L/1/P/CMYK/YCbCr via ``convert`` (CMYK without colour management);
      16-bit and 32-bit integer / float greyscale are scaled to 8 bits (``I;16``: /257;
      ``I``: treated as 16-bit when any value exceeds 255; ``F``: 0..1 scaled by 255, 0..255
      kept, 0..65535 /257, anything else (NaN, negative) refused naming the file); images with transparency
      (RGBA, LA, PA, P with a transparent colour) are composited over **white**.

    Examples
    --------
    >>> img = decode_image("data/train/images/000001_female_Asian_45/mask1.jpg")  # doctest: +SKIP
    >>> img.mode  # doctest: +SKIP
    'RGB'
    >>> decode_image("gone.jpg")  # doctest: +SKIP
    Traceback (most recent call last):
    ensembler.errors.ImageDecodeError: cannot decode image gone.jpg: file not found
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as src:
            _refuse_bomb(src, p)
            src.load()
            img = src
            if _exif_orientation(src) not in (1, None):
                img = ImageOps.exif_transpose(src)
            return _to_rgb(img, p)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(p, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(p, f"refused by Pillow's decompression-bomb guard ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(p, "not a recognised image (corrupt, or not an image file)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageDecodeError(p, reason) from None


def _refuse_bomb(img, path: Path) -> None:
    """Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; refuse those too."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        w, h = img.size
        if w * h > limit:
            raise ImageDecodeError(
                path, f"{w}x{h} = {w * h} pixels exceeds Pillow's decompression-bomb limit of {limit} pixels"
            )


def _exif_orientation(img) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return None


def _to_rgb(img, path="image"):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = _float_to_8bit(arr, path)
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _float_to_8bit(arr: np.ndarray, path) -> np.ndarray:
    """A 32-bit float image (TIFF mode F) on the 0..255 scale. Values in 0..1 (the common
    convention) are scaled by 255, values up to 255 are kept, up to 65535 divided by 257; NaN,
    infinity, negative values or larger ones have no agreed meaning and are refused."""
    if arr.size == 0:
        return arr
    if not np.isfinite(arr).all():
        raise ImageDecodeError(path, "a 32-bit float image with NaN or infinite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 65535:
        raise ImageDecodeError(path, f"a 32-bit float image with values {lo:g}..{hi:g}; only 0..1, 0..255 or "
                                     "0..65535 have a known meaning: convert it to 8-bit first")
    if hi <= 1.0:
        return arr * 255.0
    return arr / 257.0 if hi > 255 else arr


def verify_images(paths: Iterable[str], workers: int | None = None, progress=None, *,
                  decode=None) -> list[tuple[str, str]]:
    """Decode every file; return ``[(path, reason), ...]`` for the ones that fail (in order).

    Parameters
    ----------
    paths : iterable of str
    workers : int, optional
        Decoding threads (default ``min(8, cpu count)``).
    progress : callable, optional
        Called once per file.
    decode : callable, optional
        The decoder (default :func:`decode_image`); it raises :class:`ImageDecodeError`.
    """
    decode = decode or decode_image
    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)

    def one(p):
        try:
            decode(p)
            return None
        except ImageDecodeError as exc:
            return (exc.path, exc.reason)

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(one, paths):
            if res is not None:
                failures.append(res)
            if progress is not None:
                progress()
    return failures
