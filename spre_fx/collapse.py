"""The inverse pass: collapse SpRe branches and BatchNorms into single plain N:M layers.

Every SpRe pair becomes one conv with bias (`merge_spre`, docs/method.md §4), every conv→BN pair
of the plan is folded (`fold_bn`), masks are baked into the weights, and the user's own conv and
linear classes come back. A folded norm becomes a `FoldedBatchNorm`: an exact identity (then
what the norm ran after normalising, e.g. timm's activation) that still answers BatchNorm's
attributes, so the ecosystems' own conv+BN fusers run on a converted model and change nothing.
`spre_fx.convert` runs this, then the deploy backend.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .fusion import BNStats, fold_bn, merge_spre
from .layers import NMLayer, SpReConv2d, SpReNorm, effective_weight, masks_of
from .module_tree import adopt, model_copy, module_aliases, set_module
from .plan import Treatment, attach_plan, plan_of
from .registry import norm_spec

__all__ = ["FoldedBatchNorm", "collapse_layer", "collapsed"]


class FoldedBatchNorm(nn.Module):
    """A BatchNorm after `convert` folded it into the conv before it: `forward(x)` returns `x`
    (or `post(x)`, what the norm ran after normalising: timm's BatchNormAct2d drop and act).
    With `shift` (`convert(..., keep_norms=True)`) it adds the folded shift per channel first,
    and the conv keeps the bias it was built with.

    Code written for the model still finds a BatchNorm there: ultralytics' `fuse()`, timm's
    `reparameterize_model` and torch's `fuse_conv_bn_weights` read `running_mean`,
    `running_var`, `eps`, `weight` and `bias`. They hold mean 0, variance 1, eps 0, weight 1
    and the shift (0 without one), which such a fuser folds exactly: its scale
    `weight / sqrt(var + eps)` is 1.0 and its shift `bias - mean * scale` is `bias`, in every
    float dtype, so the fused conv holds the same weights, still N:M. The forward never computes
    with the statistics, so without a shift the output is the input bit for bit, in train mode
    too. Only a shift is state (a persistent buffer); the rest are non-persistent buffers, so a
    state dict lists none of them (`spre_fx.deployed_like` tells a folded norm by its missing
    keys) and nothing here is a parameter to train.
    """

    def __init__(self, num_features: int, post: nn.Module | None = None, shift: Tensor | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = 0.0
        self.momentum = None
        self.affine = True
        self.track_running_stats = True
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(num_features, **kw), persistent=False)
        self.register_buffer("running_var", torch.ones(num_features, **kw), persistent=False)
        self.register_buffer("weight", torch.ones(num_features, **kw), persistent=False)
        if shift is None:
            self.register_buffer("bias", torch.zeros(num_features, **kw), persistent=False)
        else:
            if shift.shape != (num_features,):
                raise ValueError(f"shift: expected shape ({num_features},), found {tuple(shift.shape)}")
            self.register_buffer("bias", shift.detach().to(**{k: v for k, v in kw.items() if v is not None}))
        self.has_shift = shift is not None
        self.post = post

    @classmethod
    def replacing(cls, norm: nn.Module, post: nn.Module | None = None,
                  shift: Tensor | None = None) -> FoldedBatchNorm:
        """The folded form of `norm` (same width, device and dtype as its running mean, same
        train/eval mode); `post` is dropped when it is an `nn.Identity`."""
        mean = norm.running_mean
        folded = cls(mean.numel(), None if type(post) is nn.Identity else post, shift,
                     device=mean.device, dtype=mean.dtype)
        folded.training = norm.training
        return folded

    def forward(self, x: Tensor) -> Tensor:
        if self.has_shift:
            x = x + self.bias.reshape(-1, *([1] * (x.dim() - 2)))
        return x if self.post is None else self.post(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into the conv before it" + (", adds the shift" * self.has_shift)


def _with_weights(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    plain = module.to_original() if isinstance(module, NMLayer) else adopt(type(module), module)
    plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    return plain


def _folded_pair(module: nn.Module, norm: nn.Module, post: nn.Module, w: Tensor, b: Tensor,
                 keep_norms: bool) -> tuple[nn.Module, nn.Module]:
    """The conv with the folded weight, and the `FoldedBatchNorm` in the norm's place; the shift
    goes to the norm when `keep_norms` and the conv was built without a bias."""
    if keep_norms and module.bias is None:
        return _with_weights(module, w, None), FoldedBatchNorm.replacing(norm, post, shift=b)
    return _with_weights(module, w, b), FoldedBatchNorm.replacing(norm, post)


def collapse_layer(module: nn.Module, norm: nn.Module | None, masks: dict[str, Tensor] | None = None,
                   *, keep_norms: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """One plain layer (the user's class) computing `norm(module(x))` in eval mode.

    `masks` are the layer's (`current_masks()`, taken from the module itself when None).
    Returns the layer and what replaces `norm`: a `FoldedBatchNorm` (None when there was no norm),
    which holds the folded shift when `keep_norms` and the layer has no bias of its own.
    """
    if isinstance(module, NMLayer) and masks is None:
        masks = module.current_masks()
    if isinstance(module, SpReConv2d):
        if not isinstance(norm, SpReNorm):
            raise ValueError("a SpReConv2d collapses only together with its SpReBatchNorm2d")
        w, b = merge_spre(
            module.weight, module.bias, module.weight_rep, masks["nm_mask"], masks["spatial_mask"],
            BNStats.of(norm), BNStats.of(norm.rep),
        )
        return _folded_pair(module, norm, norm.spre_fx.spec.after_fold(norm), w, b, keep_norms)
    weight = effective_weight(module, masks)
    if norm is None:
        bias = None if module.bias is None else module.bias.detach().clone()
        return _with_weights(module, weight.clone(), bias), None
    w, b = fold_bn(weight, module.bias, BNStats.of(norm))
    return _folded_pair(module, norm, norm_spec(norm).after_fold(norm), w, b, keep_norms)


def _copy_except(model: nn.Module, replaced: list[str]) -> nn.Module:
    """A deep copy of `model` that shares, instead of copying, the tensors of `replaced` modules
    (and holds detached copies of tensors a training forward left in attributes).

    The collapse builds new parameters for every one of those modules, so the copy never holds
    the shared tensors once it is returned, and the input model is never written to.
    """
    memo: dict[int, object] = {}
    modules = dict(model.named_modules())
    for name in replaced:
        for t in (*modules[name].parameters(recurse=False), *modules[name].buffers(recurse=False)):
            memo[id(t)] = t
    return model_copy(model, memo)


def collapsed(model: nn.Module, *, inplace: bool = False, keep_norms: bool = False) -> nn.Module:
    """The prepared `model` with every planned layer collapsed (a copy unless `inplace`);
    `keep_norms`: see `collapse_layer`."""
    plan = plan_of(model, stage="prepared")
    folded = [lp for lp in plan.layers if lp.treatment != Treatment.DENSE or lp.norm is not None]
    # Taken from the input model (a copy is driven by no scheduler): stale masks of layers that
    # follow their weights are computed afresh, out of place; held ones are used as they are.
    masks = {lp.name: masks_of(model.get_submodule(lp.name)) for lp in folded}
    if not inplace:
        model = _copy_except(model, [n for lp in folded for n in (lp.name, lp.norm) if n])
    aliases = module_aliases(model)
    for lp in folded:
        # Looked up one at a time: a replaced layer's tensors are freed as soon as it is swapped.
        norm = model.get_submodule(lp.norm) if lp.norm else None
        layer, replacement = collapse_layer(model.get_submodule(lp.name), norm, masks.pop(lp.name),
                                            keep_norms=keep_norms)
        set_module(model, lp.name, layer, aliases)
        if replacement is not None:
            set_module(model, lp.norm, replacement, aliases)
    attach_plan(model, dataclasses.replace(plan, stage="converted"))
    return model
