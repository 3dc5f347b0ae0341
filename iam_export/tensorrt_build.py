"""``iam-export tensorrt``: TensorRT engines from a bundle's ONNX graphs.

Written against TensorRT's Python API (10.x and 11.x; ``tensorrt_rtx`` has the same builder
and parser API and serves as a CPU-side parse check). The ``iam`` custom ops are inlined into
their function bodies (standard ops only) before parsing, so no plugin library is needed.

Precision: TensorRT 11 is strongly typed only, so reduced precision comes from the graph (an
fp16 bundle from ``iam-export onnx --precision fp16``, INT8 from the Q/DQ nodes of an int8 bundle,
``--precision int8``); the FP16/INT8 builder flags are used only on TensorRT 10 with a weakly typed
network.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.numpy_helper

from iam_runtime.bundle import (
    REQUIRED_GRAPHS,
    EngineSpec,
    load_bundle,
    save_manifest,
    sha256_file,
)
from iam_runtime.files import atomic_write_bytes


class TensorRTUnavailable(RuntimeError):
    """No usable TensorRT (or no GPU) on this machine; the message says what is missing."""


def import_tensorrt(module: str = "tensorrt"):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"the Python module {module!r} is not installed ({exc}). Install the 'gpu' extra on a machine with an "
            "NVIDIA GPU: pip uninstall -y onnxruntime && pip install -e '.[gpu]'"
        ) from None


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of device 0, or TensorRTUnavailable."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return props.name.decode().rstrip("\x00"), f"{props.major}.{props.minor}"
    except ImportError:
        pass
    raise TensorRTUnavailable("no CUDA GPU is visible on this machine: TensorRT engines can only be built on one")


def inline_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its ``iam`` function nodes replaced by their bodies (standard ops only)."""
    from onnx import inliner

    inlined = inliner.inline_local_functions(model)
    del inlined.functions[:]
    keep = [o for o in inlined.opset_import if o.domain in ("", "ai.onnx")]
    del inlined.opset_import[:]
    inlined.opset_import.extend(keep)
    return inlined


@dataclass
class BuildOptions:
    fp16: bool = False
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    max_batch: int = 16
    opt_batch: int = 8
    max_segment_peaks: int = 64  # the segment engine's largest peak count (its profile)
    opt_segment_peaks: int = 8


def profiles_for(key: str, inputs, options: BuildOptions) -> dict[str, list[list[int]]]:
    """min/opt/max shapes of each input with a dynamic axis."""
    out = {}
    for spec in inputs:
        dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
        if None not in dims:
            continue
        lo, opt, hi = (1, options.opt_batch, options.max_batch) if key == "detect" else (1, options.opt_segment_peaks, options.max_segment_peaks)
        out[spec.name] = [[lo if d is None else d for d in dims], [opt if d is None else d for d in dims],
                          [hi if d is None else d for d in dims]]
    return out


# Standard ONNX ops that TensorRT's parser supports and that our graphs may contain.
TENSORRT_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
ConvTranspose CumSum DequantizeLinear Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND
Gemm GlobalAveragePool Greater GreaterOrEqual Identity If Less LessOrEqual Log MatMul Max MaxPool Mean Min Mod Mul
Neg Not OneHot Or Pad Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu
Reshape Resize ScatterElements ScatterND Shape Sigmoid Sign Size Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile
TopK Transpose Unsqueeze Where Xor
""".split())
TOPK_LIMIT = 3840


def static_check(model: onnx.ModelProto) -> list[str]:
    """Problems TensorRT's ONNX parser would have with the inlined model: unsupported ops,
    data-dependent shapes (NonZero), MaxPool index outputs, TopK with K > 3840."""
    inlined = inline_for_tensorrt(model)
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in inlined.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consts.update({i.name: onnx.numpy_helper.to_array(i) for i in inlined.graph.initializer})
    problems = []
    for node in inlined.graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} left after inlining")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: op not in TensorRT's supported set")
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: MaxPool index output")
        if node.op_type == "TopK":
            k = consts.get(node.input[1])
            if k is None:
                problems.append(f"{where}: K is not a constant")
            elif int(k.reshape(-1)[0]) > TOPK_LIMIT:
                problems.append(f"{where}: K = {int(k.reshape(-1)[0])} > {TOPK_LIMIT}")
    return problems


_LOGGERS: dict = {}


def parse_onnx(trt, model: onnx.ModelProto, strongly_typed: bool):
    """Builder, network and parser for a model; raises with the parser's own messages."""
    logger = _LOGGERS.setdefault(trt.__name__, trt.Logger(trt.Logger.WARNING))
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(inline_for_tensorrt(model).SerializeToString()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))
    return builder, network, parser, logger


def build_engine(trt, model: onnx.ModelProto, profiles: dict[str, list[list[int]]], options: BuildOptions) -> bytes:
    major = int(trt.__version__.split(".")[0])
    int8 = any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # an int8 bundle's Q/DQ graph
    strongly_typed = major >= 11 or not (options.fp16 or int8)
    builder, network, _, _ = parse_onnx(trt, model, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not strongly_typed:  # TensorRT 10, weakly typed: precision by builder flags
        if options.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = None
    if options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    if cache is not None:
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_bundle_engines(bundle_dir: str | Path, options: BuildOptions, log=print) -> list[EngineSpec]:
    """Build an engine per graph, write it beside the graphs and record it in the manifest."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    activations = manifest.verification.get("int8", {}).get("activations")
    if any(g.precision == "int8" for g in manifest.graphs.values()) and activations != "s8":
        raise ValueError(f"{bundle_dir} is an int8 bundle with {activations} activations; TensorRT takes symmetric "
                         "int8 only: export it with --precision int8 --int8-activations s8")
    trt = import_tensorrt()
    gpu, capability = gpu_identity()
    engines = []
    for key in REQUIRED_GRAPHS:  # the network; the CRF graph stays on onnxruntime's CUDA provider (its
        graph = manifest.graphs[key]  # scatter with reduction is nothing TensorRT takes)
        path = bundle.root / graph.file
        precision = graph.precision
        if options.fp16 and precision == "fp32":
            precision = "fp16"  # TensorRT 10 flag path; on 11 export an fp16 bundle instead
        log(f"building {key} engine ({precision}) for {gpu} (sm {capability}) ...")
        profiles = profiles_for(key, graph.inputs, options)
        blob = build_engine(trt, onnx.load(path), profiles, options)
        file = f"{key}.{precision}.sm{capability.replace('.', '')}.trt{trt.__version__}.engine"
        atomic_write_bytes(bundle.root / file, blob)
        engines.append(EngineSpec(key, file, sha256_file(bundle.root / file), gpu, capability, trt.__version__,
                                  precision, profiles))
    manifest.engines = [e for e in manifest.engines if (e.gpu, e.tensorrt_version) != (gpu, trt.__version__)] + engines
    save_manifest(bundle.root, manifest)
    return engines
