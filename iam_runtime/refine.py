"""From instance activation maps to masks (SPEC section 4): a 2-label dense CRF per instance
over the original image (unary -log([1 - p, p]), Gaussian and bilateral pairwise terms), or a
plain threshold. Pure numpy + pydensecrf: runs in worker processes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .bundle import CRFSpec


def resize_map(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) bilinear."""
    h, w = size
    if prob.shape == (h, w):
        return prob.astype(np.float32)
    return np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def dense_crf(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec, max_side: int = 0) -> np.ndarray:
    """rgb: (H, W, 3) uint8; prob: (H, W) foreground probability -> (H, W) bool mask.

    ``max_side`` > 0 runs the CRF on the image scaled so that its longer side is at most that
    (spatial kernel widths scaled alike) and brings the label probabilities back bilinearly: the
    mean-field cost falls with the pixel count, the result stays close (see benchmarks)."""
    import pydensecrf.densecrf as dcrf

    full = prob.shape
    scale = min(1.0, max_side / max(full)) if max_side else 1.0
    if scale < 1.0:
        small = (max(1, round(full[0] * scale)), max(1, round(full[1] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize((small[1], small[0]), Image.BILINEAR))
        prob = resize_map(prob, small)
    h, w = prob.shape
    p = np.clip(prob, 1e-5, 1 - 1e-5).astype(np.float32)
    unary = -np.log(np.stack([1 - p, p]).reshape(2, -1))
    model = dcrf.DenseCRF2D(w, h, 2)
    model.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    model.addPairwiseGaussian(sxy=max(crf.gaussian_sxy * scale, 0.5), compat=crf.gaussian_compat)
    model.addPairwiseBilateral(sxy=crf.bilateral_sxy * scale, srgb=crf.bilateral_srgb,
                               rgbim=np.require(rgb, np.uint8, ["C", "W"]), compat=crf.bilateral_compat)
    q = np.asarray(model.inference(crf.iterations)).reshape(2, h, w)
    if scale < 1.0:
        return resize_map(q[1], full) > resize_map(q[0], full)
    return q[1] > q[0]


def refine_instances(rgb: np.ndarray, maps: np.ndarray, method: str, crf: CRFSpec,
                     threshold: float = 0.5, crf_max_side: int = 0) -> np.ndarray:
    """rgb: (H, W, 3); maps: (N, h, w) activation maps in [0, 1] at network resolution ->
    (N, H, W) bool masks at the image's resolution."""
    size = rgb.shape[:2]
    masks = np.zeros((len(maps), *size), dtype=bool)
    for i, m in enumerate(maps):
        prob = resize_map(m, size)
        masks[i] = dense_crf(rgb, prob, crf, crf_max_side) if method == "crf" else prob >= threshold
    return masks
