"""A merge method is one typed function registered once: `@merge_method("name")` on
`fn(lrm, delta, [scale], [base], [name], *, param: type = default, ...) -> Tensor`.

Everything else derives from the signature: the tensors it reads (a `base` parameter means the engine
loads θ_B for it, the others never do), its params model (the keyword-only parameters with their types,
defaults and `Field` bounds, on the strict params config), and its docs (the docstring). `Method.__call__`
is the one place that leaves a tensor without a Δ (scope 'linear': norms, embeddings) where the method says
(`untouched`: θ_R for every method merging into the LRM, θ_B for one merging on the base, such as ReasonAny's
native direction) and refuses a method that needs θ_B without it, so no method repeats either guard.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

import torch
from pydantic import BaseModel, create_model

from rain_tasks.io.guards import STRICT_PARAMS

#: the tensors a method may read, by parameter name
TENSOR_INPUTS = ("name", "lrm", "delta", "scale", "base")


@dataclass(frozen=True)
class TensorInputs:
    """What the engine has for one tensor: θ_R, its update Δ (or None), a scale (or None) and θ_B (or None), fp32."""

    name: str
    lrm: torch.Tensor
    delta: torch.Tensor | None
    scale: torch.Tensor | None
    base: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function, the tensors it reads and its params model (all from the signature)."""

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    params: type[BaseModel]
    baseline: bool  # offered as a `baselines.runs` method in params.yaml
    untouched: Literal["lrm", "base"] = "lrm"  # what a tensor without a Δ keeps: θ_R, or θ_B (then it reads the base)
    #: each output element depends only on the same element of its inputs (a scale broadcast along rows or columns):
    #: the engine may then merge a large tensor a block of rows at a time, with the same bits
    elementwise: bool = False

    @property
    def needs_base(self) -> bool:
        """Whether the method reads θ_B (the engine loads the base checkpoint only then)."""
        return "base" in self.inputs or self.untouched == "base"

    @property
    def doc(self) -> str:
        """The method's one-line description (its docstring's first line)."""
        return (inspect.getdoc(self.fn) or "").splitlines()[0]

    def __call__(self, x: TensorInputs, params: dict | BaseModel) -> torch.Tensor:
        """The merged fp32 tensor: θ_R (or θ_B, `untouched`) where the plan has no Δ for it, else the method on
        validated params."""
        if x.delta is None and self.untouched == "lrm":
            return x.lrm
        if self.needs_base and x.base is None:
            raise ValueError(f"{x.name}: merge method {self.name!r} needs the base checkpoint (DeltaPlan.base)")
        if x.delta is None:
            return x.base
        p = params if isinstance(params, self.params) else self.params.model_validate(params)
        return self.fn(**{k: getattr(x, k) for k in self.inputs}, **{k: getattr(p, k) for k in self.params.model_fields})


METHODS: dict[str, Method] = {}


def _params_model(name: str, fn: Callable) -> type[BaseModel]:
    """A strict pydantic model of `fn`'s keyword-only parameters (types, defaults and Field bounds as annotated)."""
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} needs a default")
        fields[p.name] = (hints[p.name], p.default)
    camel = "".join(part.title() for part in name.split("_"))
    return create_model(f"{camel}Params", __config__=STRICT_PARAMS, __doc__=inspect.getdoc(fn), **fields)


def build_method(name: str, fn: Callable[..., torch.Tensor], *, baseline: bool = True,
                 untouched: Literal["lrm", "base"] = "lrm", elementwise: bool = False) -> Method:
    """The Method of a typed function (see the module docstring) without registering it: for methods built from data,
    such as a wrapper or masks read from a stage's output."""
    positional = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(positional) - set(TENSOR_INPUTS))
    if unknown or "lrm" not in positional or "delta" not in positional:
        raise TypeError(f"merge method {name!r}: tensor parameters are {TENSOR_INPUTS} (lrm and delta required), "
                        f"got {positional}")
    return Method(name, fn, tuple(positional), _params_model(name, fn), baseline, untouched, elementwise)


def merge_method(name: str, *, baseline: bool = True,
                 elementwise: bool = False) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn` under `name` (once: a second registration of the name is an error); see the module docstring."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = build_method(name, fn, baseline=baseline, elementwise=elementwise)
        return fn

    return register


def get_method(name: str) -> Method:
    """The registered method `name`, naming the registered ones on a typo."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; registered: {sorted(METHODS)}") from None
