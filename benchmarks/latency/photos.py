"""The benchmark's images."""

from __future__ import annotations

import os
from pathlib import Path

PHOTOS_ENV = "IAM_BENCH_PHOTOS"


def demo_photos(folder: Path, count: int, size_hint: int, extra: Path | None = None) -> list[Path]:
    """``count`` real photos, written as JPEGs to ``folder``: scikit-image's sample photos, then
    the images of ``extra`` (``--photos DIR``, else the folder named by $IAM_BENCH_PHOTOS),
    cycled."""
    from PIL import Image
    from skimage import data as skdata

    from iam_runtime.images import decode_image, list_images

    folder.mkdir(parents=True, exist_ok=True)
    sources = [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    extra = extra or (Path(os.environ[PHOTOS_ENV]) if os.environ.get(PHOTOS_ENV) else None)
    if extra is not None:
        if not extra.is_dir():
            raise FileNotFoundError(f"photo folder not found: {extra}")
        sources += [decode_image(p) for p in list_images(extra)]
    paths = []
    for i in range(count):
        img = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        if max(img.size) > 2 * size_hint:
            img.thumbnail((2 * size_hint, 2 * size_hint))
        p = folder / f"photo_{i:03d}.jpg"
        img.save(p, quality=92)
        paths.append(p)
    return paths


def distinct_photos(paths: list[Path]) -> int:
    """How many of ``paths`` differ in content: ``demo_photos`` cycles its sources, so past their
    number the benchmark's images repeat (fine for timing; agreement figures count the copies again)."""
    import hashlib

    return len({hashlib.blake2b(Path(p).read_bytes(), digest_size=16).digest() for p in paths})
