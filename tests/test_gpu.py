"""The GPU paths, on a machine with an NVIDIA GPU: torch on CUDA (peak backprop, the propagation
op, training with mixed precision) and the runtime on onnxruntime's CUDA provider, each against
the CPU. Every test skips, saying what is missing, where its GPU stack is absent. (The native
TensorRT engines are tested in test_export.)"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from .conftest import randomise_batchnorm

CUDA_REASON = None if torch.cuda.is_available() else "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))


@pytest.fixture
def exact_fp32():
    """cuDNN's TF32 convolutions (torch's default) round to 10 mantissa bits; the parity tests
    compare fp32 with fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
def test_peak_backprop_on_cuda_matches_the_cpu_oracle(exact_fp32):
    from iam_train.models.backbone import ResNetFCN
    from iam_train.models.peak_backprop import PeakBackprop, reference_peak_response_maps
    from iam_train.models.peaks import find_peaks

    torch.manual_seed(0)
    model = ResNetFCN("resnet50", num_classes=4).eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(0))
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = find_peaks(model(image).crm, upsample_factor=8, max_peaks=5)
    peaks = found.coords[0, : found.counts[0]]
    oracle = reference_peak_response_maps(model, image, peaks, upsample_factor=8)
    with torch.no_grad():
        ours = PeakBackprop(model.cuda(), upsample_factor=8)(image.cuda(), peaks.cuda()).cpu()
    rel = (ours - oracle).abs().amax(dim=(1, 2)) / oracle.abs().amax(dim=(1, 2))
    assert len(peaks) == 5 and (rel < 1e-4).all(), rel


@needs_cuda
def test_propagation_on_cuda_matches_cpu_with_gradients():
    from iam_train.models.filling import normalise_kernels, propagate_affinity

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 20, 24, generator=g, dtype=torch.float64)
    kernels = normalise_kernels(torch.randn(1, 4 * 9, 20, 24, generator=g, dtype=torch.float64), 4)
    results = []
    for device in ("cpu", "cuda"):
        x_ = x.to(device, copy=True).requires_grad_()
        k_ = kernels.to(device, copy=True).requires_grad_()
        out = propagate_affinity(x_, k_, 12)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        results.append([t.detach().cpu() for t in (out, x_.grad, k_.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=1e-12)


@needs_cuda
@pytest.mark.slow
def test_training_on_cuda_with_mixed_precision(tmp_path):
    from click.testing import CliRunner

    from iam_train.checkpoint import load_checkpoint
    from iam_train.cli import main
    from iam_train.data.synthetic import SynthConfig, generate

    data = generate(tmp_path / "data", SynthConfig(images=16, size=64, seed=2, proposals_per_image=10), progress=False)

    def invoke(*args):
        result = CliRunner().invoke(main, [*args, "--device", "cuda", "--workers", "0", "--no-progress"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output

    invoke("prm", "--data", str(data), "--out", str(tmp_path / "prm"), "--backbone", "resnet18", "--image-size", "64",
           "--batch-size", "4", "--epochs", "2", "--bn-batches", "2")
    config = tmp_path / "f.yaml"
    config.write_text("hidden: 8\nsteps: 4\nmax_peaks_per_image: 2\nbatch_size: 4\nbn_recalibration_batches: 2\n")
    invoke("filling", "--data", str(data), "--prm", str(tmp_path / "prm"), "--out", str(tmp_path / "filling"),
           "--config", str(config), "--epochs", "2")
    for stage, kind in (("prm", "iam-prm"), ("filling", "iam-filling")):
        ckpt = load_checkpoint(tmp_path / stage / "last.pt", kind)  # loads on the CPU
        assert ckpt["epoch"] == 2
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), stage
        with open(tmp_path / stage / "metrics.csv") as f:
            losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
        assert len(losses) == 2 and np.isfinite(losses).all(), (stage, losses)


def _onnxruntime_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return CUDA_REASON


@pytest.mark.slow
@pytest.mark.skipif(_onnxruntime_cuda_reason() is not None, reason=str(_onnxruntime_cuda_reason()))
def test_runtime_on_onnxruntime_cuda_matches_cpu(trained_bundle, synthetic, tmp_path):
    from pycocotools import mask as mask_utils

    from iam_runtime.backends import OnnxRuntimeBackend
    from iam_runtime.bundle import load_bundle
    from iam_runtime.pipeline import InferOptions, run

    bundle = load_bundle(trained_bundle)
    cpu = OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"])
    gpu = OnnxRuntimeBackend(bundle, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.device == "gpu"
    h, w = bundle.manifest.input.size
    images = np.random.default_rng(0).normal(size=(3, 3, h, w)).astype(np.float32)
    want, got = cpu.detect(images), gpu.detect(images)
    # fp32 on both (the backend turns the CUDA provider's TF32 off); the tolerances are those
    # that held with TF32 on (measured on an H100), so they hold a fortiori.
    np.testing.assert_allclose(got["class_scores"], want["class_scores"], atol=2e-2, rtol=2e-2)
    peaks = want["peak_coords"][0, : max(int(want["peak_counts"][0]), 1)]
    m_want, m_got = cpu.segment(images[:1], peaks), gpu.segment(images[:1], peaks)
    np.testing.assert_allclose(m_got["iam"], m_want["iam"], atol=2e-2)

    # End to end on held-out images: the GPU run (CRF overlapped with the engine) gives the
    # CPU run's masks.
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in (synthetic / "ImageSets" / "Main" / "val.txt").read_text().split()[:8]:
        shutil.copy(synthetic / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    options = InferOptions(batch_size=4, crf_workers=2, progress=False)
    run(bundle, cpu, folder, tmp_path / "cpu", options)
    summary = run(bundle, gpu, folder, tmp_path / "gpu", options)
    assert summary.completed == 8 and summary.failed == 0
    preds = {key: json.loads((tmp_path / key / "predictions.json").read_text()) for key in ("cpu", "gpu")}
    assert preds["cpu"], "the trained model found no instances on held-out images"
    ious = []
    for p in preds["cpu"]:
        a = mask_utils.decode(p["segmentation"]).astype(bool)
        same = [mask_utils.decode(q["segmentation"]).astype(bool) for q in preds["gpu"]
                if q["image_id"] == p["image_id"] and q["category_id"] == p["category_id"]]
        ious.append(max([(a & b).sum() / max((a | b).sum(), 1) for b in same], default=0.0))
    assert np.mean(ious) >= 0.98, ious


def _ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDA provider here (install onnxruntime-gpu, the 'gpu' extra)"
    return CUDA_REASON


@pytest.mark.skipif(_ort_cuda_reason() is not None, reason=str(_ort_cuda_reason()))
def test_crf_graph_on_cuda_matches_the_cpu():
    """The CRF graph on onnxruntime's CUDA provider (issue 16): atomics reorder the scatter's
    sums, so q agrees to float tolerance and the masks up to pixels where q is near 0.5."""
    from iam_runtime.bundle import CRFSpec
    from iam_runtime.crf_graph import CRFGraph
    from iam_runtime.refine import crf_kernel, resolve_crf_backend

    assert resolve_crf_backend("auto") == "graph"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.clip(np.stack([xx * 0.7, yy, 255 - xx * 0.5], -1) + rng.normal(0, 8, (240, 320, 3)), 0, 255)
    rgb = rgb.astype(np.uint8)
    blob = np.exp(-((yy - 120) ** 2 + (xx - 160) ** 2) / (2 * 50.0**2))
    probs = np.stack([0.3 + 0.4 * blob, 0.5 + 0.3 * np.roll(blob, 60, axis=1)]).astype(np.float32)
    gpu = CRFGraph(None, 5, ("CUDAExecutionProvider",))
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = CRFGraph(None, 5, ("CPUExecutionProvider",))
    a = gpu.foreground(rgb, probs, crf_kernel(CRFSpec()))
    b = cpu.foreground(rgb, probs, crf_kernel(CRFSpec()))
    assert np.abs(a - b).mean() < 1e-4 and ((a > 0.5) != (b > 0.5)).mean() < 1e-3
