"""The dense CRF of docs/method.md, section 4, as an ONNX graph of standard operators, so that it
runs where onnxruntime runs: on the CUDA provider next to the engine, and on the CPU.

The 2-label mean-field of pydensecrf (Potts compatibilities, symmetric kernel normalisation,
the kernels' own centre included) with its two filters computed differently:

* the Gaussian term (``sxy`` 3) exactly, as a separable blur truncated at 4 sigma;
* the bilateral term (``sxy`` 80, ``srgb`` 13) on a bilateral grid: a dense 5-D grid over
  (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) at one sigma spacing; each pixel is splatted onto the
  32 corners of its cell with multilinear weights, the grid is blurred along each axis with a
  5-tap kernel whose variance is 1 - 1/3 cells^2 (splat and slice, tents, add the other 1/3),
  and read back at the pixels with the same weights. pydensecrf's permutohedral lattice is an
  approximation too; against the exact fully connected CRF this grid is the closer of the two
  (docs/crf.md).

For 2 labels the mean-field needs one channel per instance: with Q1 = q(foreground),
``Kn Q0 = Kn 1 - Kn Q1``. The image-dependent part (splat positions and weights, the kernels'
normalisation) is computed once per call; every instance of the image goes through together, as
channels.

:func:`grid_crf_numpy` is the same computation in numpy (the graph's oracle in the tests);
:func:`build_crf_graph` writes the graph. Graph inputs: ``rgb`` (H, W, 3) uint8, ``probs`` (K, H,
W) float32 foreground probabilities, ``kernel`` (5,) float32 = (gaussian sxy, gaussian compat,
bilateral sxy, bilateral srgb, bilateral compat); output ``foreground`` (K, H, W) float32, the
refined q(foreground). The mask is foreground > 0.5 (the reference's argmax, ties to background).
The number of mean-field iterations is the graph's own (it is unrolled).
"""

from __future__ import annotations

import itertools

import numpy as np

CRF_INPUTS = ("rgb", "probs", "kernel")
CRF_OUTPUTS = ("foreground",)
GAUSSIAN_TRUNCATE = 4.0  # the Gaussian term's blur reaches this many sigmas
# The grid blur: 5 taps at one-sigma spacing, variance 2/3 cells^2 (see the module docstring).
GRID_TAPS = 2  # radius


def grid_blur_weights() -> np.ndarray:
    """The 5-tap kernel, exp(-i^2 / (2 s^2)) normalised, with s chosen so that its variance is
    exactly 2/3 cells^2."""
    target, lo, hi = 2.0 / 3.0, 0.1, 2.0
    offsets = np.arange(-GRID_TAPS, GRID_TAPS + 1, dtype=np.float64)
    for _ in range(100):  # bisection on s: the discrete variance grows with it
        s = 0.5 * (lo + hi)
        w = np.exp(-offsets**2 / (2 * s * s))
        w /= w.sum()
        lo, hi = (s, hi) if (w * offsets**2).sum() < target else (lo, s)
    return w.astype(np.float32)


CORNERS = np.array(list(itertools.product((0, 1), repeat=5)), dtype=np.float32)  # (32, 5)


def _unary_logit(probs: np.ndarray) -> np.ndarray:
    """log p - log(1 - p) of the reference's unary (refine.reference_unary), probs' shape."""
    from .refine import reference_unary

    unary = reference_unary(probs)  # (2, N): -log(1 - p), -log(p)
    return (unary[0] - unary[1]).reshape(np.shape(probs))


def _gaussian_taps(sxy: float) -> np.ndarray:
    radius = int(np.ceil(GAUSSIAN_TRUNCATE * sxy))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    return np.exp(-(t * t) / np.float32(2 * sxy * sxy)).astype(np.float32)


def _blur_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """'same' correlation along ``axis`` with zeros outside."""
    r = len(taps) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad)
    n = x.shape[axis]
    out = np.zeros_like(x)
    for j, w in enumerate(taps):
        out += w * np.take(xp, np.arange(j, j + n), axis=axis)
    return out


def grid_crf_numpy(rgb: np.ndarray, probs: np.ndarray, kernel: tuple[float, ...], iterations: int) -> np.ndarray:
    """rgb (H, W, 3) uint8, probs (K, H, W) -> (K, H, W) float32 q(foreground); the graph's
    computation, in float32 like it (see the module docstring)."""
    gs, gc, bs, br, bc = (np.float32(v) for v in kernel)
    h, w = rgb.shape[:2]
    k = len(probs)
    n = h * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    feats = np.stack([xx.ravel() / bs, yy.ravel() / bs, *(rgb.reshape(n, 3).astype(np.float32).T / br)], axis=1)
    feats = feats - np.floor(feats.min(axis=0))
    base = np.floor(feats)
    frac = feats - base
    dims = (np.floor(feats.max(axis=0)) + 2).astype(np.int64)
    strides = np.array([int(np.prod(dims[d + 1:])) for d in range(5)], dtype=np.int64)
    index = (base.astype(np.int64) @ strides)[:, None] + (CORNERS.astype(np.int64) @ strides)[None, :]  # (N, 32)
    weight = np.prod((1 - frac)[:, None, :] + CORNERS[None] * (2 * frac - 1)[:, None, :], axis=2)  # (N, 32)
    cells = int(np.prod(dims))
    taps = grid_blur_weights()

    def bilateral(values: np.ndarray) -> np.ndarray:  # (N, C) -> (N, C): slice(blur(splat(values)))
        grid = np.zeros((cells, values.shape[1]), np.float32)
        np.add.at(grid, index.ravel(), (weight[:, :, None] * values[:, None, :]).reshape(-1, values.shape[1]))
        grid = grid.reshape(*dims, values.shape[1])
        for axis in range(5):
            grid = _blur_axis(grid, taps, axis)
        return (grid.reshape(cells, -1)[index] * weight[:, :, None]).sum(axis=1)

    gtaps = _gaussian_taps(float(gs))

    def gaussian(maps: np.ndarray) -> np.ndarray:  # (C, H, W)
        return _blur_axis(_blur_axis(maps, gtaps, 1), gtaps, 2)

    norm_b = 1 / np.sqrt(bilateral(np.ones((n, 1), np.float32)) + np.float32(1e-20))  # (N, 1)
    norm_g = 1 / np.sqrt(gaussian(np.ones((1, h, w), np.float32)) + np.float32(1e-20))  # (1, H, W)
    one_b = norm_b * bilateral(norm_b)  # Kn 1
    one_g = norm_g * gaussian(norm_g)
    logit = _unary_logit(probs)
    q = 1 / (1 + np.exp(-logit))
    for _ in range(iterations):
        msg_g = norm_g * gaussian(norm_g * q)
        flat = q.reshape(k, n).T  # (N, K)
        msg_b = (norm_b * bilateral(norm_b * flat)).T.reshape(k, h, w)
        a = logit + gc * (2 * msg_g - one_g) + bc * (2 * msg_b - one_b.reshape(1, h, w))
        q = (1 / (1 + np.exp(-a))).astype(np.float32)
    return q.astype(np.float32)


# ------------------------------------------------------------------------------------- graph
def build_crf_graph(iterations: int = 5, opset: int = 18):
    """The CRF as an ``onnx.ModelProto`` (see the module docstring for its inputs and output)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counter = itertools.count()

    def const(value, dtype=np.float32) -> str:
        name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(kind: str, *inputs: str, **attrs) -> str:
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def scalar(name: str, i: int) -> str:  # kernel[i] as a () tensor
        return op("Squeeze", op("Slice", name, const([i], np.int64), const([i + 1], np.int64)), const([0], np.int64))

    i64 = lambda v: const(v, np.int64)  # noqa: E731
    gs, gc, bs, br, bc = (scalar("kernel", i) for i in range(5))

    # ---- image-dependent part: features, cells, corners and weights
    shape = op("Shape", "rgb")
    h, w = op("Slice", shape, i64([0]), i64([1])), op("Slice", shape, i64([1]), i64([2]))  # (1,) each
    hw = op("Concat", h, w, axis=0)
    n = op("Mul", h, w)
    rgb = op("Reshape", op("Cast", "rgb", to=TensorProto.FLOAT), op("Concat", n, i64([3]), axis=0))  # (N, 3)
    rows = op("Cast", op("Range", i64(0), op("Squeeze", h, i64([0])), i64(1)), to=TensorProto.FLOAT)
    cols = op("Cast", op("Range", i64(0), op("Squeeze", w, i64([0])), i64(1)), to=TensorProto.FLOAT)
    ones_hw = op("ConstantOfShape", hw, value=numpy_helper.from_array(np.ones(1, np.float32)))
    y = op("Reshape", op("Mul", ones_hw, op("Unsqueeze", rows, i64([1]))), i64([-1, 1]))
    x = op("Reshape", op("Mul", ones_hw, op("Unsqueeze", cols, i64([0]))), i64([-1, 1]))
    feats = op("Concat", op("Div", x, bs), op("Div", y, bs), op("Div", rgb, br), axis=1)  # (N, 5)
    feats = op("Sub", feats, op("Floor", op("ReduceMin", feats, i64([0]), keepdims=1)))
    base = op("Floor", feats)
    frac = op("Sub", feats, base)
    dims = op("Cast", op("Add", op("Floor", op("ReduceMax", feats, i64([0]), keepdims=0)), const(2.0)),
              to=TensorProto.INT64)  # (5,)
    d = [op("Slice", dims, i64([a]), i64([a + 1])) for a in range(5)]
    s3 = d[4]
    s2 = op("Mul", d[3], s3)
    s1 = op("Mul", d[2], s2)
    s0 = op("Mul", d[1], s1)
    strides = op("Concat", s0, s1, s2, s3, i64([1]), axis=0)  # (5,)
    cells = op("Mul", d[0], s0)  # (1,)
    strides_col = op("Unsqueeze", strides, i64([1]))  # (5, 1)
    base_index = op("MatMul", op("Cast", base, to=TensorProto.INT64), strides_col)  # (N, 1)
    corner_index = op("Reshape", op("MatMul", i64(CORNERS.astype(np.int64)), strides_col), i64([1, 32]))
    index = op("Add", base_index, corner_index)  # (N, 32)
    flat_index = op("Reshape", index, i64([-1, 1]))  # (N*32, 1)
    one_minus = op("Unsqueeze", op("Sub", const(1.0), frac), i64([1]))  # (N, 1, 5)
    slope = op("Unsqueeze", op("Sub", op("Mul", const(2.0), frac), const(1.0)), i64([1]))
    weight = op("ReduceProd", op("Add", one_minus, op("Mul", const(CORNERS[None]), slope)), i64([2]),
                keepdims=0)  # (N, 32)
    weight_col = op("Unsqueeze", weight, i64([2]))  # (N, 32, 1)
    weight_line = op("Unsqueeze", weight, i64([1]))  # (N, 1, 32)
    taps = grid_blur_weights()

    kernels = [const(taps.reshape(shape)) for shape in ((1, 1, 5, 1, 1), (1, 1, 1, 5, 1), (1, 1, 1, 1, 5))]
    conv_pads = [[2, 0, 0, 2, 0, 0], [0, 2, 0, 0, 2, 0], [0, 0, 2, 0, 0, 2]]

    def blur_grid(grid: str) -> str:
        """(C, d0..d4) -> the same, blurred along each grid axis (5 taps, zeros outside): 3-D
        convolutions of one channel, over (d2, d3, d4) and then over (d0, d1, rest)."""
        colour = op("Reshape", grid, op("Concat", i64([-1, 1]), d[2], d[3], d[4], axis=0))
        for a in range(3):
            colour = op("Conv", colour, kernels[a], pads=conv_pads[a])
        space = op("Reshape", colour, op("Concat", i64([-1, 1]), d[0], d[1], s1, axis=0))
        for a in range(2):
            space = op("Conv", space, kernels[a], pads=conv_pads[a])
        return space

    def bilateral(values: str, scatter_index: str) -> str:
        """(C, N) -> (C, N): slice(blur(splat(values))), channels first; ``scatter_index``: the
        cell of each (pixel corner, channel), (N*32, C). The per-pixel products with the 32 corner
        weights are batched matrix products (one (32, 1) x (1, C) per pixel). The splat is a
        ScatterElements: onnxruntime's CPU ScatterND with reduction runs on several threads
        without atomics and loses updates (microsoft/onnxruntime#18048); ScatterElements is
        sequential there, atomic on CUDA."""
        channels = op("Slice", op("Shape", values), i64([0]), i64([1]))
        per_pixel = op("Unsqueeze", op("Transpose", values, perm=[1, 0]), i64([1]))  # (N, 1, C)
        updates = op("Reshape", op("MatMul", weight_col, per_pixel), op("Concat", i64([-1]), channels, axis=0))
        zeros = op("ConstantOfShape", op("Concat", cells, channels, axis=0),
                   value=numpy_helper.from_array(np.zeros(1, np.float32)))
        grid = op("ScatterElements", zeros, scatter_index, updates, axis=0, reduction="add")  # (G, C)
        grid = op("Reshape", op("Transpose", grid, perm=[1, 0]), op("Concat", channels, dims, axis=0))
        grid = op("Transpose", op("Reshape", blur_grid(grid), op("Concat", channels, cells, axis=0)), perm=[1, 0])
        sliced = op("Gather", grid, index, axis=0)  # (N, 32, C)
        out = op("MatMul", weight_line, sliced)  # (N, 1, C)
        return op("Transpose", op("Squeeze", out, i64([1])), perm=[1, 0])

    # ---- the Gaussian term: an exact separable blur, zeros outside the image
    radius = op("Cast", op("Ceil", op("Mul", gs, const(GAUSSIAN_TRUNCATE))), to=TensorProto.INT64)
    t = op("Cast", op("Range", op("Neg", radius), op("Add", radius, i64(1)), i64(1)), to=TensorProto.FLOAT)
    gtaps = op("Exp", op("Neg", op("Div", op("Mul", t, t), op("Mul", const(2.0), op("Mul", gs, gs)))))
    wx = op("Reshape", gtaps, i64([1, 1, 1, -1]))
    wy = op("Reshape", gtaps, i64([1, 1, -1, 1]))
    r1 = op("Unsqueeze", radius, i64([0]))
    zero1 = i64([0])
    pads_x = op("Concat", zero1, zero1, zero1, r1, zero1, zero1, zero1, r1, axis=0)
    pads_y = op("Concat", zero1, zero1, r1, zero1, zero1, zero1, r1, zero1, axis=0)

    def gaussian(maps: str) -> str:
        """(C, 1, H, W) -> (C, 1, H, W)."""
        return op("Conv", op("Pad", op("Conv", op("Pad", maps, pads_x), wx), pads_y), wy)

    eps = const(1e-20)
    ones_1n = op("ConstantOfShape", op("Concat", i64([1]), n, axis=0), value=numpy_helper.from_array(np.ones(1, np.float32)))
    norm_b = op("Reciprocal", op("Sqrt", op("Add", bilateral(ones_1n, flat_index), eps)))  # (1, N)
    one_b = op("Mul", norm_b, bilateral(norm_b, flat_index))  # (1, N): Kn 1
    ones_g = op("Unsqueeze", ones_hw, i64([0, 1]))  # (1, 1, H, W)
    norm_g = op("Reciprocal", op("Sqrt", op("Add", gaussian(ones_g), eps)))
    one_g = op("Mul", norm_g, gaussian(norm_g))

    # ---- unary and mean-field, instances as channels
    p = op("Clip", "probs", const(0.0), const(1.0))
    tiny = const(1e-10)
    fg = op("Where", op("Equal", p, const(0.0)), tiny, p)
    bg = op("Sub", const(1.0), p)
    bg = op("Where", op("Equal", bg, const(0.0)), tiny, bg)
    logit = op("Unsqueeze", op("Sub", op("Log", fg), op("Log", bg)), i64([1]))  # (K, 1, H, W)
    k = op("Slice", op("Shape", "probs"), i64([0]), i64([1]))
    maps_shape = op("Concat", k, i64([1]), hw, axis=0)
    flat_shape = op("Concat", k, n, axis=0)
    index_k = op("Expand", flat_index, op("Concat", i64([1]), k, axis=0))  # (N*32, K)
    q = op("Sigmoid", logit)
    one_b_map = op("Reshape", one_b, op("Concat", i64([1, 1]), hw, axis=0))
    for _ in range(iterations):
        msg_g = op("Mul", norm_g, gaussian(op("Mul", norm_g, q)))
        msg_b = op("Mul", norm_b, bilateral(op("Mul", norm_b, op("Reshape", q, flat_shape)), index_k))  # (K, N)
        msg_b = op("Reshape", msg_b, maps_shape)
        pair_g = op("Mul", gc, op("Sub", op("Mul", const(2.0), msg_g), one_g))
        pair_b = op("Mul", bc, op("Sub", op("Mul", const(2.0), msg_b), one_b_map))
        q = op("Sigmoid", op("Add", logit, op("Add", pair_g, pair_b)))
    nodes.append(helper.make_node("Squeeze", [q, i64([1])], ["foreground"]))

    graph = helper.make_graph(
        nodes, "iam_dense_crf",
        [helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["H", "W", 3]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["K", "H", "W"]),
         helper.make_tensor_value_info("kernel", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("foreground", TensorProto.FLOAT, ["K", "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="iam")
    model.ir_version = 8
    model.metadata_props.add(key="iam.crf.iterations", value=str(iterations))
    return model


# ----------------------------------------------------------------------------------- session
MAX_GRID_CELLS = 1 << 26  # about 256 MB a channel; the reference's kernels need ~0.5-1 M


def grid_cells(rgb: np.ndarray, kernel) -> int:
    """The bilateral grid's cell count for this image and kernel (as the graph sizes it)."""
    h, w = rgb.shape[:2]
    sxy, srgb = float(kernel[2]), float(kernel[3])
    spans = [(w - 1) / sxy, (h - 1) / sxy]
    if rgb.size:
        lo, hi = rgb.reshape(-1, 3).min(axis=0) / srgb, rgb.reshape(-1, 3).max(axis=0) / srgb
        spans += [float(b) - np.floor(a) for a, b in zip(lo, hi)]
    return int(np.prod([np.floor(span) + 2 for span in spans]))
class CRFGraph:
    """The CRF graph in an onnxruntime session of its own (thread-safe: one per process is
    enough). ``source``: a bundle's crf.onnx, or None to build the graph in memory (bundles made
    before the graph existed)."""

    def __init__(self, source: str | None, iterations: int, providers: tuple[str, ...] = ()):
        import onnxruntime as ort

        if source is not None:
            model = source
        else:
            try:
                model = build_crf_graph(iterations).SerializeToString()
            except ImportError as exc:
                raise RuntimeError(f"the CRF graph is built with the onnx package ({exc}): pip install onnx, "
                                   "or add the graph to the bundle with: iam-export crf BUNDLE") from None
        available = ort.get_available_providers()
        chosen = [p for p in (providers or default_crf_providers()) if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=chosen)
        self.providers = tuple(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.iterations = int(meta.get("iam.crf.iterations", iterations))
        if self.iterations != iterations:
            raise ValueError(f"the CRF graph {source} runs {self.iterations} mean-field iterations, the run asks for "
                             f"{iterations}: write it again with iam-export crf BUNDLE --force")

    def foreground(self, rgb: np.ndarray, probs: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        """rgb (H, W, 3) uint8, probs (K, H, W) -> (K, H, W) float32 refined q(foreground)."""
        cells = grid_cells(rgb, kernel)
        if cells > MAX_GRID_CELLS:
            raise ValueError(f"the bilateral grid for this image and kernel {np.asarray(kernel).tolist()} would have "
                             f"{cells:,} cells (at most {MAX_GRID_CELLS:,}): the bilateral widths are far below "
                             "the reference's (sxy 80, srgb 13)")
        feeds = {"rgb": np.ascontiguousarray(rgb, dtype=np.uint8),
                 "probs": np.ascontiguousarray(probs, dtype=np.float32),
                 "kernel": np.asarray(kernel, dtype=np.float32)}
        return self.session.run(None, feeds)[0]


def default_crf_providers() -> tuple[str, ...]:
    """CUDA where onnxruntime has it (TensorRT cannot take a scatter with reduction), else CPU."""
    import onnxruntime as ort

    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers())


_SESSIONS: dict[tuple, CRFGraph] = {}


def crf_graph(source: str | None, iterations: int, providers: tuple[str, ...] = ()) -> CRFGraph:
    """This process's session of a CRF graph (made on first use)."""
    key = (source, iterations, tuple(providers))
    if key not in _SESSIONS:
        _SESSIONS[key] = CRFGraph(source, iterations, providers)
    return _SESSIONS[key]
