"""Decoding and preprocessing images, the same way for training and inference.

Decoding accepts what users have in folders: EXIF-rotated photos, grayscale, palette, RGBA,
16-bit and float images, CMYK JPEGs; huge JPEGs are decoded at a reduced scale (bounded memory)
and other huge images are refused; truncated or non-image files raise :class:`ImageError`
with the reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"})
MAX_PIXELS = 80_000_000  # larger non-JPEG images are refused
MAX_SIDE = 4096  # huge JPEGs are decoded (DCT scaling) to about this size


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(path: str | Path) -> np.ndarray:
    """File -> (H, W, 3) uint8 RGB, upright (EXIF orientation applied)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageError(f"dangling symbolic link (to {os.readlink(path)}, which does not exist)")
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if img.format == "JPEG" and max(w, h) > MAX_SIDE:
                    img.draft("RGB", (MAX_SIDE, MAX_SIDE))
                elif w * h > MAX_PIXELS:
                    raise ImageError(f"too large ({w}x{h} pixels; the limit is {MAX_PIXELS} for non-JPEG images)")
                img.load()
                img = ImageOps.exif_transpose(img)
                return np.asarray(_to_rgb(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def resize_rgb(rgb: np.ndarray, size: tuple[int, int] | list[int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 stretched to ``size`` with PIL's bilinear filter (the
    reference's test-time resize: torchvision's Resize on a PIL image)."""
    h, w = int(size[0]), int(size[1])
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def preprocess(rgb: np.ndarray, size: tuple[int, int] | list[int], mean, std) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) float32: stretched to ``size`` (bilinear), normalised."""
    resized = resize_rgb(rgb, size).astype(np.float32) / 255.0
    normalised = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def list_images(root: str | Path) -> list[Path]:
    """Image files under a folder, recursively, sorted (deterministic). Symbolic links whose
    target is missing are listed too, so that a run names them instead of passing over them."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


def calibration_batches(folder: str | Path, manifest, limit: int = 64, log=None) -> list[np.ndarray]:
    """Preprocessed (1, 3, H, W) arrays of up to ``limit`` readable, distinct images of a folder.
    An image whose preprocessed pixels equal an earlier one's is skipped (and named to ``log``):
    a copy adds nothing to a calibration, and one that lands among the images held out to measure
    it would measure it on an image it was calibrated on."""
    import hashlib

    out, seen, copies = [], set(), []
    for path in list_images(folder):
        try:
            rgb = decode_image(path)
        except ImageError:
            continue
        array = preprocess(rgb, manifest.input.size, manifest.input.mean, manifest.input.std)[None]
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).digest()
        if digest in seen:
            copies.append(Path(path).name)
            continue
        seen.add(digest)
        out.append(array)
        if len(out) >= limit:
            break
    if copies and log is not None:
        shown = ", ".join(copies[:5]) + (f" and {len(copies) - 5} more" if len(copies) > 5 else "")
        log(f"skipped {len(copies)} image(s) of {folder} with the same pixels as an earlier one: {shown}")
    if not out:
        raise ValueError(f"no readable images in {folder} for calibration")
    return out
