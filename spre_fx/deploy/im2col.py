"""The conv as a channels-last im2col GEMM, the form in which a conv runs on a 2:4 kernel.

`SemiStructuredConv2d` reads the conv weight as `[O, kh·kw·C]`, exactly the `[O, kh, kw, C]`
order of the N:M groups (spre_fx/masks.py), so the groups of the N:M mask are the groups the
sparse tensor cores see, with no reordering.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import effective_weight
from .kernels import is_packed

__all__ = ["SemiStructuredConv2d", "gemm_weight", "dense_weight"]


class SemiStructuredConv2d(nn.Module):
    """A groups=1, zero-padded Conv2d computed as a channels-last im2col GEMM.

    `weight` is `[O, kh·kw·C]`, the conv weight read as `weight.permute(0, 2, 3, 1)`, i.e. the
    `[O, kh, kw, C]` order of the N:M groups; it may be dense or a `torch.sparse`
    semi-structured tensor. The input is viewed as NHWC (no copy for a channels_last input),
    zero-padded, its patches gathered in the same (kh, kw, C) order, and
    `F.linear(patches, weight, bias)` gives `[N·Ho·Wo, O]`, returned as an NCHW-shaped view.
    With a dense weight that is channels_last memory (the next such conv reads it without a
    copy). torch's cuSPARSELt tensor computes `W·patchesᵀ`, `[O, N·Ho·Wo]`, and returns its
    transpose, so the view's memory is `[O, N, Ho, Wo]`, unless the packed weight has
    `fuse_transpose_cusparselt = True` (the kernel then writes `[N·Ho·Wo, O]`; read from torch
    2.11's source, timed by benchmarks/gpu_check.py, not run here).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        kh, kw = kernel_size
        if weight.dim() != 2 or weight.shape[1] != kh * kw * in_channels:
            raise ValueError(
                f"expected a GEMM weight [O, {kh}*{kw}*{in_channels}], found shape {tuple(weight.shape)}"
            )
        self.in_channels = in_channels
        self.out_channels = weight.shape[0]
        self.kernel_size = (kh, kw)
        self.stride = tuple(stride)
        self.padding = tuple(padding)  # (left, right, top, bottom), F.pad order for W then H
        self.dilation = tuple(dilation)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: Tensor | None = None) -> SemiStructuredConv2d:
        """The im2col form of `conv`; `weight` is its GEMM weight (default: the dense one)."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only a zero-padded nn.Conv2d with groups=1 runs as an im2col GEMM")
        w = gemm_weight(conv) if weight is None else weight
        lw, rw, th, bh = conv._reversed_padding_repeated_twice
        return cls(w, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, (lw, rw, th, bh),
                   conv.dilation)

    def dense_weight(self) -> Tensor:
        """The weight as a dense conv weight `[O, C, kh, kw]`."""
        w = self.weight.detach()
        w = w.to_dense() if is_packed(w) else w
        return w.reshape(self.out_channels, *self.kernel_size, self.in_channels).permute(0, 3, 1, 2)

    def output_size(self, input: Tensor) -> tuple[int, int]:
        """(Ho, Wo) of the conv's output for `input` `[N, C, H, W]` (ValueError on a wrong shape)."""
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, H, W], found shape {tuple(input.shape)}"
            )
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        lw, rw, th, bh = self.padding
        h, w = input.shape[2] + th + bh, input.shape[3] + lw + rw
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {tuple(input.shape)} is smaller than the dilated kernel")
        return ho, wo

    def im2col(self, input: Tensor) -> Tensor:
        """The GEMM input `[N·Ho·Wo, kh·kw·C]` of `input`, in the weight's (kh, kw, C) order: a
        view for a stride-1 1×1 conv on a channels_last input, else one strided gather (a copy)."""
        ho, wo = self.output_size(input)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        x = input.permute(0, 2, 3, 1)  # NHWC view
        if any(self.padding):
            lw, rw, th, bh = self.padding
            x = F.pad(x, (0, 0, lw, rw, th, bh))
        n, _, _, c = x.shape
        s_n, s_h, s_w, s_c = x.stride()
        patches = x.as_strided(
            (n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c), x.storage_offset()
        )
        return patches.reshape(n * ho * wo, kh * kw * c)

    def forward(self, input: Tensor) -> Tensor:
        y = F.linear(self.im2col(input), self.weight, self.bias)
        ho, wo = self.output_size(input)
        return y.reshape(input.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        kind = type(self.weight).__name__ if is_packed(self.weight) else "dense"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding(l,r,t,b)={self.padding}, dilation={self.dilation}, weight={kind}"
        )


def gemm_weight(module: nn.Module) -> Tensor:
    """The dense `[O, K]` GEMM weight of a Linear or Conv2d (`[O, kh·kw·C]`, N:M group order)."""
    w = module.weight.detach()
    if is_packed(w):
        return w.to_dense()
    if isinstance(module, SemiStructuredConv2d):
        return w
    w = effective_weight(module)
    if w.dim() > 2:
        w = w.movedim(1, -1).reshape(w.shape[0], -1)
    return w.contiguous()


def dense_weight(module: nn.Module) -> Tensor:
    """The layer's weight in its usual dense layout, whatever kernel it runs on (for reports)."""
    if isinstance(module, SemiStructuredConv2d):
        return module.dense_weight()
    if is_packed(module.weight):
        return module.weight.detach().to_dense()
    return effective_weight(module)
