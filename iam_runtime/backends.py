"""Engines behind one small interface: ``detect(images)`` and ``segment(image, peaks)``.

* :class:`OnnxRuntimeBackend`: the bundle's ONNX graphs in onnxruntime, with the TensorRT EP,
  the CUDA EP or the CPU EP (the best available, or as asked). On the CPU, the segment graph's
  affinity propagation runs as one fused kernel between the graph's two halves
  (:mod:`iam_runtime.propagation`; ``propagation="graph"`` keeps the graph's own body), and
  detect and segment share each image's forward pass (:mod:`iam_runtime.staged`;
  ``share_forward=False`` runs the two graphs whole). onnxruntime-gpu falls back to the
  CPU silently when CUDA libraries are missing: the session's actual providers are checked and a
  GPU provider asked for by name that did not load is an error.
* :class:`TensorRTBackend`: the bundle's TensorRT engines, when they were built for this GPU
  and this TensorRT version (otherwise refused, with the reason; ``select_backend`` then falls
  back to onnxruntime).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .bundle import DETECT_INPUTS, DETECT_OUTPUTS, SEGMENT_INPUTS, SEGMENT_OUTPUTS, Bundle

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROPAGATIONS = ("auto", "fused", "graph")
# detect's key, when the backend shares the forward pass: each image's state for segment (a list)
FORWARD_STATE = "forward_state"


class BackendError(RuntimeError):
    """A backend that cannot run here; the message says why."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iam"


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from the pip-installed NVIDIA packages (onnxruntime-gpu >= 1.21), so
    the CUDA provider loads without LD_LIBRARY_PATH; libraries already loaded (by torch, say)
    are left as they are. Where this fails, the provider check below reports what did not load."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - a failed preload surfaces as a provider that did not load
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def _tensorrt_libraries_present() -> bool:
    """Whether TensorRT's libnvinfer loads here. onnxruntime-gpu lists its TensorRT provider
    wherever it is installed; without libnvinfer, asking for it prints a long error and falls
    back, so the automatic choice leaves it out."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


_SHARED_CPU_ARENA = False  # registered with onnxruntime's environment, once per process


def _use_shared_cpu_arena(ort, options) -> None:
    """Sessions made with ``options`` take their CPU memory from one arena shared by the process,
    and plan it run by run.

    Each session has its own arena otherwise, and memory one stage frees stays with it while
    the next stage grows its own: resnet50@448, 5 peaks, the shared forward's sessions peaked
    at 3.8 GB against 2.6 GB shared. And onnxruntime's memory pattern, recorded per input
    shape, made the first two runs at each new number of peaks slow instead of the first
    (the peak stage 1.7, 1.7, then 0.87 s): ten photos with 1 to 5 peaks each took 16.5 s
    against 13.3 s with both changes, the same steady state."""
    global _SHARED_CPU_ARENA
    if not _SHARED_CPU_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _SHARED_CPU_ARENA = True
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = False


def cut_graph_session(ort, model, options, **session_args):
    """An InferenceSession of a cut graph's ModelProto (consumed), its large weights handed to
    onnxruntime beside the serialised graph (:func:`~iam_runtime.graph_split.detach_weights`)."""
    from .graph_split import detach_weights

    data, weights = detach_weights(model)
    # The OrtValues point into the arrays, which onnxruntime copies when it builds the session:
    # ``weights`` must outlive that.
    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
    return ort.InferenceSession(data, sess_options=options, **session_args)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, cache_dir: Path | None = None,
                 threads: int = 0, tf32: bool = False, propagation: str = "auto", share_forward: bool | None = None):
        """``tf32``: let the CUDA provider run fp32 convolutions and GEMMs in TF32 (10-bit mantissa).
        Off by default: on an H100 it lowered the final masks' agreement with the reference from
        1.00 (CPU) to 0.93 mean IoU (resnet50@448, full-resolution CRF).
        ``propagation``: ``fused`` runs the filling's propagation as the fused CPU kernel (CPU
        provider only), ``graph`` as the segment graph's own nodes, ``auto`` fused where it can.
        ``share_forward``: detect on the segment graph's forward pass, kept for the image's segment
        (CPU provider only; None: where the bundle's graphs allow it)."""
        import onnxruntime as ort

        if propagation not in PROPAGATIONS:
            raise BackendError(f"unknown propagation {propagation!r} ({', '.join(PROPAGATIONS)})")

        available = ort.get_available_providers()
        asked = list(providers) if providers else None
        if asked:
            unknown = [p for p in asked if p not in available]
            if unknown:
                raise BackendError(f"onnxruntime here has no {', '.join(unknown)} (available: {', '.join(available)})")
            chosen = asked
        else:
            chosen = [p for p in (*GPU_PROVIDERS, "CPUExecutionProvider") if p in available
                      and (p != "TensorrtExecutionProvider" or _tensorrt_libraries_present())]
        if any(p in GPU_PROVIDERS for p in chosen):
            _preload_cuda_libraries(ort)
        cache = (cache_dir or default_cache_dir()) / "trt-ep" / bundle.manifest.graphs["detect"].sha256[:16]
        options = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                cache.mkdir(parents=True, exist_ok=True)
                options.append({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                                "trt_fp16_enable": bundle.manifest.graphs["detect"].precision == "fp16"})
            elif p == "CUDAExecutionProvider":
                options.append({"use_tf32": "1" if tf32 else "0"})
            else:
                options.append({})

        def session(model):
            """A session of ``model``: a path, or a cut graph's ModelProto (which this consumes: its
            weights go to onnxruntime beside the serialised graph, not through it)."""
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = threads
            # Idle intra-op threads would otherwise spin between operators, taking the cores the
            # CRF worker processes need (measured: 4.2 s/image spinning vs 3.1 s not, 2 cores).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            if not any(p in GPU_PROVIDERS for p in chosen):
                _use_shared_cpu_arena(ort, so)
            if not isinstance(model, str):
                return cut_graph_session(ort, model, so, providers=chosen, provider_options=options)
            return ort.InferenceSession(model, sess_options=so, providers=chosen, provider_options=options)

        self.fused_propagation = self._use_fused(propagation, chosen)
        if self.fused_propagation:
            from .propagation import load_kernel_in_background

            kernel_loading = load_kernel_in_background()
        self.shared = self._shared_forward(bundle, share_forward, chosen, session, threads)
        if self.shared is not None:
            self.sessions = {"image": self.shared.image_stage}
        else:
            self.sessions = {"detect": session(str(bundle.graph_path("detect")))}
            if self.fused_propagation:
                import onnx

                from .propagation import FusedSegmentGraph

                self.sessions["segment"] = FusedSegmentGraph(onnx.load(str(bundle.graph_path("segment"))), session,
                                                             threads)
            else:
                self.sessions["segment"] = session(str(bundle.graph_path("segment")))
        actual = next(iter(self.sessions.values())).get_providers()
        missing_gpu = [p for p in chosen if p in GPU_PROVIDERS and p not in actual]
        if missing_gpu:
            message = (f"{', '.join(missing_gpu)} did not load (CUDA/TensorRT libraries missing or no GPU); "
                       f"onnxruntime is running on {', '.join(actual)}")
            if asked:
                raise BackendError(message)
            log.warning(message)
        self.providers = actual
        if self.fused_propagation:
            kernel_loading.join()

    @staticmethod
    def _use_fused(propagation: str, providers: list[str]) -> bool:
        from .propagation import fused_kernel_unavailable

        if propagation == "graph":
            return False
        if any(p in GPU_PROVIDERS for p in providers):
            if propagation == "fused":
                raise BackendError("the fused propagation is a CPU kernel; with a GPU provider use propagation "
                                   "'graph' (or 'auto')")
            return False
        reason = fused_kernel_unavailable()
        if reason and propagation == "fused":
            raise BackendError(f"the fused propagation cannot run here: {reason}")
        if reason:
            log.warning("%s; the propagation runs as the segment graph's own nodes", reason)
        return reason is None

    def _shared_forward(self, bundle: Bundle, share: bool | None, providers: list[str], session, threads: int):
        """The :class:`~iam_runtime.staged.SharedForward` to run, or None for the two graphs whole."""
        if share is False:
            return None
        if any(p in GPU_PROVIDERS for p in providers):
            if share:
                raise BackendError("the shared forward pass keeps each image's activations in host memory: it is "
                                   "for the CPU provider; with a GPU provider leave it off")
            return None
        import onnx

        from .staged import SharedForward, shared_forward_unavailable

        detect, segment = (onnx.load(str(bundle.graph_path(k))) for k in ("detect", "segment"))
        reason = shared_forward_unavailable(detect, segment)
        if reason is None:
            try:
                return SharedForward(detect, segment, session, self.fused_propagation, threads)
            except ValueError as exc:  # graphs this runtime does not know how to cut
                reason = str(exc)
        if share:
            raise BackendError(f"this bundle cannot share the forward pass: {reason}")
        log.info("%s: detect and segment each run the backbone (re-export the bundle to share it)", reason)
        return None

    @property
    def device(self) -> str:
        return "gpu" if any(p in GPU_PROVIDERS for p in self.providers) else "cpu"

    def describe(self) -> str:
        fused = ", fused propagation" if self.fused_propagation else ""
        shared = ", shared forward" if self.shared is not None else ""
        return f"onnxruntime ({', '.join(self.providers)}{fused}{shared})"

    def detect(self, images: np.ndarray) -> dict:
        """The detect graph's outputs; with the shared forward also :data:`FORWARD_STATE`."""
        if self.shared is not None:
            out, states = self.shared.detect(images)
            return {**out, FORWARD_STATE: states}
        out = self.sessions["detect"].run(list(DETECT_OUTPUTS), dict(zip(DETECT_INPUTS, [images])))
        return dict(zip(DETECT_OUTPUTS, out))

    def segment(self, image: np.ndarray, peaks: np.ndarray, state: dict | None = None) -> dict[str, np.ndarray]:
        """``state``: the image's entry of detect's :data:`FORWARD_STATE`; an empty dict is filled
        here, for the image's later chunks of peaks (None: computed and dropped)."""
        if self.shared is not None:
            return self.shared.segment(image, peaks, state)
        out = self.sessions["segment"].run(list(SEGMENT_OUTPUTS), dict(zip(SEGMENT_INPUTS, [image, peaks])))
        return dict(zip(SEGMENT_OUTPUTS, out))


class TensorRTBackend:
    """Native TensorRT engines (tensorrt + cuda-python)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise BackendError(f"TensorRT backend needs the 'gpu' extra (tensorrt, cuda-python): {exc}") from None
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise BackendError("TensorRT backend: no CUDA GPU visible")
        err, props = cudart.cudaGetDeviceProperties(0)
        gpu = props.name.decode().rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        capability = f"{props.major}.{props.minor}"
        self.trt, self.cudart = trt, cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for key in ("detect", "segment"):
            spec = next((e for e in bundle.manifest.engines if e.graph == key), None)
            if spec is None:
                raise BackendError(f"the bundle has no TensorRT engine for {key!r} (run: iam-export tensorrt BUNDLE)")
            if (spec.gpu, spec.compute_capability) != (gpu, capability):
                raise BackendError(f"the {key} engine was built for {spec.gpu} (sm {spec.compute_capability}); "
                                   f"this GPU is {gpu} (sm {capability})")
            if spec.tensorrt_version != trt.__version__:
                raise BackendError(f"the {key} engine was built with TensorRT {spec.tensorrt_version}; "
                                   f"this is TensorRT {trt.__version__}")
            engine = self.runtime.deserialize_cuda_engine((bundle.root / spec.file).read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not load {spec.file}")
            self.engines[key] = engine
            self.contexts[key] = engine.create_execution_context()
        err, self.stream = cudart.cudaStreamCreate()
        self.gpu = gpu

    @property
    def device(self) -> str:
        return "gpu"

    def describe(self) -> str:
        return f"TensorRT {self.trt.__version__} on {self.gpu}"

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise BackendError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def _run(self, key: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        engine, context = self.engines[key], self.contexts[key]
        buffers = []
        try:
            for name, array in inputs.items():
                array = np.ascontiguousarray(array)
                context.set_input_shape(name, array.shape)
                ptr = self._check(cudart.cudaMalloc(array.nbytes))
                buffers.append(ptr)
                self._check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                context.set_tensor_address(name, ptr)
            # Every output needs an address (the segment engine's crm too), only the asked ones come back.
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            device, host = {}, {}
            for name in (n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT):
                array = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
                if name in outputs:
                    host[name] = array
                device[name] = self._check(cudart.cudaMalloc(max(array.nbytes, 1)))
                buffers.append(device[name])
                context.set_tensor_address(name, device[name])
            if not context.execute_async_v3(self.stream):
                raise BackendError(f"TensorRT failed to run the {key} engine")
            for name in outputs:
                self._check(cudart.cudaMemcpyAsync(host[name].ctypes.data, device[name], host[name].nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            self._check(cudart.cudaStreamSynchronize(self.stream))
            return {name: host[name] for name in outputs}
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)

    def detect(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._run("detect", dict(zip(DETECT_INPUTS, [images])), DETECT_OUTPUTS)

    def segment(self, image: np.ndarray, peaks: np.ndarray, state: dict | None = None) -> dict[str, np.ndarray]:
        return self._run("segment", dict(zip(SEGMENT_INPUTS, [image, peaks])), SEGMENT_OUTPUTS)


def select_backend(bundle: Bundle, backend: str = "auto", providers: list[str] | None = None,
                   cache_dir: Path | None = None, threads: int = 0, tf32: bool = False, propagation: str = "auto",
                   share_forward: bool | None = None):
    """``auto``: native TensorRT when the bundle has engines for this GPU, else onnxruntime."""
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise BackendError(f"unknown backend {backend!r} (auto, onnxruntime, tensorrt)")
    if backend == "tensorrt" or (backend == "auto" and bundle.manifest.engines):
        try:
            return TensorRTBackend(bundle)
        except BackendError as exc:
            log.warning("%s; using the ONNX graphs with onnxruntime instead", exc)
    return OnnxRuntimeBackend(bundle, providers, cache_dir, threads, tf32, propagation, share_forward)
