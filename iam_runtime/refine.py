"""From instance activation maps to masks (docs/method.md, section 4): a 2-label dense CRF per instance
(unary -log([1 - p, p]), Gaussian and bilateral pairwise terms), or a plain threshold.

Two CRF backends compute it (:func:`crf_masks`): ``"pydensecrf"`` (the reference's library,
permutohedral lattice, in worker processes; an image's instances filtered together through its
lattices, see :class:`ImageCRF`) and ``"graph"`` (:mod:`iam_runtime.crf_graph`: the same
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

import dataclasses
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
    """The coarse-to-fine schedule (``max_side``) and the per-instance mean-field are pydensecrf's;
    the graph runs in the frame, every instance of an image together."""
    if backend != "graph" or schedule is None:
        return
    if schedule.max_side:
        raise ValueError("the CRF graph runs in the frame itself: the coarse-to-fine schedule (--crf-max-side) is "
                         "pydensecrf's; leave it at 0 or use --crf-backend pydensecrf")
    if schedule.per_instance:
        raise ValueError("the CRF graph refines an image's instances together: one mean-field per instance "
                         "(--crf-per-instance) is pydensecrf's; use --crf-backend pydensecrf")


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
    # pydensecrf: each instance's mean-field on its own, the reference's arithmetic bit for bit
    # (False: an image's instances together, q within about 1e-4 of it, 2-3x faster; ImageCRF)
    per_instance: bool = False

    def __post_init__(self):
        if self.max_side < 0 or self.full_iterations < 0 or self.photo_max_side < 0:
            raise ValueError(f"CRF max side and full-resolution iterations must be >= 0, not {self}")


JOINT_INSTANCES = 16  # instances filtered together at most: 3 x (this + 1) float rows per pixel


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The 2-label softmax q(fg) from the log-odds, without overflow."""
    return np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x)


class ImageCRF:
    """The dense CRF of one image, for any number of its instances. The pairwise terms, and the
    permutohedral lattices that filter them, depend on the image alone: they are built once (per
    resolution), and each instance then costs its unary and the mean-field iterations. See
    :class:`CRFSchedule` for reduced resolution; ``kernel_scale`` scales the spatial kernel
    widths (an image reduced from the frame the widths are given in).

    Two ways through the iterations. ``schedule.per_instance``: one 2-label mean-field per
    instance, pydensecrf's own, the masks of a CRF built for each instance alone bit for bit.
    Otherwise (the default) an image's instances go through the lattices together: with two
    labels each instance needs one filtered channel, since q(bg) = 1 - q(fg) and the filter is
    linear (K q(bg) = K 1 - K q(fg)), and pydensecrf's lattice filters several channels at once
    for little more than one (measured at 448x448: 35 ms a step for one 2-label instance, 38 ms
    for 5 instances together). The softmax of the two labels is done here; q agrees with the
    per-instance form to about 1e-4: the rounding of the same sums taken in another order,
    amplified over the iterations where q is near 0.5."""

    def __init__(self, rgb: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None,
                 kernel_scale: float = 1.0):
        schedule = schedule or CRFSchedule()
        self.full = rgb.shape[:2]
        self.iterations = crf.iterations
        self.per_instance = schedule.per_instance
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

    def margins(self, probs: np.ndarray) -> np.ndarray:
        """probs: (K, H, W) foreground probabilities at this CRF's resolution -> (K, H, W) float32
        q(foreground) - q(background) of the refined marginals: the mask is margin > 0 (the
        reference's argmax, ties to background)."""
        out = np.empty(probs.shape, np.float32)
        if self.per_instance:
            for i, prob in enumerate(probs):
                out[i] = self._instance_margin(prob)
            return out
        for start in range(0, len(probs), JOINT_INSTANCES):
            chunk = probs[start:start + JOINT_INSTANCES]
            out[start:start + len(chunk)] = 2 * self._joint_foreground(chunk) - 1
        return out

    def margin(self, prob: np.ndarray) -> np.ndarray:
        """prob: (H, W) foreground probability at this CRF's resolution -> (H, W) float32 margin."""
        return self.margins(prob[None])[0]

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """prob: (H, W) foreground probability at this CRF's resolution -> (H, W) bool mask."""
        return self.margin(prob) > 0

    def _joint_foreground(self, probs: np.ndarray) -> np.ndarray:
        """(K, H, W) probabilities -> (K, H, W) refined q(foreground), every instance together."""
        k = len(probs)
        q = None
        if self.coarse is not None:
            small = np.stack([resize_map(p, self.small) for p in probs])
            coarse = _joint_mean_field(self.coarse, _log_odds(small), self.iterations - self.fine_iterations)
            q = np.stack([resize_map(m, self.full) for m in coarse.T.reshape(k, *self.small)])
            if self.fine is None:
                return q
            q = q.reshape(k, -1).T
        return _joint_mean_field(self.fine, _log_odds(probs), self.fine_iterations, q).T.reshape(k, *self.full)

    def _instance_margin(self, prob: np.ndarray) -> np.ndarray:
        """pydensecrf's own 2-label mean-field for one instance: (H, W) -> (H, W) margin."""
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


def _log_odds(probs: np.ndarray) -> np.ndarray:
    """(K, H, W) probabilities -> (H*W, K) float32 U(bg) - U(fg) of the reference's unary."""
    return np.stack([u[0] - u[1] for u in map(reference_unary, probs)], axis=1)


def _joint_mean_field(model, log_odds: np.ndarray, iterations: int, q: np.ndarray | None = None) -> np.ndarray:
    """Mean-field of K 2-label CRFs that share ``model``'s pairwise terms (a pydensecrf DenseCRF
    whose unary is never set, so that its step filters any number of rows).

    log_odds: (N, K) U(bg) - U(fg); q: (N, K) q(fg) to start from (None: the unary's) -> (N, K)
    q(fg). With M(x) = sum over the pairwise terms of compat * filter(x) (what pydensecrf's step
    leaves in its first scratch matrix when it has no unary), each step is
    q <- sigmoid(log_odds + M(q) - M(1 - q)) = sigmoid(log_odds + 2 M(q) - M(1)); M(1) comes from
    a constant row of ones filtered beside the instances."""
    from pydensecrf import eigen

    n, k = log_odds.shape
    q = _sigmoid(log_odds) if q is None else q
    # pydensecrf's matrices are column-major (labels, pixels): a C-order (pixels, rows) array
    marginals, messages, scratch = (eigen.matrixXf(np.zeros((k + 1, n), np.float32)) for _ in range(3))
    q_rows, m_rows = np.asarray(marginals).T, np.asarray(messages).T
    if not (q_rows.flags.c_contiguous and q_rows.shape == (n, k + 1)):
        raise RuntimeError("pydensecrf's matrices are not the column-major (labels, pixels) this code expects")
    for _ in range(iterations):
        q_rows[:, :k] = q
        q_rows[:, k] = 1  # the step overwrites its marginals with a softmax over all rows: set them each time
        model.stepInference(marginals, messages, scratch)
        q = _sigmoid(log_odds + 2 * m_rows[:, :k] - m_rows[:, k:])
    return q


def crf_margins(rgb: np.ndarray, probs: np.ndarray, crf: CRFSpec, backend: str = "pydensecrf",
                schedule: CRFSchedule | None = None, kernel_scale: float = 1.0, graph=None) -> np.ndarray:
    """rgb (H, W, 3) uint8, probs (K, H, W) foreground probabilities at the same size -> (K, H, W)
    float32 q(foreground) - q(background) of the refined marginals (the mask is > 0). ``graph``: a
    :class:`~iam_runtime.crf_graph.CRFGraph` for the graph backend (default: built in memory)."""
    backend = resolve_crf_backend(backend)
    if probs.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"probabilities of {probs.shape[1:]} for an image of {rgb.shape[:2]}")
    if backend == "pydensecrf":
        return ImageCRF(rgb, crf, schedule, kernel_scale).margins(probs)
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


def dense_crf_margin(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec,
                     schedule: CRFSchedule | None = None) -> np.ndarray:
    """rgb: (H, W, 3) uint8; prob: (H, W) foreground probability -> (H, W) float32 q(fg) - q(bg):
    one instance's CRF at the image's resolution, built for it alone and computed by pydensecrf's
    own mean-field, as the reference does; see :class:`ImageCRF`."""
    return ImageCRF(rgb, crf, dataclasses.replace(schedule or CRFSchedule(), per_instance=True)).margin(prob)


def dense_crf(rgb: np.ndarray, prob: np.ndarray, crf: CRFSpec, schedule: CRFSchedule | None = None) -> np.ndarray:
    """The mask of :func:`dense_crf_margin`: (H, W) bool."""
    return dense_crf_margin(rgb, prob, crf, schedule) > 0


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
