"""From instance activation maps to masks (docs/method.md, section 4): a 2-label dense CRF per instance
(unary -log([1 - p, p]), Gaussian and bilateral pairwise terms), or a plain threshold.

Two CRF backends compute it (:func:`crf_masks`): ``"pydensecrf"`` (the reference's library,
permutohedral lattice, in worker processes) and ``"graph"`` (:mod:`iam_runtime.crf_graph`: the same
mean-field as an ONNX graph on a bilateral grid, every instance of an image in one onnxruntime
call, on the GPU where onnxruntime has CUDA). ``"auto"``: the graph where a CUDA provider runs
it, pydensecrf on the CPU, where it is the faster (docs/crf.md).

Where the CRF runs (``CRFSpec.frame``):

* ``"input"`` (the default, and the reference's frame): on the image resized to the network's
  input size (the activation maps' own size, e.g. 448x448), with the kernel widths in pixels of
  that frame. Its cost does not grow with the photo. The masks are brought to the photo's size
  from the refined probabilities (bilinear, then 0.5), so they are the reference's masks scaled.
* ``"image"``: at the photo's resolution (kernel widths in photo pixels), the photo first
  reduced to ``CRFSchedule.photo_max_side`` when it is larger (kernel widths scaled alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bundle import CRF_FRAMES, CRFSpec
from .images import resize_rgb

CRF_BACKENDS = ("auto", "graph", "pydensecrf")


def resolve_crf_backend(backend: str, providers: Sequence[str] | None = None) -> str:
    """"auto" -> "graph" where onnxruntime has its CUDA provider and the engine's ``providers``
    (None: any) include it, else "pydensecrf"; the others as they are."""
    if backend not in CRF_BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose one of {', '.join(CRF_BACKENDS)}")
    if backend != "auto":
        return backend
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    return "graph" if cuda in ort.get_available_providers() and (providers is None or cuda in providers) \
        else "pydensecrf"


def check_crf_schedule(backend: str, schedule: CRFSchedule | None) -> None:
    """The coarse-to-fine schedule (``max_side``) is pydensecrf's; the graph runs in the frame."""
    if backend == "graph" and schedule is not None and schedule.max_side:
        raise ValueError("the CRF graph runs in the frame itself: the coarse-to-fine schedule (--crf-max-side) is "
                         "pydensecrf's; leave it at 0 or use --crf-backend pydensecrf")


def crf_kernel(crf: CRFSpec, kernel_scale: float = 1.0) -> np.ndarray:
    """(gaussian sxy, compat, bilateral sxy, srgb, compat), the spatial widths scaled by
    ``kernel_scale`` (a frame reduced from the one the widths are given in): both backends' kernels
    (float64; the CRF graph's ``kernel`` input is this, in float32)."""
    return np.array([max(crf.gaussian_sxy * kernel_scale, 0.5), crf.gaussian_compat,
                     crf.bilateral_sxy * kernel_scale, crf.bilateral_srgb, crf.bilateral_compat], np.float64)


def reference_unary(prob: np.ndarray) -> np.ndarray:
    """The reference's unary of (...) foreground probabilities -> (2, N) float32 -log([1 - p, p]),
    exact zeros replaced by 1e-10. p is first clipped to [0, 1]: an engine's sigmoid can return
    1.0000001 (onnxruntime's does), whose 1 - p < 0 has no logarithm."""
    p = np.clip(prob, 0.0, 1.0, dtype=np.float32).reshape(1, -1)
    probs = np.concatenate([1 - p, p])
    probs[probs == 0] = 1e-10
    return np.ascontiguousarray(-np.log(probs), dtype=np.float32)


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
    photo_max_side: int = 1024  # frame "image": larger photos are refined at this longer side

    def __post_init__(self):
        if self.max_side < 0 or self.full_iterations < 0 or self.photo_max_side < 0:
            raise ValueError(f"CRF max side and full-resolution iterations must be >= 0, not {self}")


class ImageCRF:
    """The dense CRF of one image, for any number of its instances. The pairwise terms, and the
    permutohedral lattices that filter them, depend on the image alone: they are built once (per
    resolution), and each instance then costs its unary and the mean-field iterations (at full
    resolution: the same masks as a CRF built per instance, bit for bit; on a 500x375 photo
    0.10 s of 0.28 s per instance is the build). See :class:`CRFSchedule` for reduced
    resolution; ``kernel_scale`` scales the spatial kernel widths (an image reduced from the
    frame the widths are given in)."""

    def __init__(self, rgb: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None,
                 kernel_scale: float = 1.0):
        schedule = schedule or CRFSchedule()
        self.full = rgb.shape[:2]
        self.iterations = crf.iterations
        scale = min(1.0, schedule.max_side / max(self.full)) if schedule.max_side else 1.0
        self.fine_iterations = crf.iterations if scale == 1.0 else min(schedule.full_iterations, crf.iterations)
        self.fine = self._model(rgb, crf, kernel_scale) if self.fine_iterations else None
        self.coarse = None
        if self.fine_iterations < crf.iterations:
            small = (max(1, round(self.full[0] * scale)), max(1, round(self.full[1] * scale)))
            self.coarse = self._model(resize_rgb(rgb, small), crf, scale * kernel_scale)
            self.small = small

    @staticmethod
    def _model(rgb: np.ndarray, crf: CRFSpec, scale: float):
        import pydensecrf.densecrf as dcrf

        h, w = rgb.shape[:2]
        gaussian_sxy, gaussian_compat, bilateral_sxy, srgb, bilateral_compat = crf_kernel(crf, scale).tolist()
        model = dcrf.DenseCRF2D(w, h, 2)
        model.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
        model.addPairwiseBilateral(sxy=bilateral_sxy, srgb=srgb, rgbim=np.require(rgb, np.uint8, ["C", "W"]),
                                   compat=bilateral_compat)
        return model

    def margin(self, prob: np.ndarray) -> np.ndarray:
        """prob: (H, W) foreground probability at this CRF's resolution -> (H, W) float32
        q(foreground) - q(background) of the refined marginals: the mask is margin > 0 (the
        reference's argmax, ties to background)."""
        if self.coarse is None:
            self.fine.setUnaryEnergy(reference_unary(prob))
            q = np.asarray(self.fine.inference(self.iterations)).reshape(2, *self.full)
            return q[1] - q[0]
        self.coarse.setUnaryEnergy(reference_unary(resize_map(prob, self.small)))
        q = np.asarray(self.coarse.inference(self.iterations - self.fine_iterations)).reshape(2, *self.small)
        q = np.stack([resize_map(q[0], self.full), resize_map(q[1], self.full)])
        if self.fine is None:
            return q[1] - q[0]
        from pydensecrf import eigen

        self.fine.setUnaryEnergy(reference_unary(prob))
        _, scratch1, scratch2 = self.fine.startInference()
        marginals = eigen.matrixXf(np.ascontiguousarray(q.reshape(2, -1), dtype=np.float32))
        for _ in range(self.fine_iterations):
            self.fine.stepInference(marginals, scratch1, scratch2)
        q = np.asarray(marginals).reshape(2, *self.full)
        return q[1] - q[0]

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """prob: (H, W) foreground probability at this CRF's resolution -> (H, W) bool mask."""
        return self.margin(prob) > 0


def crf_margins(rgb: np.ndarray, probs: np.ndarray, crf: CRFSpec, backend: str = "pydensecrf",
                schedule: CRFSchedule | None = None, kernel_scale: float = 1.0, graph=None) -> np.ndarray:
    """rgb (H, W, 3) uint8, probs (K, H, W) foreground probabilities at the same size -> (K, H, W)
    float32 q(foreground) - q(background) of the refined marginals (the mask is > 0). ``graph``: a
    :class:`~iam_runtime.crf_graph.CRFGraph` for the graph backend (default: built in memory)."""
    backend = resolve_crf_backend(backend)
    if probs.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"probabilities of {probs.shape[1:]} for an image of {rgb.shape[:2]}")
    if backend == "pydensecrf":
        image_crf = ImageCRF(rgb, crf, schedule, kernel_scale)
        return np.stack([image_crf.margin(p) for p in probs]) if len(probs) else np.zeros(probs.shape, np.float32)
    check_crf_schedule(backend, schedule)
    if not len(probs):
        return np.zeros(probs.shape, np.float32)
    if graph is None:
        from .crf_graph import crf_graph

        graph = crf_graph(None, crf.iterations)
    return 2 * graph.foreground(rgb, probs, crf_kernel(crf, kernel_scale)) - 1


def crf_masks(rgb: np.ndarray, probs: np.ndarray, crf: CRFSpec | None = None, backend: str = "auto") -> np.ndarray:
    """rgb (H, W, 3) uint8, probs (K, H, W) float foreground probabilities -> (K, H, W) bool
    masks: the dense CRF of every instance of the image (``crf``: the reference's kernels by
    default), by ``backend`` (see the module docstring)."""
    return crf_margins(rgb, np.asarray(probs, np.float32), crf or CRFSpec(), backend) > 0


def dense_crf(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None) -> np.ndarray:
    """rgb: (H, W, 3) uint8; prob: (H, W) foreground probability -> (H, W) bool mask: one
    instance's CRF at the image's resolution, built for it alone (as the reference does); see
    :class:`ImageCRF`."""
    return ImageCRF(rgb, crf, schedule).mask(prob)


def crf_frame(rgb: np.ndarray, maps_size: tuple[int, int], crf: CRFSpec,
              schedule: CRFSchedule | None = None) -> tuple[np.ndarray, float]:
    """The image the CRF runs on, and the scale of its kernel widths: (H, W, 3) photo and the
    activation maps' (h, w) -> (frame RGB, kernel scale). See the module docstring."""
    if crf.frame not in CRF_FRAMES:
        raise ValueError(f"unknown CRF frame {crf.frame!r}; choose one of {', '.join(CRF_FRAMES)}")
    if crf.frame == "input":
        return resize_rgb(rgb, maps_size), 1.0
    cap = (schedule or CRFSchedule()).photo_max_side
    longest = max(rgb.shape[:2])
    if not cap or longest <= cap:
        return rgb, 1.0
    scale = cap / longest
    size = (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale)))
    return resize_rgb(rgb, size), scale


def refine_instances(rgb: np.ndarray, maps: np.ndarray, method: str, crf: CRFSpec,
                     threshold: float = 0.5, schedule: CRFSchedule | None = None, backend: str = "pydensecrf",
                     graph=None) -> np.ndarray:
    """rgb: (H, W, 3) photo; maps: (N, h, w) activation maps in [0, 1] at the network's input
    resolution -> (N, H, W) bool masks at the photo's resolution. ``method`` "crf" runs the
    dense CRF in ``crf.frame`` with ``backend`` (see :func:`crf_margins`); any other
    ("threshold", "none") keeps the pixels whose map, resized to the photo, is >= ``threshold``."""
    size = rgb.shape[:2]
    masks = np.zeros((len(maps), *size), dtype=bool)
    if method != "crf":
        for i, m in enumerate(maps):
            masks[i] = resize_map(m, size) >= threshold
        return masks
    if not len(maps):
        return masks
    frame, kernel_scale = crf_frame(rgb, maps.shape[1:], crf, schedule)
    probs = np.stack([resize_map(m, frame.shape[:2]) for m in maps])
    margins = crf_margins(frame, probs, crf, backend, schedule, kernel_scale, graph)
    for i, margin in enumerate(margins):
        masks[i] = resize_map(margin, size) > 0
    return masks
