"""Export-only form of the filling network: the same maps, without its two largest tensors.

At 448 px the filling network's first encoder layer and its last decoder layer each work on a
(P, 64, 448, 448) tensor, 257 MB at 5 peaks, and on a CPU they are memory-bound: profiled
on onnxruntime (resnet50@448, 5 peaks), the ops touching those two tensors took about a third
of the segment graph's time. :func:`filling_forward` computes the same function in an order that
never materialises them more than once (the encoder) or at all (the decoder):

* :func:`pooled_conv_norm` (conv -> BatchNorm on batch statistics -> ReLU -> MaxPool): the
  statistics of the conv's output are found from the second moments of its input's patches
  where those are fewer than its channels (the encoder's first layer: 9 patch values against 64
  channels), and the affine normalisation and the ReLU run after the pooling. Both are monotone
  per channel once each channel's conv is multiplied by the sign of its BatchNorm scale, so the
  max of the normalised values is the normalised max.
* :func:`upsampled_conv_norm` (bilinear x2 -> 3x3 transposed conv -> BatchNorm -> activation):
  where the conv has fewer outputs times taps than inputs (the decoder's last layer: 1 x 9
  against 64), each tap's channel sum runs before the upsampling, which is linear and the same
  for every channel, and the taps are summed after it.

Equal to the model's modules in exact arithmetic (tested in float64 and against the reference's
own filling module in float32); layers that do not qualify run as the model's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iam_train.models import InstanceExtentFilling
from iam_train.models.filling import BatchNorm2d, ConvNorm, propagate_affinity


def _mean(x: Tensor) -> Tensor:
    return BatchNorm2d._mean(x)


def _batch_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) -> per-channel mean and biased variance, (C,) each, as the model's
    BatchNorm2d takes them (shifted by one of the tensor's own values, one axis at a time)."""
    shift = y[:1, :, :1, :1]
    shifted = y - shift
    mean = _mean(shifted)
    var = _mean((shifted - mean).square())
    return (mean + shift).flatten(), var.flatten()


def _patch_moments(x: Tensor, kernel: int, padding: int) -> tuple[Tensor, Tensor]:
    """(N, Cin, H, W) -> the mean (K,) and biased covariance (K, K) over N x H x W of the input's
    K = Cin * kernel**2 patch values, as a stride-1 conv with that padding sees them."""
    cin = x.shape[1]
    k = cin * kernel * kernel
    picks = torch.eye(k, dtype=x.dtype, device=x.device).view(k, cin, kernel, kernel)
    patches = F.conv2d(x, picks, padding=padding)  # (N, K, H', W'): exact copies
    mean, _ = _batch_moments(patches)
    centred = (patches - mean[None, :, None, None]).transpose(1, 2)  # (N, H', K, W')
    # sums over W' in the product, then means over H' and N: no sum of more than W' values
    cov = (centred @ centred.transpose(-1, -2)).mean(dim=1).mean(dim=0) / centred.shape[-1]
    return mean, cov


def pools_after_norm(layer: nn.Module) -> bool:
    """Whether :func:`pooled_conv_norm` computes ``layer``: a :class:`ConvNorm` of a stride-1
    conv, BatchNorm on batch statistics (in eval mode), ReLU and MaxPool."""
    if not isinstance(layer, ConvNorm) or len(layer) != 4:
        return False
    conv, norm, relu, pool = layer
    return (isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and len(set(conv.kernel_size)) == 1 and len(set(conv.padding)) == 1
            and isinstance(norm, BatchNorm2d) and norm.batch_statistics and not norm.training and norm.affine
            and isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d))


def pooled_conv_norm(layer: ConvNorm, x: Tensor) -> Tensor:
    """``layer(x)`` for a layer :func:`pools_after_norm` accepts: (N, Cin, H, W) -> (N, Cout, H/s, W/s)."""
    conv, norm, _, pool = layer
    # each channel times the sign of its scale: the normalisation is then increasing in it
    sign = torch.where(norm.weight < 0, -1.0, 1.0).to(conv.weight.dtype)
    weight = conv.weight * sign[:, None, None, None]
    y = F.conv2d(x, weight, None, padding=conv.padding)
    if weight[0].numel() < conv.out_channels:  # fewer patch values (Cin k^2) than channels
        mean_p, cov = _patch_moments(x, conv.kernel_size[0], conv.padding[0])
        w = weight.flatten(1)  # (Cout, K)
        mean, var = w @ mean_p, ((w @ cov) * w).sum(dim=1)
    else:
        mean, var = _batch_moments(y)
    scale = norm.weight.abs() * torch.rsqrt(var + norm.eps)
    return F.relu((pool(y) - mean[:, None, None]) * scale[:, None, None] + norm.bias[:, None, None])


def sums_taps_first(layer: nn.Module) -> bool:
    """Whether :func:`upsampled_conv_norm` computes ``layer`` after the upsampling: a
    :class:`ConvNorm` of a stride-1 transposed conv with fewer outputs times taps than inputs,
    BatchNorm (in eval mode) and an activation."""
    if not isinstance(layer, ConvNorm) or len(layer) != 3 or not isinstance(layer[0], nn.ConvTranspose2d):
        return False
    deconv, norm, _ = layer
    k, p = deconv.kernel_size[0], deconv.padding[0]
    return (deconv.stride == (1, 1) and deconv.groups == 1 and deconv.dilation == (1, 1)
            and deconv.output_padding == (0, 0) and len(set(deconv.kernel_size)) == 1
            and len(set(deconv.padding)) == 1 and p <= k - 1 and isinstance(norm, nn.BatchNorm2d)
            and not norm.training and deconv.out_channels * k * k < deconv.in_channels)


def upsampled_conv_norm(layer: ConvNorm, x: Tensor) -> Tensor:
    """``layer(upsample(x))`` (bilinear x2, align_corners=True) for a layer :func:`sums_taps_first`
    accepts: (N, Cin, h, w) -> (N, Cout, 2h, 2w)."""
    deconv, norm, act = layer
    k, cout = deconv.kernel_size[0], deconv.out_channels
    # the transposed conv as a conv (kernel flipped, in/out swapped, padding k - 1 - p), then one
    # 1x1 conv per (output channel, tap), run before the upsampling
    conv_weight = deconv.weight.flip(-1, -2).transpose(0, 1)  # (Cout, Cin, k, k)
    taps = F.conv2d(x, conv_weight.permute(0, 2, 3, 1).reshape(cout * k * k, -1, 1, 1))
    up = F.interpolate(taps, scale_factor=2, mode="bilinear", align_corners=True)
    # grouped: output channel o sums its k*k taps, each shifted to its place
    picks = torch.eye(k * k, dtype=up.dtype, device=up.device).view(1, k * k, k, k).repeat(cout, 1, 1, 1)
    # with batch statistics the bias is left out, as ConvNorm leaves it out
    bias = None if isinstance(norm, BatchNorm2d) and norm.batch_statistics else deconv.bias
    return act(norm(F.conv2d(up, picks, bias, padding=k - 1 - deconv.padding[0], groups=cout)))


def _upsampled(layer: nn.Module, x: Tensor) -> Tensor:
    """The decoder's own order: bilinear x2 (align_corners=True), then the layer."""
    return layer(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


def _encode(layer: nn.Module, x: Tensor) -> Tensor:
    return pooled_conv_norm(layer, x) if pools_after_norm(layer) else layer(x)


def filling_forward(filling: InstanceExtentFilling, prm: Tensor, kernels: Tensor) -> Tensor:
    """``filling(prm, kernels)`` (eval mode) in its export form: prm (P, H, W) and kernels
    (P or 1, D*k*k, H/4, W/4) -> (P, H, W) instance activation maps. Works on the network's own
    parameters, so an exported graph names them as the network does."""
    if filling.training:
        raise ValueError("the filling network's export form is for inference: call eval() first")
    encode, decode = filling.encode, filling.decode
    x = _encode(encode.encode2, _encode(encode.encode1, prm.unsqueeze(1)))
    x = propagate_affinity(x, kernels, filling.steps)
    x = _upsampled(decode.decode2, decode.decode1(x))
    last = upsampled_conv_norm(decode.decode3, x) if sums_taps_first(decode.decode3) else _upsampled(decode.decode3, x)
    return last.squeeze(1)
