"""The plan: what `prepare` decided for every conv and linear layer, and why.

Discovery writes it, `prepare` attaches it to the model, and every later stage (scheduling,
collapse, deploy, report, verify) reads it from there with `plan_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from .config import SpReConfig

__all__ = ["Treatment", "LayerPlan", "Plan", "plan_of", "is_prepared", "attach_plan"]

_ATTRIBUTE = "_spre_fx_plan"


class Treatment(str, Enum):
    """What a layer becomes: a SpRe dual branch, plain N:M, or left dense.

    A `str` enum: `Treatment.SPRE == "spre"`, and it prints and serialises as its value.
    """

    SPRE = "spre"
    NM = "nm"
    DENSE = "dense"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class LayerPlan:
    """What `prepare` does to one conv or linear layer, and why."""

    name: str
    kind: str  # "conv" or "linear"
    treatment: Treatment
    reason: str
    norm: str | None  # the BatchNorm that `convert` folds into this layer
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Every layer's `LayerPlan`, the modules fx could not trace, and the model's stage."""

    config: SpReConfig
    layers: tuple[LayerPlan, ...]
    untraced: tuple[tuple[str, str], ...] = ()  # (module, error) replaced by its children
    stage: str = "prepared"  # "prepared", then "converted"

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def count(self, treatment: Treatment | str) -> int:
        return sum(lp.treatment == treatment for lp in self.layers)


def plan_of(model: nn.Module, *, stage: str | None = None) -> Plan:
    """The plan `prepare` attached to `model`; ValueError when it was never prepared (or, with
    `stage`, when it is not at that stage: "prepared" or "converted")."""
    plan = getattr(model, _ATTRIBUTE, None)
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{type(model).__name__} was not prepared by spre_fx: call spre_fx.prepare(model) first"
        )
    if stage is not None and plan.stage != stage:
        raise ValueError(f"expected a {stage} model, found a {plan.stage} one")
    return plan


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, _ATTRIBUTE, None), Plan)


def attach_plan(model: nn.Module, plan: Plan) -> None:
    """Keep `plan` on `model` as a plain attribute (not a parameter, buffer or child)."""
    object.__setattr__(model, _ATTRIBUTE, plan)
