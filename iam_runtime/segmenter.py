"""The runtime as a library: :class:`Segmenter` runs a bundle on images in memory.

    seg = Segmenter.from_bundle("bundle")
    for ins in seg.predict(rgb):              # rgb: (H, W, 3) uint8
        ins.class_name, ins.score, ins.mask   # mask: (H, W) bool at the image's size

It is made of the stage functions that every caller shares (the folder pipeline, the Ray runner
and the benchmarks): :meth:`Segmenter.preprocess`, :meth:`~Segmenter.detect` (batched),
:meth:`~Segmenter.segment` (one image, its peaks), :meth:`RefineSettings.refine` (dense CRF or
threshold; picklable, so it runs in worker processes) and :meth:`~Segmenter.instances` (peaks
and masks to :class:`Instance` records, duplicates removed as the bundle says). What each step
computes is the bundle's (docs/reference.md); :class:`PredictOptions` overrides it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import FORWARD_STATE
from .bundle import Bundle, CRFSpec, load_bundle
from .images import preprocess
from .masks import nms
from .peaks import peak_input_coordinates, select_peaks
from .refine import CRFSchedule, check_crf_schedule, refine_instances, resolve_crf_backend

log = logging.getLogger(__name__)


@dataclass
class Instance:
    """One segmented instance."""

    class_index: int  # 0-based into the bundle's classes
    class_name: str
    peak_value: float  # the peak's value on the class response map (a logit)
    class_score: float  # the image-level class score (a logit)
    peak: tuple[int, int]  # (y, x) in the image
    mask: np.ndarray  # (H, W) bool at the image's size

    @property
    def score(self) -> float:
        """Confidence in [0, 1]: the sigmoid of the peak value, the probability the classifier
        gives the class when this peak is its evidence (the class score is a mean of peak
        values, trained with a sigmoid loss). Monotone in the peak value: rankings are the
        peak values' (which break ties where the sigmoid rounds to 1)."""
        return confidence(self.peak_value)


def confidence(peak_value: float) -> float:
    """The logistic sigmoid, computed without overflow."""
    z = float(np.exp(-abs(peak_value)))
    return 1.0 / (1.0 + z) if peak_value >= 0 else z / (1.0 + z)


@dataclass
class PredictOptions:
    """Overrides of the bundle's inference semantics (None: the bundle's)."""

    refine: str = "crf"  # crf | threshold | none
    crf_backend: str = "auto"  # graph | pydensecrf | auto (the graph where onnxruntime has CUDA)
    crf_frame: str | None = None  # "input" (the reference's) or "image" (the photo's resolution)
    crf_photo_max_side: int = 1024  # frame "image": larger photos are refined at this longer side
    # CRF on the frame scaled to this longer side, but for its last crf_full_iterations (see
    # refine.CRFSchedule); 0: every iteration in the frame itself.
    crf_max_side: int = 0
    crf_full_iterations: int = 1
    # pydensecrf: one mean-field per instance, the reference's arithmetic bit for bit (default:
    # an image's instances together, q within about 1e-4 of it; refine.ImageCRF)
    crf_per_instance: bool = False
    max_instances: int | None = None  # per image (default: every valid peak the detect graph returns)
    class_threshold: float | None = None  # a class is present when its score (a logit) is >= this
    peak_threshold: float | None = None  # and a peak is used when its value is > this
    mask_threshold: float | None = None  # activation map -> mask without CRF
    nms_iou: float | None = None  # same-class duplicates above this IoU dropped; > 1: every instance kept
    # Peaks per segment call (bounds memory) where the bundle's filling uses running statistics;
    # with batch statistics an image's peaks go through in one call (up to max_instances).
    peak_chunk: int = 8


@dataclass(frozen=True)
class RefineSettings:
    """Activation maps -> masks, as resolved for one run; picklable for worker processes."""

    method: str
    crf: CRFSpec
    threshold: float
    schedule: CRFSchedule
    crf_backend: str = "pydensecrf"  # resolved: graph | pydensecrf
    crf_graph_file: str | None = None  # the bundle's crf.onnx; None: the graph is built in memory
    crf_providers: tuple[str, ...] = ()  # the CRF graph's session: the engine's (): CUDA where there is one

    @property
    def in_process(self) -> bool:
        """The graph CRF runs in threads of this process (one onnxruntime session, on the GPU
        where there is one); pydensecrf in worker processes."""
        return self.method == "crf" and self.crf_backend == "graph"

    def refine(self, rgb: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """rgb (H, W, 3) uint8, maps (P, h, w) at the network's input size -> (P, H, W) bool."""
        graph = None
        if self.in_process:
            from .crf_graph import crf_graph

            graph = crf_graph(self.crf_graph_file, self.crf.iterations, self.crf_providers)
        return refine_instances(rgb, maps, self.method, self.crf, self.threshold, self.schedule, self.crf_backend,
                                graph)


@dataclass
class ImagePeaks:
    """The peaks of one image chosen for segmentation."""

    coords: np.ndarray  # (P, 3) int64 (class, y, x) on the upsampled CRM grid
    values: np.ndarray  # (P,) peak values
    class_scores: np.ndarray  # (P,) the score of each peak's class
    input_points: np.ndarray  # (P, 2) float (y, x) in network input pixels
    valid: int  # valid peaks found; more than P when max_instances cut some
    detect_full: bool  # the detect graph's K outputs were full of valid peaks: more may exist
    # the engine's state of the image's forward pass, kept for segment (a shared forward), which
    # consumes it: large (about 385 MB at resnet50@448), so never copied along with the peaks;
    # with the engine that made it, as only that engine's segment may take it
    forward: dict | None = field(default=None, repr=False, compare=False)
    forward_engine: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict:
        # the kept forward pass belongs to this process's engine (sessions do not pickle): peaks
        # sent elsewhere (Ray's stages, a worker pool) arrive without it and segment on their own
        return {**self.__dict__, "forward": None, "forward_engine": None}


class Segmenter:
    """A bundle and an engine, with the run's semantics resolved once (see the module docstring)."""

    def __init__(self, bundle: Bundle, backend, options: PredictOptions | None = None):
        o = options or PredictOptions()
        m = bundle.manifest
        self.bundle, self.backend, self.manifest = bundle, backend, m
        pick = lambda value, default: default if value is None else value  # noqa: E731
        self.max_instances = pick(o.max_instances, m.peaks.max_peaks)
        self.user_max_instances = o.max_instances is not None
        self.class_threshold = pick(o.class_threshold, m.peaks.class_threshold)
        self.peak_threshold = pick(o.peak_threshold, m.peaks.peak_threshold)
        self.nms_iou = pick(o.nms_iou, m.peaks.nms_iou)
        crf = m.crf if o.crf_frame is None else dataclasses.replace(m.crf, frame=o.crf_frame)
        graph_file = str(bundle.graph_path("crf")) if "crf" in m.graphs else None
        # the CRF follows the engine: an engine kept off the GPU (--providers) keeps it off too
        engine_providers = getattr(backend, "providers", None)
        crf_backend = resolve_crf_backend(o.crf_backend, engine_providers)
        schedule = CRFSchedule(o.crf_max_side, o.crf_full_iterations, o.crf_photo_max_side, o.crf_per_instance)
        if o.refine == "crf":
            check_crf_schedule(crf_backend, schedule)
        self.refine_settings = RefineSettings(
            o.refine, crf, pick(o.mask_threshold, m.filling.mask_threshold), schedule, crf_backend, graph_file,
            tuple(engine_providers or ()))
        # With batch statistics the filling network normalises an image's peaks together, as
        # the reference does: they go through in one call.
        self.peak_chunk = self.max_instances if m.filling.normalization == "batch" else o.peak_chunk
        self.crm_size = (m.input.size[0] // m.peaks.stride, m.input.size[1] // m.peaks.stride)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", providers: list[str] | None = None,
                    threads: int = 0, tf32: bool = False, propagation: str = "auto", share_forward: bool | None = None,
                    **options) -> Segmenter:
        """Load a bundle and pick its engine (as ``iam-infer --backend/--providers``);
        ``options`` are :class:`PredictOptions` fields."""
        from .backends import select_backend

        bundle = load_bundle(path)
        return cls(bundle, select_backend(bundle, backend, providers, threads=threads, tf32=tf32, propagation=propagation,
                                          share_forward=share_forward),
                   PredictOptions(**options))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    # ---------------------------------------------------------------- stages
    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, S, S) float32 network input."""
        i = self.manifest.input
        return preprocess(rgb, i.size, i.mean, i.std)

    def detect(self, tensors: np.ndarray) -> list[ImagePeaks]:
        """(B, 3, S, S) inputs -> each image's valid peaks (highest first, at most
        ``max_instances``)."""
        det = self.backend.detect(np.ascontiguousarray(tensors))
        states = det.get(FORWARD_STATE) or [None] * len(tensors)
        k = self.manifest.peaks.max_peaks
        out = []
        for i in range(len(tensors)):
            count = int(det["peak_counts"][i])
            valid = select_peaks(det["class_scores"][i], det["peak_coords"][i], det["peak_values"][i], count,
                                 self.class_threshold, self.peak_threshold, k)
            chosen = valid[: self.max_instances]
            coords = det["peak_coords"][i][chosen]
            out.append(ImagePeaks(
                coords, det["peak_values"][i][chosen].astype(np.float32),
                det["class_scores"][i][coords[:, 0]].astype(np.float32) if len(coords) else np.zeros(0, np.float32),
                peak_input_coordinates(coords, self.crm_size, self.manifest.peaks.upsample_factor,
                                       self.manifest.peaks.stride),
                len(valid), count == k and k > 0 and det["peak_values"][i][k - 1] > self.peak_threshold,
                states[i] if len(chosen) else None, self.backend))
        return out

    def detect_batch(self, requested: int) -> int:
        """How many images to detect per call when ``requested`` are at hand: 1 where the engine
        shares the forward pass (it detects image by image anyway, and each image's forward is
        kept until its segment: 8 at resnet50@448 held 3 GB and ran 10 % slower), else all."""
        return 1 if getattr(self.backend, "shared", None) is not None else max(1, requested)

    def segment(self, tensor: np.ndarray, peaks: ImagePeaks) -> np.ndarray:
        """One image's (3, S, S) input and its peaks -> (P, S, S) float32 activation maps. Takes
        (and releases) the forward pass ``detect`` kept on ``peaks``, where the engine shares it;
        peaks another segmenter found (another bundle, say: its state's tensors are its graphs')
        are segmented on this engine's own forward pass, computed once for all their chunks, and
        keep their state for their own."""
        state: dict = {}
        if peaks.forward_engine is self.backend:
            state, peaks.forward, peaks.forward_engine = peaks.forward, None, None
        if not len(peaks):
            return np.zeros((0, *self.manifest.input.size), np.float32)
        parts = [self.backend.segment(tensor[None], np.ascontiguousarray(peaks.coords[s : s + self.peak_chunk]), state)["iam"]
                 for s in range(0, len(peaks), self.peak_chunk)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def refine(self, rgb: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """(H, W, 3) image and its (P, S, S) maps -> (P, H, W) bool masks (in this process)."""
        return self.refine_settings.refine(rgb, maps)

    def instances(self, peaks: ImagePeaks, masks: np.ndarray) -> list[Instance]:
        """Peaks and their (P, H, W) masks -> instances, duplicates removed as the bundle says
        (the reference keeps all, in peak order; with NMS, highest score first)."""
        h, w = masks.shape[1:] if masks.ndim == 3 else (0, 0)
        size = self.manifest.input.size
        scale = np.array([h / size[0], w / size[1]])
        points = np.clip(peaks.input_points * scale, 0, np.array([h - 1, w - 1])) if len(peaks) else []
        keep = nms(masks, peaks.values, peaks.coords[:, 0], self.nms_iou) if len(peaks) else []
        names = self.manifest.classes
        return [Instance(int(peaks.coords[j, 0]), names[int(peaks.coords[j, 0])], float(peaks.values[j]),
                         float(peaks.class_scores[j]), (int(points[j][0]), int(points[j][1])), masks[j])
                for j in keep]

    # ---------------------------------------------------------------- in memory
    def predict(self, rgb: np.ndarray) -> list[Instance]:
        """(H, W, 3) uint8 RGB -> its instances (masks at the image's size)."""
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[list[Instance]]:
        """Several images: one detect call for all (image by image with a shared forward), then
        each image's peaks."""
        if not images:
            return []
        for rgb in images:
            if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8):
                raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {getattr(rgb, 'dtype', type(rgb))} "
                                 f"{getattr(rgb, 'shape', '')}")
        out, capped = [], CapReport()
        step = self.detect_batch(len(images))
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            tensors = np.stack([self.preprocess(rgb) for rgb in chunk])
            for i, (rgb, tensor, peaks) in enumerate(zip(chunk, tensors, self.detect(tensors)), start):
                capped.add(f"image {i}", peaks)
                out.append(self.instances(peaks, self.refine(rgb, self.segment(tensor, peaks))))
        capped.warn(self)
        return out


@dataclass
class CapReport:
    """The images on which a cap left valid peaks out, said once (naming a few of them)."""

    detect_outputs_full: list[str] = dataclasses.field(default_factory=list)  # the detect graph's K outputs
    max_instances: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, peaks: ImagePeaks) -> None:
        self.record(name, *self.flags(peaks))

    @staticmethod
    def flags(peaks: ImagePeaks) -> tuple[bool, bool]:
        """(the detect graph's K outputs were all valid peaks, --max-instances left valid peaks out)."""
        return bool(peaks.detect_full), len(peaks) < peaks.valid

    def record(self, name: str, detect_full: bool, beyond_max_instances: bool) -> None:
        if detect_full:
            self.detect_outputs_full.append(name)
        if beyond_max_instances:
            self.max_instances.append(name)

    def counts(self) -> dict[str, int]:
        return {"detect_outputs_full": len(self.detect_outputs_full), "max_instances": len(self.max_instances)}

    def warn(self, segmenter: Segmenter) -> None:
        """Log what the caps cut, as ``segmenter`` set them; a --max-instances the user set is no
        surprise, and not said."""
        detect_k, max_instances = segmenter.manifest.peaks.max_peaks, segmenter.max_instances
        if self.detect_outputs_full:
            log.warning("%d images (%s) had more valid peaks than the detect graph's %d outputs: the rest were not "
                        "used (export with a larger --max-peaks)", len(self.detect_outputs_full),
                        ", ".join(self.detect_outputs_full[:3]), detect_k)
        if self.max_instances and not segmenter.user_max_instances:
            log.warning("%d images (%s) had more valid peaks than --max-instances %d", len(self.max_instances),
                        ", ".join(self.max_instances[:3]), max_instances)
