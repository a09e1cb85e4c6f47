"""The naive SpRe build kept as the training-speed baseline (issue: speed).

Two separate conv modules and two BatchNorms per SpRe pair, plain N:M convs and linears, and
every mask (N:M by `topk`, spatial by layer-wise `kthvalue`) recomputed on every forward —
what a first implementation of docs/method.md §1-3 looks like.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import spre_fx
from spre_fx.discovery import discover


def topk_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    g = w.detach().abs().movedim(1, -1)
    shape = g.shape
    g = g.reshape(-1, m)
    idx = g.topk(n, dim=1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    return mask.reshape(shape).movedim(-1, 1)


def kth_spatial_mask(w: torch.Tensor, rate: float) -> torch.Tensor:
    a = w.detach().abs()
    k = max(1, int(round(rate * a.numel())))
    keep = a > a.flatten().kthvalue(k).values
    return (1 - keep.float().mean((0, 1))) < rate


class NaiveNM(nn.Module):
    def __init__(self, layer: nn.Module, n: int, m: int) -> None:
        super().__init__()
        self.layer, self.n, self.m = layer, n, m

    def forward(self, x):
        w = self.layer.weight
        w = w * topk_nm_mask(w, self.n, self.m)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


class NaiveSpRe(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, n: int, m: int) -> None:
        super().__init__()
        self.conv, self.bn, self.n, self.m = conv, bn, n, m
        self.conv_rep = copy.deepcopy(conv)
        nn.init.kaiming_normal_(self.conv_rep.weight, mode="fan_in")
        self.bn_rep = copy.deepcopy(bn)

    def forward(self, x):
        w = self.conv.weight
        mask = topk_nm_mask(w, self.n, self.m)
        s = kth_spatial_mask(w, 1 - self.n / self.m)
        main = self.bn(self.conv._conv_forward(x, w * mask, None))
        rep = self.bn_rep(self.conv_rep._conv_forward(x, self.conv_rep.weight * mask * s, None))
        return main + rep


def naive_spre(model: nn.Module, nm: tuple[int, int] = (2, 4)) -> nn.Module:
    """The naive SpRe build of `model`, using spre_fx's discovery for the same layer choice."""
    model = copy.deepcopy(model)
    n, m = nm
    plan = discover(model, spre_fx.SpReConfig(nm=nm))
    for lp in plan.layers:
        parent_name, _, attr = lp.name.rpartition(".")
        layer = model.get_submodule(lp.name)
        if lp.treatment == "spre":
            bn_parent, _, bn_attr = lp.norm.rpartition(".")
            bn = model.get_submodule(lp.norm)
            setattr(model.get_submodule(parent_name), attr, NaiveSpRe(layer, bn, n, m))
            setattr(model.get_submodule(bn_parent), bn_attr, nn.Identity())
        elif lp.treatment == "nm":
            setattr(model.get_submodule(parent_name), attr, NaiveNM(layer, n, m))
    return model
