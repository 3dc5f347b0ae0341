"""The dense CRF as an ONNX graph (issue 16): the graph on onnxruntime's CPU provider against its
numpy oracle, against the exact fully connected mean-field on small real photos (where the N x N
kernels fit in memory), and against pydensecrf at full size."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from PIL import Image

from iam_runtime.bundle import CRFSpec
from iam_runtime.crf_graph import _unary_logit, crf_graph, grid_crf_numpy
from iam_runtime.masks import mask_iou
from iam_runtime.refine import crf_kernel, crf_margins, crf_masks, refine_instances, resolve_crf_backend

from .conftest import SHARED_DATA

skdata = pytest.importorskip("skimage.data")
CRF = CRFSpec()


def photos(side: int) -> list[np.ndarray]:
    """scikit-image's sample photos, and the shared VOC photos where present, within side x side."""
    images = [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    images += [np.asarray(Image.open(p).convert("RGB"))
               for p in sorted(glob.glob(str(SHARED_DATA / "voc-sample" / "JPEGImages" / "*.jpg")))]
    out = []
    for rgb in images:
        im = Image.fromarray(rgb)
        im.thumbnail((side, side))
        out.append(np.asarray(im))
    return out


def activation_maps(rgb: np.ndarray, count: int, contrast: float = 0.4) -> np.ndarray:
    """Object-shaped foreground probabilities (the benchmark's), flattened towards 0.5 as a
    filling network's are, so that the pairwise terms decide: (K, H, W)."""
    from benchmarks.latency.crf import object_shaped_maps

    maps = object_shaped_maps(rgb, count)
    return (0.5 + contrast * (np.stack(maps) - 0.5)).astype(np.float32) if maps else np.zeros((0, *rgb.shape[:2]), np.float32)


def exact_mean_field(rgb: np.ndarray, probs: np.ndarray, crf: CRFSpec) -> np.ndarray:
    """The fully connected 2-label CRF's mean-field with dense N x N kernels, in float64 (the
    kernels as pydensecrf defines them: centre included, symmetric normalisation, Potts)."""
    h, w = rgb.shape[:2]
    n = h * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pos = np.stack([xx.ravel(), yy.ravel()], 1)
    col = rgb.reshape(n, 3).astype(np.float64)
    sq = lambda a: ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)  # noqa: E731
    dist = sq(pos)
    kg = np.exp(-dist / (2 * crf.gaussian_sxy**2))
    kb = np.exp(-dist / (2 * crf.bilateral_sxy**2) - sq(col) / (2 * crf.bilateral_srgb**2))
    ng, nb = 1 / np.sqrt(kg.sum(1)), 1 / np.sqrt(kb.sum(1))
    logit = _unary_logit(probs).reshape(len(probs), n).astype(np.float64)
    q = 1 / (1 + np.exp(-logit))
    one_g, one_b = ng * (kg @ ng), nb * (kb @ nb)
    for _ in range(crf.iterations):
        msg_g, msg_b = ng * ((ng * q) @ kg), nb * ((nb * q) @ kb)
        q = 1 / (1 + np.exp(-(logit + crf.gaussian_compat * (2 * msg_g - one_g)
                              + crf.bilateral_compat * (2 * msg_b - one_b))))
    return (q > 0.5).reshape(probs.shape)


def test_graph_equals_its_numpy_oracle():
    """Same grid, same float32 arithmetic; only the summation orders differ (scatter-add, the
    convolutions). One iteration agrees to float rounding; over five, mean-field (compat 10)
    amplifies rounding where q is near 0.5, so the masks are compared there."""
    from iam_runtime.crf_graph import CRFGraph

    rgb = photos(160)[0]
    probs = activation_maps(rgb, 3)
    kernel = crf_kernel(CRF)
    one = CRFGraph(None, 1).foreground(rgb, probs, kernel)
    assert one.shape == probs.shape and one.dtype == np.float32
    np.testing.assert_allclose(one, grid_crf_numpy(rgb, probs, tuple(kernel), 1), atol=2e-5)
    got = crf_graph(None, CRF.iterations).foreground(rgb, probs, kernel)
    want = grid_crf_numpy(rgb, probs, tuple(kernel), CRF.iterations)
    assert np.abs(got - want).mean() < 1e-4
    assert ((got > 0.5) != (want > 0.5)).mean() < 1e-3


@pytest.mark.slow
def test_graph_is_closer_to_the_exact_crf_than_pydensecrf():
    """On small real photos (about 100 x 75) against the exact fully connected mean-field: the
    grid's masks at least as close as pydensecrf's permutohedral lattice's."""
    graph_ious, lattice_ious = [], []
    for rgb in photos(100):
        probs = activation_maps(rgb, 4)
        if not len(probs):
            continue
        exact = exact_mean_field(rgb, probs, CRF)
        graph = crf_masks(rgb, probs, CRF, backend="graph")
        lattice = crf_masks(rgb, probs, CRF, backend="pydensecrf")
        graph_ious += [mask_iou(g, e) for g, e in zip(graph, exact)]
        lattice_ious += [mask_iou(d, e) for d, e in zip(lattice, exact)]
    assert len(graph_ious) >= 10
    assert np.mean(graph_ious) >= np.mean(lattice_ious) and np.mean(graph_ious) >= 0.97, \
        (np.mean(graph_ious), np.mean(lattice_ious))


@pytest.mark.slow
def test_graph_agrees_with_pydensecrf_at_full_size():
    ious = []
    for rgb in photos(500)[:4]:
        probs = activation_maps(rgb, 4)
        ious += [mask_iou(g, d) for g, d in zip(crf_masks(rgb, probs, CRF, "graph"),
                                                crf_masks(rgb, probs, CRF, "pydensecrf"))]
    assert np.mean(ious) >= 0.94, ious


def test_refine_with_the_graph_in_the_input_frame():
    """The runtime's refinement with the graph: the masks at the photo's size, from the input
    frame, as with pydensecrf; no instance, no call."""
    rgb = photos(300)[1]
    maps = np.stack([np.asarray(Image.fromarray(m).resize((112, 112), Image.BILINEAR))
                     for m in activation_maps(rgb, 2, contrast=0.9)])
    graph = refine_instances(rgb, maps, "crf", CRF, backend="graph")
    lattice = refine_instances(rgb, maps, "crf", CRF, backend="pydensecrf")
    assert graph.shape == (len(maps), *rgb.shape[:2])
    assert min(mask_iou(g, d) for g, d in zip(graph, lattice)) > 0.9
    assert refine_instances(rgb, maps[:0], "crf", CRF, backend="graph").shape == (0, *rgb.shape[:2])


def test_crf_backend_choices_are_checked():
    assert resolve_crf_backend("graph") == "graph" and resolve_crf_backend("pydensecrf") == "pydensecrf"
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert resolve_crf_backend("auto") == ("graph" if cuda else "pydensecrf")
    # the CRF follows the engine's providers: an engine kept on the CPU keeps it there
    assert resolve_crf_backend("auto", ["CPUExecutionProvider"]) == "pydensecrf"
    assert resolve_crf_backend("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        "graph" if cuda else "pydensecrf")
    with pytest.raises(ValueError, match="unknown CRF backend 'fast'"):
        resolve_crf_backend("fast")
    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="probabilities of \\(4, 4\\) for an image of \\(8, 8\\)"):
        crf_margins(rgb, np.zeros((1, 4, 4), np.float32), CRF, "graph")
    from iam_runtime.refine import CRFSchedule

    with pytest.raises(ValueError, match="bilateral grid .* would have .* cells"):
        crf_graph(None, CRF.iterations).foreground(np.arange(192, dtype=np.uint8).reshape(8, 8, 3),
                                                   np.zeros((1, 8, 8), np.float32), np.ones(5, np.float32) * 0.01)
    with pytest.raises(ValueError, match="coarse-to-fine schedule"):
        crf_margins(rgb, np.zeros((1, 8, 8), np.float32), CRF, "graph", CRFSchedule(max_side=4))
    with pytest.raises(ValueError, match="one mean-field per instance .* is pydensecrf's"):
        crf_margins(rgb, np.zeros((1, 8, 8), np.float32), CRF, "graph", CRFSchedule(per_instance=True))
