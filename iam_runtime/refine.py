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


def dense_crf(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec) -> np.ndarray:
    """rgb: (H, W, 3) uint8; prob: (H, W) foreground probability -> (H, W) bool mask."""
    import pydensecrf.densecrf as dcrf

    h, w = prob.shape
    p = np.clip(prob, 1e-5, 1 - 1e-5).astype(np.float32)
    unary = -np.log(np.stack([1 - p, p]).reshape(2, -1))
    model = dcrf.DenseCRF2D(w, h, 2)
    model.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    model.addPairwiseGaussian(sxy=crf.gaussian_sxy, compat=crf.gaussian_compat)
    model.addPairwiseBilateral(sxy=crf.bilateral_sxy, srgb=crf.bilateral_srgb,
                               rgbim=np.ascontiguousarray(rgb, dtype=np.uint8), compat=crf.bilateral_compat)
    q = np.asarray(model.inference(crf.iterations)).reshape(2, h, w)
    return q[1] > q[0]


def refine_instances(rgb: np.ndarray, maps: np.ndarray, method: str, crf: CRFSpec,
                     threshold: float = 0.5) -> np.ndarray:
    """rgb: (H, W, 3); maps: (N, h, w) activation maps in [0, 1] at network resolution ->
    (N, H, W) bool masks at the image's resolution."""
    size = rgb.shape[:2]
    masks = np.zeros((len(maps), *size), dtype=bool)
    for i, m in enumerate(maps):
        prob = resize_map(m, size)
        masks[i] = dense_crf(rgb, prob, crf) if method == "crf" else prob >= threshold
    return masks
