"""From instance activation maps to masks (SPEC section 4): a 2-label dense CRF per instance
over the original image (unary -log([1 - p, p]), Gaussian and bilateral pairwise terms), or a
plain threshold. Pure numpy + pydensecrf: runs in worker processes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bundle import CRFSpec


def resize_map(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) bilinear."""
    h, w = size
    if prob.shape == (h, w):
        return prob.astype(np.float32)
    return np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


@dataclass(frozen=True)
class CRFSchedule:
    """Where the CRF's mean-field iterations run. ``max_side`` 0: all at the image's resolution,
    the reference's masks. ``max_side`` > 0: on the image scaled so that its longer side is at
    most that (spatial kernel widths scaled alike), except the last ``full_iterations``, which
    run at full resolution starting from the coarse marginals brought back bilinearly: the
    coarse iterations cost a fraction of the full ones, and the full-resolution ones bring the
    masks back close to the reference's (benchmarks: CRF on object-shaped maps)."""

    max_side: int = 0
    full_iterations: int = 1

    def __post_init__(self):
        if self.max_side < 0 or self.full_iterations < 0:
            raise ValueError(f"CRF max side and full-resolution iterations must be >= 0, not {self}")


class ImageCRF:
    """The dense CRF of one image, for any number of its instances. The pairwise terms, and the
    permutohedral lattices that filter them, depend on the image alone: they are built once (per
    resolution), and each instance then costs its unary and the mean-field iterations (at full
    resolution: the same masks as a CRF built per instance, bit for bit; on a 500x375 photo
    0.10 s of 0.28 s per instance is the build). See :class:`CRFSchedule` for reduced
    resolution."""

    def __init__(self, rgb: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None):
        schedule = schedule or CRFSchedule()
        self.full = rgb.shape[:2]
        self.iterations = crf.iterations
        scale = min(1.0, schedule.max_side / max(self.full)) if schedule.max_side else 1.0
        self.fine_iterations = crf.iterations if scale == 1.0 else min(schedule.full_iterations, crf.iterations)
        self.fine = self._model(rgb, crf, 1.0) if self.fine_iterations else None
        self.coarse = None
        if self.fine_iterations < crf.iterations:
            small = (max(1, round(self.full[0] * scale)), max(1, round(self.full[1] * scale)))
            self.coarse = self._model(np.asarray(Image.fromarray(rgb).resize((small[1], small[0]), Image.BILINEAR)),
                                      crf, scale)
            self.small = small

    @staticmethod
    def _model(rgb: np.ndarray, crf: CRFSpec, scale: float):
        import pydensecrf.densecrf as dcrf

        h, w = rgb.shape[:2]
        model = dcrf.DenseCRF2D(w, h, 2)
        model.addPairwiseGaussian(sxy=max(crf.gaussian_sxy * scale, 0.5), compat=crf.gaussian_compat)
        model.addPairwiseBilateral(sxy=crf.bilateral_sxy * scale, srgb=crf.bilateral_srgb,
                                   rgbim=np.require(rgb, np.uint8, ["C", "W"]), compat=crf.bilateral_compat)
        return model

    @staticmethod
    def _unary(prob: np.ndarray) -> np.ndarray:
        p = np.clip(prob, 1e-5, 1 - 1e-5).astype(np.float32)
        return np.ascontiguousarray(-np.log(np.stack([1 - p, p]).reshape(2, -1)), dtype=np.float32)

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """prob: (H, W) foreground probability at the image's resolution -> (H, W) bool mask."""
        if self.coarse is None:
            self.fine.setUnaryEnergy(self._unary(prob))
            q = np.asarray(self.fine.inference(self.iterations)).reshape(2, *self.full)
            return q[1] > q[0]
        self.coarse.setUnaryEnergy(self._unary(resize_map(prob, self.small)))
        q = np.asarray(self.coarse.inference(self.iterations - self.fine_iterations)).reshape(2, *self.small)
        q = np.stack([resize_map(q[0], self.full), resize_map(q[1], self.full)])
        if self.fine is None:
            return q[1] > q[0]
        from pydensecrf import eigen

        self.fine.setUnaryEnergy(self._unary(prob))
        _, scratch1, scratch2 = self.fine.startInference()
        marginals = eigen.matrixXf(np.ascontiguousarray(q.reshape(2, -1), dtype=np.float32))
        for _ in range(self.fine_iterations):
            self.fine.stepInference(marginals, scratch1, scratch2)
        q = np.asarray(marginals).reshape(2, *self.full)
        return q[1] > q[0]


def dense_crf(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None) -> np.ndarray:
    """rgb: (H, W, 3) uint8; prob: (H, W) foreground probability -> (H, W) bool mask: one
    instance's CRF, built for it alone (as the reference does); see :class:`ImageCRF`."""
    return ImageCRF(rgb, crf, schedule).mask(prob)


def refine_instances(rgb: np.ndarray, maps: np.ndarray, method: str, crf: CRFSpec,
                     threshold: float = 0.5, schedule: CRFSchedule | None = None) -> np.ndarray:
    """rgb: (H, W, 3); maps: (N, h, w) activation maps in [0, 1] at network resolution ->
    (N, H, W) bool masks at the image's resolution. ``method`` "crf" runs the dense CRF; any
    other ("threshold", "none") keeps the pixels whose map is >= ``threshold``."""
    size = rgb.shape[:2]
    masks = np.zeros((len(maps), *size), dtype=bool)
    image_crf = ImageCRF(rgb, crf, schedule) if method == "crf" and len(maps) else None
    for i, m in enumerate(maps):
        prob = resize_map(m, size)
        masks[i] = image_crf.mask(prob) if image_crf is not None else prob >= threshold
    return masks
