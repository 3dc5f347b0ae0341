"""Peak backpropagation: from peaks on the class response maps to peak response maps
(SPEC section 2), in two forms.

* :func:`reference_peak_response_maps` is the oracle: torch autograd through the network with
  every conv's backward replaced by the modified rule, one backward per peak, like the
  reference code.
* :class:`PeakBackprop` is the deployable form: the same rule written as explicit forward
  computation over the saved activations (Conv, ConvTranspose, Mul, Div, ReLU masks and
  max-pool routing by comparison with the pooled maximum). All peaks of an image go through in
  one pass, and the normalisers are computed once per image. It exports to ONNX.

Modified rule at a conv with input x, m = min(x), W+ = relu(W), N = conv(x - m, W+):
    g_in = (x - m) * conv_transpose(Z, W+),  Z = g_out / (|N| + eps), Z = 0 where N < eps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .backbone import BackboneOutput, ResNetFCN
from .peaks import upsample_crm

EPS = 1e-10


def normalise_prm(input_grad: Tensor) -> Tensor:
    """(P, 3, H, W) input gradients -> (P, H, W) peak response maps: channel sum, clamped at
    0, divided by its sum (all-zero maps stay zero instead of NaN)."""
    prm = input_grad.sum(dim=1).clamp(min=0)
    return prm / prm.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(prm.dtype).tiny)


# --------------------------------------------------------------------------------------------
# Reference form (oracle): autograd with the modified conv rule, one backward per peak.
# --------------------------------------------------------------------------------------------


class _ModifiedConvRule(torch.autograd.Function):
    """Forward: the conv unchanged. Backward: the modified rule, derived by autograd through
    the normaliser N (so it shares no code with the explicit form)."""

    @staticmethod
    def forward(ctx, x, conv: nn.Conv2d):  # noqa: D401
        ctx.save_for_backward(x)
        ctx.conv = conv
        return conv._conv_forward(x, conv.weight, conv.bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        conv = ctx.conv
        offset = x.min()
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            norm = conv._conv_forward(xs - offset, conv.weight.detach().clamp(min=0), None)
            z = grad_out / (norm.detach().abs() + EPS)
            z = z.masked_fill(norm.detach() < EPS, 0)
            (g,) = torch.autograd.grad(norm, xs, z)
        return (x - offset) * g, None


@contextlib.contextmanager
def modified_conv_rule(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.Conv2d`` of ``model`` back-propagates with the modified rule."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.forward = lambda x, conv=conv: _ModifiedConvRule.apply(x, conv)
    try:
        yield model
    finally:
        for conv in convs:
            del conv.forward


def reference_peak_response_maps(
    backbone: ResNetFCN, image: Tensor, peaks: Tensor, upsample_factor: int = 1
) -> Tensor:
    """Oracle. image: (1, 3, H, W); peaks: (P, 3) int64 rows (class, y, x) on the upsampled CRM
    grid. Returns (P, H, W) peak response maps. BatchNorm must be in eval mode."""
    if backbone.training:
        raise ValueError("peak backpropagation needs the backbone in eval mode")
    image = image.detach().clone().requires_grad_(True)
    with modified_conv_rule(backbone):
        crm = upsample_crm(backbone(image).crm, upsample_factor)
        maps = []
        for cls, y, x in peaks.tolist():
            seed = torch.zeros_like(crm)
            seed[0, cls, y, x] = 1
            (grad,) = torch.autograd.grad(crm, image, seed, retain_graph=True)
            maps.append(normalise_prm(grad))
    return torch.cat(maps) if maps else image.new_zeros((0, *image.shape[2:]))


# --------------------------------------------------------------------------------------------
# Deployable form: explicit, batched over peaks, forward-only ops.
# --------------------------------------------------------------------------------------------


def interpolation_matrix(size_out: int, size_in: int, dtype: torch.dtype, device=None) -> Tensor:
    """(size_out, size_in) matrix of 1-D bilinear interpolation with align_corners=True."""
    if size_out == size_in:
        return torch.eye(size_in, dtype=dtype, device=device)
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    src = torch.arange(size_out, dtype=torch.float64) * scale
    i0 = src.floor().long().clamp(max=size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    frac = src - i0
    mat = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    mat.index_put_((rows, i0), 1 - frac, accumulate=True)
    mat.index_put_((rows, i1), frac, accumulate=True)
    return mat.to(dtype=dtype, device=device)


def _conv_rule(conv: nn.Conv2d, x: Tensor, grad: Tensor) -> Tensor:
    """Modified rule. x: (1, Cin, H, W) saved input; grad: (P, Cout, Ho, Wo) -> (P, Cin, H, W)."""
    shifted = x - x.min()
    pos_w = conv.weight.clamp(min=0)
    norm = F.conv2d(shifted, pos_w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    inv_norm = torch.where(norm < EPS, torch.zeros_like(norm), 1.0 / (norm.abs() + EPS))
    out_pad = [
        x.shape[2 + i]
        - ((grad.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1)
        for i in range(2)
    ]
    back = F.conv_transpose2d(
        grad * inv_norm, pos_w, None, conv.stride, conv.padding, out_pad, conv.groups, conv.dilation
    )
    return shifted * back


def _bn_rule(bn: nn.BatchNorm2d, grad: Tensor) -> Tensor:
    """BatchNorm in eval mode is a per-channel affine map."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return grad * scale[None, :, None, None]


def _maxpool_rule(pool: nn.MaxPool2d, x: Tensor, grad: Tensor) -> Tensor:
    """Route (P, C, Ho, Wo) gradients to the first arg-max of each window of x (1, C, H, W),
    found by comparison with the pooled maximum (no index output, which TensorRT lacks)."""
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    if pool.dilation != 1 or pool.ceil_mode:
        raise NotImplementedError("max-pool routing supports dilation 1 without ceil_mode")
    c, h, w = x.shape[1:]
    pooled = F.max_pool2d(x, k, s, p)
    ho, wo = pooled.shape[2:]
    padded = F.pad(x, (p, p, p, p), value=float("-inf"))
    taken = torch.zeros_like(pooled, dtype=torch.bool)
    firsts = []
    for dy in range(k):
        for dx in range(k):
            window_value = padded[:, :, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s]
            hit = (window_value == pooled) & ~taken
            taken = taken | hit
            firsts.append(hit)
    first = torch.stack(firsts, dim=2).to(grad.dtype)  # (1, C, k*k, Ho, Wo)
    routed = (grad.unsqueeze(2) * first).flatten(1, 2)  # (P, C*k*k, Ho, Wo)
    scatter = torch.eye(k * k, dtype=grad.dtype, device=grad.device).view(k * k, 1, k, k).repeat(c, 1, 1, 1)
    out_pad = [h + 2 * p - ((ho - 1) * s + k), w + 2 * p - ((wo - 1) * s + k)]
    return F.conv_transpose2d(routed, scatter, None, s, p, out_pad, groups=c)


def _block_forward(block: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Forward of a torchvision BasicBlock/Bottleneck that also returns the conv inputs."""
    if isinstance(block, Bottleneck):
        o1 = F.relu(block.bn1(block.conv1(x)))
        o2 = F.relu(block.bn2(block.conv2(o1)))
        branch = block.bn3(block.conv3(o2))
        saved = [x, o1, o2]
    elif isinstance(block, BasicBlock):
        o1 = F.relu(block.bn1(block.conv1(x)))
        branch = block.bn2(block.conv2(o1))
        saved = [x, o1]
    else:
        raise TypeError(f"unsupported residual block {type(block).__name__}")
    shortcut = block.downsample(x) if block.downsample is not None else x
    out = F.relu(branch + shortcut)
    return out, [*saved, out]


def _block_backward(block: nn.Module, saved: list[Tensor], grad: Tensor) -> Tensor:
    *inputs, out = saved
    grad = grad * (out > 0)
    if isinstance(block, Bottleneck):
        x, o1, o2 = inputs
        g = _conv_rule(block.conv3, o2, _bn_rule(block.bn3, grad)) * (o2 > 0)
        g = _conv_rule(block.conv2, o1, _bn_rule(block.bn2, g)) * (o1 > 0)
        g = _conv_rule(block.conv1, x, _bn_rule(block.bn1, g))
    else:
        x, o1 = inputs
        g = _conv_rule(block.conv2, o1, _bn_rule(block.bn2, grad)) * (o1 > 0)
        g = _conv_rule(block.conv1, x, _bn_rule(block.bn1, g))
    if block.downsample is not None:
        conv, bn = block.downsample
        return g + _conv_rule(conv, x, _bn_rule(bn, grad))
    return g + grad


class PeakBackprop(nn.Module):
    """Batched explicit peak backpropagation over a :class:`ResNetFCN`.

    forward(image (1, 3, H, W), peaks (P, 3) int64 (class, y, x) on the upsampled CRM grid)
    -> (P, H, W) peak response maps. Uses the backbone's weights; BatchNorm in eval mode.
    """

    def __init__(self, backbone: ResNetFCN, upsample_factor: int = 1):
        super().__init__()
        self.backbone = backbone
        self.upsample_factor = upsample_factor

    def seeds(self, crm_shape: torch.Size, peaks: Tensor, dtype: torch.dtype) -> Tensor:
        """One-hot seeds on the upsampled grid, pulled back through the bilinear upsampling:
        (P, C, h, w) = A_h[y]^T (x) A_w[x] on channel c."""
        _, c, h, w = crm_shape
        f = self.upsample_factor
        rows = interpolation_matrix(h * f, h, dtype, peaks.device)[peaks[:, 1]]  # (P, h)
        cols = interpolation_matrix(w * f, w, dtype, peaks.device)[peaks[:, 2]]  # (P, w)
        onehot = (peaks[:, :1] == torch.arange(c, device=peaks.device)).to(dtype)  # (P, C)
        return onehot[:, :, None, None] * (rows[:, :, None] * cols[:, None, :])[:, None]

    def forward(self, image: Tensor, peaks: Tensor) -> Tensor:
        return self.with_features(image, peaks)[0]

    def with_features(self, image: Tensor, peaks: Tensor) -> tuple[Tensor, BackboneOutput]:
        """As forward, also returning the backbone outputs of the image's forward pass."""
        net = self.backbone
        conv1, bn1, _, pool = net.stem
        # Forward, saving what the backward rules need.
        s1 = F.relu(bn1(conv1(image)))
        x = pool(s1)
        tape, features = [], []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x, saved = _block_forward(block, x)
                tape.append((block, saved))
            features.append(x)
        crm = net.classifier(x)
        # Backward, all peaks at once.
        grad = self.seeds(crm.shape, peaks, image.dtype)
        grad = _conv_rule(net.classifier, x, grad)
        for block, saved in reversed(tape):
            grad = _block_backward(block, saved, grad)
        grad = _maxpool_rule(pool, s1, grad) * (s1 > 0)
        grad = _conv_rule(conv1, image, _bn_rule(bn1, grad))
        return normalise_prm(grad), BackboneOutput(crm, *features[:3])
