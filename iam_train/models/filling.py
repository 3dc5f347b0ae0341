"""Instance extent filling (IAM, docs/method.md, section 3).

A feature pyramid over backbone features (c2, c3, c4) predicts, at every pixel of the
stride-4 grid, D kernels of k x k affinity weights, each normalised to sum 1. The peak response
map is encoded to D channels on that grid, propagated T times by ``iam::propagate_affinity``
and decoded to one instance activation map in [0, 1] at the input resolution.

Module and parameter names follow the reference implementation, so its released
``model_filling_latest.pth.tar`` loads directly (see ``reference_checkpoint``). Two properties of
a checkpoint decide what its network computes at inference, and travel with it:

* ``align_corners`` of the feature pyramid's bilinear upsampling (the reference: True; our
  checkpoints trained before this was recorded: False);
* ``normalization``: ``"running"`` (BatchNorm on running statistics, as our training
  recalibrates them) or ``"batch"`` (the reference's inference: every BatchNorm normalises with
  the statistics of what it is processing; the kernel branch with the image's features, the
  encoder and decoder with all of the image's peaks together, so each peak's map depends on the
  other peaks of its image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _propagate_impl(x: Tensor, kernels: Tensor, steps: int) -> Tensor:
    """x: (N, D, H, W); kernels: (N or 1, D*k*k, H, W), channel d*k*k + i*k + j weighting the
    neighbour at offset (i - k//2, j - k//2). Zero padding at the border."""
    n, d, h, w = x.shape
    kk = kernels.shape[1] // d
    k = math.isqrt(kk)
    if k * k * d != kernels.shape[1] or k % 2 == 0:
        raise ValueError(f"kernels have {kernels.shape[1]} channels: not D={d} times an odd k*k")
    r = k // 2
    weights = kernels.view(kernels.shape[0], d, kk, h, w)
    for _ in range(steps):
        padded = F.pad(x, (r, r, r, r))
        acc = weights[:, :, 0] * padded[:, :, :h, :w]
        for i in range(1, kk):
            dy, dx = divmod(i, k)
            acc = acc + weights[:, :, i] * padded[:, :, dy : dy + h, dx : dx + w]
        x = acc
    return x


@torch.library.custom_op("iam::propagate_affinity", mutates_args=())
def propagate_affinity_op(x: Tensor, kernels: Tensor, steps: int) -> Tensor:
    return _propagate_impl(x, kernels, steps)


@propagate_affinity_op.register_fake
def _(x, kernels, steps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, kernels, steps = inputs
    ctx.save_for_backward(x, kernels)
    ctx.steps = steps


def _backward(ctx, grad):
    # Recompute the T steps with autograd (activation checkpointing): memory for one pass.
    x, kernels = ctx.saved_tensors
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
        k_ = kernels.detach().requires_grad_(ctx.needs_input_grad[1])
        out = _propagate_impl(x_, k_, ctx.steps)
        wrt = [t for t in (x_, k_) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad)) if wrt else iter(())
    gx = next(grads) if ctx.needs_input_grad[0] else None
    gk = next(grads) if ctx.needs_input_grad[1] else None
    return gx, gk, None


propagate_affinity_op.register_autograd(_backward, setup_context=_setup_context)


def propagate_affinity(x: Tensor, kernels: Tensor, steps: int) -> Tensor:
    """T steps of x(p) <- sum_{q in kxk(p)} w_p(q) x(q), per channel. Shapes as in
    :func:`_propagate_impl`; returns (N, D, H, W)."""
    return propagate_affinity_op(x, kernels, steps)


def normalise_kernels(raw: Tensor, channels: int) -> Tensor:
    """(B, D*k*k, H, W) raw weights -> each k x k kernel divided by its sum (a zero sum by 1)."""
    b, _, h, w = raw.shape
    grouped = raw.view(b, channels, -1, h, w)
    total = grouped.sum(dim=2, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)
    return (grouped / total).view(b, -1, h, w)


NORMALIZATIONS = ("running", "batch")


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters and buffers) whose inference can use the statistics of
    the batch at hand: ``batch_statistics`` True in eval mode computes what torch's train-mode
    BatchNorm with momentum 0 computes (biased variance; running statistics neither used nor
    updated), in plain ops that export to ONNX. Training is torch's BatchNorm unchanged.

    The statistics are exact means, taken so that an engine that sums in float32 one element
    after the other (onnxruntime's ReduceMean) stays accurate: of the input shifted by one of
    its own values per channel (values far from zero keep their spread), and one axis at a time
    (sums of a few hundred values, not of P x H x W: measured on the encoder at 448 px, relative
    error 6e-5 reduced over all axes at once, against 1e-6 in PyTorch)."""

    batch_statistics: bool = False

    @staticmethod
    def _mean(x: Tensor) -> Tensor:
        return x.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=0, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.batch_statistics:
            return super().forward(x)
        shifted = x - x[:1, :, :1, :1]
        centred = shifted - self._mean(shifted)
        var = self._mean(centred.square())
        scale = self.weight[None, :, None, None] * torch.rsqrt(var + self.eps)
        return centred * scale + self.bias[None, :, None, None]


class ConvNorm(nn.Sequential):
    """conv (or transposed conv) -> :class:`BatchNorm2d` -> any further layers (activation,
    pooling); parameter names as a plain ``nn.Sequential``.

    With batch statistics the conv's bias is left out: the normalisation removes any per-channel
    constant exactly, and adding it first costs float32 digits of the signal. The encoder's first
    conv sees peak response maps, which sum to 1, so its bias is some 1e5 times the signal there:
    with the bias added, onnxruntime's maps and PyTorch's differed by 5e-3 at 448 px, each
    1e-3 or more from float64."""

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, *rest = self
        if norm.batch_statistics and not norm.training and conv.bias is not None:
            if isinstance(conv, nn.ConvTranspose2d):
                x = F.conv_transpose2d(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding,
                                       conv.groups, conv.dilation)
            else:
                x = conv._conv_forward(x, conv.weight, None)
        else:
            x = conv(x)
        x = norm(x)
        for layer in rest:
            x = layer(x)
        return x


def _conv_bn(cin: int, cout: int, k: int) -> ConvNorm:
    return ConvNorm(nn.Conv2d(cin, cout, k, padding=k // 2), BatchNorm2d(cout))


class FeaturePyramid(nn.Module):
    """(c2, c3, c4) -> (B, D*k*k, H/4, W/4) non-negative raw affinity weights."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, width: int = 256,
                 align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        c2, c3, c4 = in_channels
        self.toplayer = nn.Conv2d(c4, width, 1)
        self.latlayer3 = _conv_bn(c3, width, 1)
        self.latlayer2 = _conv_bn(c2, width, 1)
        self.smooth3 = _conv_bn(width, width, 3)
        self.smooth2 = _conv_bn(width, out_channels, 3)

    def _upsample_add(self, top: Tensor, lateral: Tensor) -> Tensor:
        return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=self.align_corners) + lateral

    def forward(self, c2: Tensor, c3: Tensor, c4: Tensor) -> Tensor:
        p3 = self.smooth3(self._upsample_add(self.toplayer(c4), self.latlayer3(c3)))
        p2 = self.smooth2(self._upsample_add(p3, self.latlayer2(c2)))
        return F.relu(p2)


def _conv_bn_relu_pool(cin: int, cout: int) -> ConvNorm:
    return ConvNorm(nn.Conv2d(cin, cout, 3, padding=1), BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class PRMEncoder(nn.Module):
    """(P, 1, H, W) peak response maps -> (P, D, H/4, W/4)."""

    def __init__(self, channels: int = 16, hidden: int = 64):
        super().__init__()
        self.encode1 = _conv_bn_relu_pool(1, hidden)
        self.encode2 = _conv_bn_relu_pool(hidden, channels)

    def forward(self, prm: Tensor) -> Tensor:
        return self.encode2(self.encode1(prm))


def _deconv_bn(cin: int, cout: int, act: nn.Module) -> ConvNorm:
    return ConvNorm(nn.ConvTranspose2d(cin, cout, 3, padding=1), BatchNorm2d(cout), act)


class IAMDecoder(nn.Module):
    """(P, D, h, w) -> (P, 1, 4h, 4w) instance activation maps in [0, 1]."""

    def __init__(self, channels: int = 16, hidden: int = 64):
        super().__init__()
        self.decode1 = _deconv_bn(channels, channels, nn.ReLU())
        self.decode2 = _deconv_bn(channels, hidden, nn.ReLU())
        self.decode3 = _deconv_bn(hidden, 1, nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        x = self.decode1(x)
        x = self.decode2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return self.decode3(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class InstanceExtentFilling(nn.Module):
    """The filling network. Reference defaults: D = 16, k = 3, hidden 64, T = 112, pyramid
    upsampling with align_corners=True; ``normalization`` as in the module docstring (the
    reference's inference: "batch")."""

    def __init__(
        self,
        feature_channels: tuple[int, int, int] = (256, 512, 1024),
        channels: int = 16,
        kernel_size: int = 3,
        hidden: int = 64,
        steps: int = 112,
        align_corners: bool = True,
        normalization: str = "running",
    ):
        super().__init__()
        self.channels, self.kernel_size, self.steps = channels, kernel_size, steps
        self.encode = PRMEncoder(channels, hidden)
        self.feature_pyramid = FeaturePyramid(feature_channels, channels * kernel_size**2, align_corners=align_corners)
        self.decode = IAMDecoder(channels, hidden)
        self.normalization = normalization

    @property
    def align_corners(self) -> bool:
        return self.feature_pyramid.align_corners

    def architecture(self) -> dict:
        """What a checkpoint records to rebuild this network (see :meth:`from_architecture`)."""
        return {"channels": self.channels, "kernel_size": self.kernel_size, "hidden": self.decode.decode2[0].out_channels,
                "steps": self.steps, "align_corners": self.align_corners, "normalization": self.normalization}

    @classmethod
    def from_architecture(cls, feature_channels: tuple[int, int, int], arch: dict, **overrides) -> InstanceExtentFilling:
        """Rebuild from :meth:`architecture`'s record. Records written before align_corners and
        normalization were kept are of networks with align_corners=False and running statistics."""
        values = {"align_corners": False, "normalization": "running", **arch,
                  **{k: v for k, v in overrides.items() if v is not None}}
        return cls(feature_channels, values["channels"], values["kernel_size"], values["hidden"], values["steps"],
                   values["align_corners"], values["normalization"])

    @property
    def normalization(self) -> str:
        return self._normalization

    @normalization.setter
    def normalization(self, mode: str) -> None:
        if mode not in NORMALIZATIONS:
            raise ValueError(f"unknown filling normalization {mode!r}; choose one of {NORMALIZATIONS}")
        self._normalization = mode
        for m in self.modules():
            if isinstance(m, BatchNorm2d):
                m.batch_statistics = mode == "batch"

    def affinity_kernels(self, c2: Tensor, c3: Tensor, c4: Tensor) -> Tensor:
        """Backbone features of B images -> (B, D*k*k, H/4, W/4) normalised kernels."""
        return normalise_kernels(self.feature_pyramid(c2, c3, c4), self.channels)

    def forward(self, prm: Tensor, kernels: Tensor) -> Tensor:
        """prm: (P, H, W) peak response maps; kernels: (P or 1, D*k*k, H/4, W/4), the kernels
        of each peak's image. Returns (P, H, W) instance activation maps. With batch
        normalization at inference, the P peaks are normalised together: pass all the peaks of
        one image, and only those."""
        x = self.encode(prm.unsqueeze(1))
        x = propagate_affinity(x, kernels, self.steps)
        return self.decode(x).squeeze(1)
