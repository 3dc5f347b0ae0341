"""Detect and segment on one forward pass per image (onnxruntime).

A bundle's detect graph runs the backbone to find peaks; its segment graph runs the same
backbone again, since peak backprop needs the forward's activations. :class:`SharedForward`
cuts the segment graph where ``peaks`` enters (:mod:`iam_runtime.graph_split`):

* the image stage: everything that does not depend on the peaks, itself in two parts:
  - the forward pass: what the class response maps (the segment graph's ``crm`` output) are
    computed from, the backbone;
  - the factors: the rest, the per-image factors of peak backprop's rule (its normalisers, as
    much arithmetic as the forward) and the filling's affinity kernels;
* the peak stage: the backward pass over the peaks and the filling network (with the fused
  propagation where asked);

and finds peaks with the detect graph's own nodes from its ``iam.FindPeaks`` input on, fed the
forward pass's class response maps. The detect graph's forward never runs: the results are the
detect and segment graphs' (the same computation, in float32 rounding). ``detect`` runs the
forward pass only; an image's factors are computed when it is segmented, so an image without
valid peaks costs its forward pass alone (resnet50 at 448x448: 0.11 s against 0.45 s for the
whole image stage, 2 cores).

The price is memory: what the forward pass hands to the factors (about 160 MB per image for
resnet50 at 448x448) is kept from ``detect`` until that image's ``segment``, for every image of
a detect batch; the factors (about 440 MB) exist while one image is segmented. GPU providers run
the two graphs whole (there a batched detect is cheap, and the state would sit in device memory
between calls).
"""

from __future__ import annotations

import numpy as np
import onnx

from .bundle import DETECT_OUTPUTS, SEGMENT_CRM, SEGMENT_INPUTS, SEGMENT_OUTPUTS
from .graph_split import GraphIndex, partition

FIND_PEAKS = ("iam", "FindPeaks")


def shared_forward_unavailable(detect: onnx.ModelProto, segment: onnx.ModelProto) -> str | None:
    """None when the two graphs can share the forward pass, else why not."""
    if SEGMENT_CRM not in [o.name for o in segment.graph.output]:
        return f"the segment graph has no {SEGMENT_CRM!r} output (exported by an earlier iam-export)"
    finders = GraphIndex(detect).nodes(FIND_PEAKS[1], FIND_PEAKS[0])
    if len(finders) != 1:
        return f"the detect graph has {len(finders)} {'.'.join(FIND_PEAKS)} nodes, not one"
    return None


class SharedForward:
    """``detect(images)`` and ``segment(image, peaks, state)`` with the bundle's tensor names,
    computing each image's forward pass once."""

    def __init__(self, detect: onnx.ModelProto, segment: onnx.ModelProto, make_session, fused_propagation: bool,
                 threads: int = 0):
        """``make_session(model)`` -> an onnxruntime InferenceSession of a cut graph's ModelProto
        (the caller's options), which it may consume."""
        reason = shared_forward_unavailable(detect, segment)
        if reason:
            raise ValueError(reason)
        seg = GraphIndex(segment)
        peaks_input = SEGMENT_INPUTS[1]
        self.stages = partition(seg, seg.downstream([peaks_input]), [peaks_input], name="segment")
        if SEGMENT_CRM not in self.stages.head_outputs:
            raise ValueError(f"the segment graph's {SEGMENT_CRM!r} output depends on the peaks")
        det = GraphIndex(detect)
        crm = det.nodes(FIND_PEAKS[1], FIND_PEAKS[0])[0].input[0]
        self.finder = partition(det, det.downstream([crm]), [crm], name="detect", with_head=False)
        if self.finder.carried:
            raise ValueError(f"the detect graph's peak finding reads {self.finder.carried} besides the class response maps")
        if [i.name for i in self.stages.head.graph.input] != [SEGMENT_INPUTS[0]]:
            raise ValueError(f"the segment graph's image stage reads {[i.name for i in self.stages.head.graph.input]}")
        image = GraphIndex(self.stages.head)
        self.factors = partition(image, {id(n) for n in image.graph.node} - image.ancestors([SEGMENT_CRM]), [],
                                 name="image")
        self.image_stage = make_session(self.factors.head)  # the forward pass
        self.factor_stage = make_session(self.factors.tail)
        self.state_names = [n for n in self.stages.carried if n not in self.stages.graph_inputs]
        # what detect keeps for segment: the forward's tensors the peak stage or the factors read
        self.kept_names = [n for n in self.factors.head_names
                           if n != SEGMENT_CRM or n in self.factors.carried or n in self.state_names]
        if fused_propagation:
            from .propagation import FusedSegmentGraph

            self.peak_stage = FusedSegmentGraph(self.stages.tail, make_session, threads)
        else:
            self.peak_stage = make_session(self.stages.tail)
        self.find_peaks = make_session(self.finder.tail)

    def forward(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One image (1, 3, S, S) -> its class response maps and the forward pass's state its peaks
        need (the factors are computed from it at :meth:`segment`)."""
        names = list(dict.fromkeys([SEGMENT_CRM, *self.kept_names]))
        out = dict(zip(names, self.image_stage.run(names, {SEGMENT_INPUTS[0]: image})))
        return out[SEGMENT_CRM], {n: out[n] for n in self.kept_names}

    def _with_factors(self, image: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The peak stage's state: the forward's ``state`` and the factors computed from it. The
        factors are added to ``state``, so an image segmented in chunks of peaks computes them once."""
        if not set(self.factors.tail_outputs) <= state.keys():
            feeds = {n: image if n == SEGMENT_INPUTS[0] else state[n] for n in self.factors.carried}
            state.update(zip(self.factors.tail_outputs, self.factor_stage.run(self.factors.tail_outputs, feeds)))
        return {n: state[n] for n in self.state_names}

    def detect(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        """(B, 3, S, S) -> the detect graph's outputs and each image's state for :meth:`segment`."""
        crms, states = [], []
        for i in range(len(images)):
            crm, state = self.forward(images[i : i + 1])
            crms.append(crm)
            states.append(state)
        out = self.find_peaks.run(list(DETECT_OUTPUTS), {self.finder.fed[0]: np.concatenate(crms)})
        return dict(zip(DETECT_OUTPUTS, out)), states

    def segment(self, image: np.ndarray, peaks: np.ndarray, state: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """As the segment graph; ``state`` from :meth:`detect`, which keeps the image's factors once
        computed (its later chunks of peaks reuse them). An empty dict is filled with the image's
        forward pass here, for its later chunks; with None that pass is computed and dropped."""
        if state is None:
            state = {}  # computed for this call only
        if not state:
            state.update(self.forward(image)[1])
        feeds = {**dict(zip(SEGMENT_INPUTS, [image, peaks])), **self._with_factors(image, state)}
        names = list(SEGMENT_OUTPUTS)
        out = self.peak_stage.run(names, {k: feeds[k] for k in [*self.stages.fed, *self.stages.carried]})
        return dict(zip(names, out))
