"""Peak backpropagation: from peaks on the class response maps to peak response maps
(docs/method.md, section 2), in two forms.

* :func:`reference_peak_response_maps` is the oracle: torch autograd through the network with
  every conv's backward replaced by the modified rule, one backward per peak, like the
  reference code.
* :class:`PeakBackprop` is the deployable form: the same rule written as explicit forward
  computation over the saved activations (Conv, ConvTranspose, Mul, Div, ReLU masks and
  max-pool routing by comparison with the pooled maximum). All peaks of an image go through in
  one pass, and the normalisers are computed once per image. In the deep layers, where a peak's
  gradient still covers little of the feature map, each peak's pass runs on a box around it
  (:class:`Window`). It exports to ONNX.

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
# The deep blocks back-propagate on each peak's box while it covers less than this share of its
# frame (0: always the whole frame). resnet50 at 448: layer4 and layer3 run on boxes of 2 x 2 to
# 23 x 23 cells of 14 x 14 and 28 x 28, a third of the per-peak arithmetic.
WINDOW_COVERAGE = 0.5


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


class Window:
    """Where each peak's gradient can be non-zero on one frame (the spatial grid of a tensor of the
    backward pass): per peak a box at its own ``origin`` (P, 2) int64 (row, col), of a ``size``
    that all peaks share. From a one-hot seed the gradient spreads by each conv's reach, so in the
    deep layers the rule runs on these boxes instead of the whole frame: the same sums, since
    outside a box every gradient is 0. A box may reach past the frame's edge; the factors it
    gathers are 0 there, as the frame's zero padding, so nothing leaks in.

    ``bounds``: per axis the lowest and highest origin any peak can have (static), from which
    each gather knows how far to pad the frame."""

    def __init__(self, origin: Tensor, size: tuple[int, int], frame: tuple[int, int],
                 bounds: tuple[tuple[int, int], tuple[int, int]]):
        self.origin, self.size, self.frame, self.bounds = origin, tuple(size), tuple(frame), bounds

    @property
    def coverage(self) -> float:
        """The box's area over the frame's."""
        return self.size[0] * self.size[1] / (self.frame[0] * self.frame[1])

    def through(self, conv: nn.Conv2d, frame: tuple[int, int]) -> Window:
        """The box of a conv's input gradient (``frame``: its input's size), given this box of its
        output gradient: the whole transpose (no padding cropped) of every position in it."""
        s, p, d, k = conv.stride, conv.padding, conv.dilation, conv.kernel_size
        shift = torch.tensor(s, device=self.origin.device)
        offset = torch.tensor(p, device=self.origin.device)
        size = [(self.size[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i in range(2)]
        bounds = tuple((lo * s[i] - p[i], hi * s[i] - p[i]) for i, (lo, hi) in enumerate(self.bounds))
        return Window(self.origin * shift - offset, size, frame, bounds)

    def union(self, other: Window) -> Window:
        """The smallest box holding both (their relative offset is the same for every peak)."""
        low = [min(a[0], b[0]) for a, b in zip(self.bounds, other.bounds)]
        size = [max(a[0] + sa, b[0] + sb) - lo
                for a, b, sa, sb, lo in zip(self.bounds, other.bounds, self.size, other.size, low)]
        shift = torch.tensor([lo - a[0] for lo, a in zip(low, self.bounds)], device=self.origin.device)
        bounds = tuple((lo, lo + a[1] - a[0]) for lo, a in zip(low, self.bounds))
        return Window(self.origin + shift, size, self.frame, bounds)

    def pad(self, t: Tensor, inner: Window) -> Tensor:
        """(P, C, *inner.size) on ``inner``, a box inside this one -> (P, C, *self.size), zeros around."""
        before = [i[0] - o[0] for i, o in zip(inner.bounds, self.bounds)]
        after = [so - si - b for so, si, b in zip(self.size, inner.size, before)]
        if before == [0, 0] and after == [0, 0]:
            return t
        return F.pad(t, (before[1], after[1], before[0], after[0]))

    def _flat_index(self, width: int, margin: tuple[int, int]) -> Tensor:
        """(P * h * w) row indices of every box position in a frame padded by ``margin`` (rows, cols)
        before and flattened to rows of width ``width``, peak after peak."""
        h, w = self.size
        dev = self.origin.device
        rows = self.origin[:, :1] + margin[0] + torch.arange(h, device=dev)  # (P, h)
        cols = self.origin[:, 1:] + margin[1] + torch.arange(w, device=dev)  # (P, w)
        return (rows[:, :, None] * width + cols[:, None, :]).flatten()

    def gather(self, factor: Tensor) -> Tensor:
        """One image's per-position factor (1, C, H, W) on the frame -> (P, C, h, w): its values in each
        peak's box, 0 past the frame's edge."""
        c, ww = factor.shape[1], self.frame[1]
        before = [max(0, -lo) for lo, _ in self.bounds]
        after = [max(0, hi + s - f) for (_, hi), s, f in zip(self.bounds, self.size, self.frame)]
        padded = F.pad(factor, (before[1], after[1], before[0], after[0]))
        table = padded.reshape(c, -1).transpose(0, 1)  # (Hp * Wp, C): a position's channels in a row
        rows = table.index_select(0, self._flat_index(ww + before[1] + after[1], (before[0], before[1])))
        return rows.view(-1, self.size[0], self.size[1], c).permute(0, 3, 1, 2)

    def to_frame(self, t: Tensor) -> Tensor:
        """(P, C, h, w) on this box -> (P, C, H, W) on the whole frame, zeros outside the box."""
        p, c, h, w = t.shape
        dev = t.device
        rows = torch.arange(self.frame[0], device=dev) - self.origin[:, :1]  # (P, H): row in the box
        cols = torch.arange(self.frame[1], device=dev) - self.origin[:, 1:]  # (P, W)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        local = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
        peak = torch.arange(p, device=dev)[:, None, None] * (h * w)
        index = torch.where(inside, local + peak, p * h * w)  # the last row of the table is zeros
        table = torch.cat([t.permute(0, 2, 3, 1).reshape(p * h * w, c), t.new_zeros(1, c)])
        return table.index_select(0, index.flatten()).view(p, self.frame[0], self.frame[1], c).permute(0, 3, 1, 2)


def _image(factor: Tensor, index: int) -> Tensor:
    """Image ``index``'s slice (1, ...) of a per-image factor (B, ...); (1, ...) factors are shared."""
    return factor if factor.shape[0] == 1 else factor[index : index + 1]


class _ConvRule:
    """The per-image factors of the modified rule at one conv (input x (B, Cin, H, W)): the
    shifted input x - m (m the minimum over each image), the positive weights and
    1 / (|N| + eps) (0 where N < eps). Every peak then costs one transposed convolution."""

    def __init__(self, conv: nn.Conv2d, x: Tensor):
        self.conv = conv
        self.shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
        self.pos_w = F.relu(conv.weight)
        norm = F.conv2d(self.shifted, self.pos_w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        # 0 where N < eps, written as a mask product: the same numbers as a select, and in
        # onnxruntime a Mul instead of a Where over a materialised zero tensor (26 % of the
        # forward half's time at resnet50@448). The eps added is a one-element vector, not a
        # scalar: torch.onnx.export's optimizer (onnxscript's no-op rules) drops x + c from the
        # graph for a scalar |c| < 1e-8, and the graph would then compute 1 / |N|.
        eps = torch.full((1,), EPS, dtype=norm.dtype, device=norm.device)
        self.inv_norm = (norm >= EPS).to(norm.dtype) * (1.0 / (norm.abs() + eps))

    def transpose(self, z: Tensor) -> Tensor:
        """(P, Cout, Ho, Wo) -> (P, Cin, H, W): conv_transpose with W+, sized to the input."""
        conv, size = self.conv, self.shifted.shape[2:]
        out_pad = [
            size[i] - ((z.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1)
            for i in range(2)
        ]
        return F.conv_transpose2d(z, self.pos_w, None, conv.stride, conv.padding, out_pad, conv.groups, conv.dilation)

    def transpose_window(self, z: Tensor, window: Window) -> tuple[Tensor, Window]:
        """(P, Cout, h, w) on ``window`` of the conv's output -> the whole transpose of it, (P, Cin,
        h', w') on the returned window of the conv's input (nothing cropped: padding 0)."""
        conv = self.conv
        out = F.conv_transpose2d(z, self.pos_w, None, conv.stride, 0, 0, conv.groups, conv.dilation)
        return out, window.through(conv, self.shifted.shape[2:])

    def __call__(self, grad: Tensor, index: int = 0) -> Tensor:
        """The whole rule for image ``index``, unfolded: g_in = (x - m) * conv_transpose(g_out / (|N| + eps))."""
        return _image(self.shifted, index) * self.transpose(grad * _image(self.inv_norm, index))

    def on_window(self, grad: Tensor, window: Window, index: int = 0) -> tuple[Tensor, Window]:
        """:meth:`__call__` on each peak's box: (P, Cout, h, w) on ``window`` -> the input's box and
        (P, Cin, h', w') on it."""
        g, win = self.transpose_window(grad * window.gather(_image(self.inv_norm, index)), window)
        return win.gather(_image(self.shifted, index)) * g, win


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """BatchNorm in eval mode is a per-channel affine map: its (1, C, 1, 1) gradient scale."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[None, :, None, None]


def _maxpool_rule(pool: nn.MaxPool2d, x: Tensor, grad: Tensor) -> Tensor:
    """Route (P, C, Ho, Wo) gradients to the first arg-max of each window of one image's x (1, C, H, W),
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


class _BlockTape:
    """Forward of a torchvision BasicBlock/Bottleneck that keeps what its backward needs, with
    the per-image factors between consecutive transposed convs multiplied together once, so
    each peak pays one elementwise product per conv:

        conv_k(g) -> bn_k -> relu -> conv_{k+1}: the factor after conv_{k+1}'s transpose is
        (x_{k+1} - m_{k+1}) * relu'(.) * bn_k scale * inv_norm_k.
    """

    def __init__(self, block: nn.Module, x: Tensor):
        if isinstance(block, Bottleneck):
            convs, bns = [block.conv1, block.conv2, block.conv3], [block.bn1, block.bn2, block.bn3]
        elif isinstance(block, BasicBlock):
            convs, bns = [block.conv1, block.conv2], [block.bn1, block.bn2]
        else:
            raise TypeError(f"unsupported residual block {type(block).__name__}")
        inputs, h = [x], x
        for conv, bn in zip(convs[:-1], bns[:-1]):
            h = F.relu(bn(conv(h)))
            inputs.append(h)
        branch = bns[-1](convs[-1](h))
        shortcut = block.downsample(x) if block.downsample is not None else x
        self.out = F.relu(branch + shortcut)
        rules = [_ConvRule(conv, inp) for conv, inp in zip(convs, inputs)]
        out_mask = (self.out > 0).to(x.dtype)
        # Into the last conv's transpose, from the block's output gradient.
        self.entry = rules[-1].inv_norm * _bn_scale(bns[-1]) * out_mask
        # Between transposes, last to first: after conv_{k+1}'s transpose, before conv_k's. The
        # ReLU's derivative needs no mask of its own: conv_{k+1}'s input is a ReLU output (>= 0),
        # so its shift m is 0 wherever the ReLU is (x - m is then 0 there) or else every x > 0:
        # (x - m) * (x > 0) == x - m exactly.
        self.between = [
            rules[k + 1].shifted * _bn_scale(bns[k]) * rules[k].inv_norm
            for k in reversed(range(len(convs) - 1))
        ]
        self.rules = rules
        self.shifted = rules[0].shifted  # the block input's shift, shared by the shortcut's conv
        if block.downsample is not None:
            conv, bn = block.downsample
            self.shortcut = _ConvRule(conv, x)
            self.shortcut_entry = self.shortcut.inv_norm * _bn_scale(bn) * out_mask
        else:
            self.shortcut, self.identity_mask = None, out_mask

    def backward(self, grad: Tensor, index: int = 0) -> Tensor:
        """(P, Cout, Ho, Wo) gradient at the block output of image ``index`` -> (P, Cin, H, W)
        at its input."""
        g = self.rules[-1].transpose(grad * _image(self.entry, index))
        for rule, factor in zip(reversed(self.rules[:-1]), self.between):
            g = rule.transpose(g * _image(factor, index))
        shifted = _image(self.shifted, index)
        if self.shortcut is not None:
            return shifted * (g + self.shortcut.transpose(grad * _image(self.shortcut_entry, index)))
        return shifted * g + grad * _image(self.identity_mask, index)

    def backward_window(self, grad: Tensor, window: Window, index: int = 0) -> tuple[Tensor, Window]:
        """:meth:`backward` on each peak's box: (P, Cout, h, w) on ``window`` of the block output ->
        (P, Cin, h', w') on the returned box of its input."""
        g, win = self.rules[-1].transpose_window(grad * window.gather(_image(self.entry, index)), window)
        for rule, factor in zip(reversed(self.rules[:-1]), self.between):
            g, win = rule.transpose_window(g * win.gather(_image(factor, index)), win)
        if self.shortcut is not None:
            short, short_win = self.shortcut.transpose_window(
                grad * window.gather(_image(self.shortcut_entry, index)), window)
            out = win.union(short_win)
            return out.gather(_image(self.shifted, index)) * (out.pad(g, win) + out.pad(short, short_win)), out
        out = win.union(window)
        identity = grad * window.gather(_image(self.identity_mask, index))
        return out.gather(_image(self.shifted, index)) * out.pad(g, win) + out.pad(identity, window), out


class PeakTape:
    """An image batch's forward pass through a :class:`ResNetFCN` (BatchNorm in eval mode) that
    keeps, per image, what peak backprop needs: the factors of every conv's modified rule, the
    ReLU masks and the max-pool's input. Its outputs are the network's: ``features`` (a
    :class:`BackboneOutput`, crm (B, C, h, w)), so peaks are found on the same pass that their
    backprop then uses; no image pays for its forward twice."""

    def __init__(self, net: ResNetFCN, images: Tensor, upsample_factor: int = 1,
                 window_coverage: float = WINDOW_COVERAGE):
        conv1, bn1, _, pool = net.stem
        self.net, self.upsample_factor, self.window_coverage = net, upsample_factor, window_coverage
        self.s1 = F.relu(bn1(conv1(images)))
        x = pool(self.s1)
        self.blocks, stages = [], []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                self.blocks.append(_BlockTape(block, x))
                x, self.blocks[-1].out = self.blocks[-1].out, None  # kept by the next block's factors only
            stages.append(x)
        self.features = BackboneOutput(net.classifier(x), *stages[:3])
        self.head = _ConvRule(net.classifier, x)
        self.stem_factor = (self.s1 > 0).to(images.dtype) * _bn_scale(bn1)
        self.input = _ConvRule(conv1, images)

    def seeds(self, peaks: Tensor, dtype: torch.dtype) -> Tensor:
        """One-hot seeds on the upsampled grid, pulled back through the bilinear upsampling:
        (P, C, h, w) = A_h[y]^T (x) A_w[x] on channel c."""
        _, c, h, w = self.features.crm.shape
        f = self.upsample_factor
        rows = interpolation_matrix(h * f, h, dtype, peaks.device)[peaks[:, 1]]  # (P, h)
        cols = interpolation_matrix(w * f, w, dtype, peaks.device)[peaks[:, 2]]  # (P, w)
        onehot = (peaks[:, :1] == torch.arange(c, device=peaks.device)).to(dtype)  # (P, C)
        return onehot[:, :, None, None] * (rows[:, :, None] * cols[:, None, :])[:, None]

    def seeds_window(self, peaks: Tensor, dtype: torch.dtype) -> tuple[Tensor, Window]:
        """:meth:`seeds` on each peak's box: bilinear weights reach at most 2 x 2 CRM cells,
        from the first that a peak's interpolation row reaches. (P, C, 2, 2) and the box."""
        _, c, h, w = self.features.crm.shape
        f, dev = self.upsample_factor, peaks.device
        size = (min(2, h), min(2, w))
        weights, origin = [], []
        for axis, (n, k) in enumerate(((h, size[0]), (w, size[1]))):
            row = interpolation_matrix(n * f, n, dtype, dev)[peaks[:, 1 + axis]]  # (P, n)
            first = (row != 0).to(torch.int64).argmax(dim=1).clamp(max=n - k)  # (P,)
            weights.append(torch.gather(row, 1, first[:, None] + torch.arange(k, device=dev)))
            origin.append(first)
        onehot = (peaks[:, :1] == torch.arange(c, device=dev)).to(dtype)
        seeds = onehot[:, :, None, None] * (weights[0][:, :, None] * weights[1][:, None, :])[:, None]
        return seeds, Window(torch.stack(origin, dim=1), size, (h, w), ((0, h - size[0]), (0, w - size[1])))

    def backward(self, peaks: Tensor, index: int = 0) -> Tensor:
        """Image ``index``'s peaks (P, 3) int64 (class, y, x) on the upsampled CRM grid ->
        (P, H, W) peak response maps, all peaks at once. The deep blocks run on each peak's box
        (:class:`Window`) while it covers less than ``window_coverage`` of its frame."""
        dtype = self.s1.dtype
        blocks = list(reversed(self.blocks))
        window = None
        if self.window_coverage > 0:
            grad, window = self.head.on_window(*self.seeds_window(peaks, dtype), index)
            while blocks and window.coverage < self.window_coverage:
                grad, window = blocks.pop(0).backward_window(grad, window, index)
            grad = window.to_frame(grad)
        else:
            grad = self.head(self.seeds(peaks, dtype), index)
        for block in blocks:
            grad = block.backward(grad, index)
        grad = _maxpool_rule(self.net.stem[3], _image(self.s1, index), grad) * _image(self.stem_factor, index)
        return normalise_prm(self.input(grad, index))


class PeakBackprop(nn.Module):
    """Batched explicit peak backpropagation over a :class:`ResNetFCN`.

    forward(image (1, 3, H, W), peaks (P, 3) int64 (class, y, x) on the upsampled CRM grid)
    -> (P, H, W) peak response maps. Uses the backbone's weights; BatchNorm in eval mode.
    ``record(images)`` is the forward half on its own: a :class:`PeakTape` whose crm gives the
    peaks and whose ``backward`` gives each image's maps.
    """

    def __init__(self, backbone: ResNetFCN, upsample_factor: int = 1, window_coverage: float = WINDOW_COVERAGE):
        super().__init__()
        self.backbone = backbone
        self.upsample_factor = upsample_factor
        self.window_coverage = window_coverage

    def record(self, images: Tensor) -> PeakTape:
        """(B, 3, H, W) -> the batch's :class:`PeakTape`."""
        return PeakTape(self.backbone, images, self.upsample_factor, self.window_coverage)

    def forward(self, image: Tensor, peaks: Tensor) -> Tensor:
        return self.record(image).backward(peaks)
