"""Gathering the parameters an optimizer trains, and small helpers every phase uses."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .sharding import is_sharded

__all__ = ["BaseFactory", "ParamSet", "all_finite", "gather_params", "hyperparameters", "tensor_bytes"]


@dataclass
class ParamSet:
    """The parameters of an optimizer, split by what happens to them at the switch.

    ``groups`` are the parameter-group dicts (each parameter once, frozen ones included, as torch.optim
    keeps them); ``tracked`` the parameters that are decomposed, in decomposition column order, with
    ``tracked_groups`` their group indices; ``free`` the ones that keep ordinary training after the switch
    (``keep_free`` matches, and parameters frozen at construction); ``names`` every name of each parameter.
    """

    groups: list[dict]
    tracked: list[torch.Tensor]
    tracked_groups: list[int]
    free: list[torch.Tensor]
    names: dict[torch.Tensor, list[str]]


def gather_params(model, keep_free) -> ParamSet:
    """Parameter groups and their split from a module or an iterable of parameters, ``(name, parameter)``
    pairs or group dicts; ``keep_free`` is a pattern or an iterable of ``fnmatch`` patterns of names."""
    patterns = _patterns(keep_free)
    entries, names = _entries(model)
    seen, groups = set(), []
    for index, entry in enumerate(entries):
        params = []
        for position, item in enumerate(entry["params"]):
            name, p = item if isinstance(item, tuple) else (f"group{index}.param{position}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            if p in seen:  # tied weights count once
                continue
            if not p.is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters "
                                "can be trained")
            if p.is_meta:
                raise ValueError(f"parameter {name!r} is on the meta device (not materialised); CMDOptimizer needs "
                                 "real tensors, so build it after the weights are loaded")
            seen.add(p)
            names.setdefault(p, []).append(name)
            params.append(p)
        if params:
            groups.append({**hyperparameters(entry), "params": params})
    if not groups:
        raise ValueError("CMDOptimizer got an empty parameter list")
    tracked, tracked_groups, free = [], [], []
    for index, group in enumerate(groups):
        for p in group["params"]:
            if not p.requires_grad or any(fnmatch.fnmatchcase(n, pat) for n in names[p] for pat in patterns):
                free.append(p)
            elif p.numel():
                tracked.append(p)
                tracked_groups.append(index)
    all_names = [n for p in names for n in names[p]]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise ValueError(
                f"keep_free pattern {pattern!r} matches no parameter name (names look like {all_names[0]!r}); "
                "pass the model or named parameters to name them")
    if not tracked:
        reason = f"keep_free={patterns} matches every parameter" if patterns else "no parameter requires grad"
        raise ValueError(f"nothing is left to decompose: {reason} (or every parameter has 0 elements)")
    return ParamSet(groups, tracked, tracked_groups, free, names)


def _patterns(keep_free) -> list[str]:
    if isinstance(keep_free, str):
        return [keep_free]
    if keep_free is None or not isinstance(keep_free, Iterable):
        raise TypeError(f"keep_free must be a pattern or an iterable of patterns (strings), got {keep_free!r}")
    patterns = list(keep_free)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"keep_free patterns must be strings, got {pattern!r}")
    return patterns


def _entries(model) -> tuple[list[dict], dict]:
    """The group entries of ``model``, and for a module every name of each parameter (tied aliases too)."""
    names: dict[torch.Tensor, list[str]] = {}
    if isinstance(model, nn.Module):
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
                raise ValueError(f"module {module_name!r} makes sparse gradients (sparse=True); CMDOptimizer "
                                 "needs dense gradients")
        named = list(model.named_parameters(remove_duplicate=False))
        for name, p in named:
            names.setdefault(p, []).append(name)
            if "_orig_mod." in name:  # torch.compile's wrapper: the name of the module the user wrote answers too
                names[p].append(name.replace("_orig_mod.", ""))
        first = {p: ns[0] for p, ns in names.items()}
        names = {p: ns[1:] for p, ns in names.items()}  # the first name is added while gathering
        return [{"params": [(first[p], p) for p in first]}], names
    if isinstance(model, (torch.Tensor, dict)) or not isinstance(model, Iterable) or isinstance(model, (str, bytes)):
        raise TypeError(f"model must be an nn.Module or an iterable of parameters, (name, parameter) pairs or "
                        f"parameter-group dicts, got {type(model).__name__}")
    entries = list(model)
    if entries and isinstance(entries[0], dict):
        for entry in entries:
            if not isinstance(entry, dict) or "params" not in entry:
                raise TypeError("parameter-group dicts must each have a 'params' entry")
            entry["params"] = [entry["params"]] if isinstance(entry["params"], torch.Tensor) else list(entry["params"])
        return entries, names
    return [{"params": entries}], names


class BaseFactory:
    """Builds the base optimizer on parameter groups: ``BaseFactory(base, kwargs)(groups)``.

    ``base`` is a ``torch.optim.Optimizer`` subclass or a callable returning one; it and ``kwargs`` are
    checked once, on a stand-in parameter, so that bad arguments fail at construction.
    """

    def __init__(self, base, kwargs: dict) -> None:
        if base is torch.optim.Optimizer:
            raise TypeError("base=torch.optim.Optimizer is the abstract base class; pass an optimizer such as "
                            "torch.optim.SGD or torch.optim.AdamW")
        if (isinstance(base, type) and not issubclass(base, torch.optim.Optimizer)) or not callable(base):
            raise TypeError(f"base must be a torch.optim.Optimizer subclass or a callable returning one, got {base!r}")
        for key, value in kwargs.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
                raise ValueError(f"{key}={value!r} for the base optimizer is not finite")
        self.base, self.kwargs = base, dict(kwargs)
        try:
            probe = self([{"params": [nn.Parameter(torch.zeros(1))]}])
        except (TypeError, ValueError) as error:
            raise type(error)(f"base={self.name} rejects its arguments {self.kwargs}: {error}") from error
        self.optimizer_name = type(probe).__name__

    @property
    def name(self) -> str:
        return getattr(self.base, "__name__", type(self.base).__name__)

    def __call__(self, groups: list[dict]) -> torch.optim.Optimizer:
        optimizer = self.base(groups, **self.kwargs)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"base returned a {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer


def hyperparameters(group: dict) -> dict:
    """A parameter group's settings, without its ``params``."""
    return {key: value for key, value in group.items() if key != "params"}


def tensor_bytes(tree) -> int:
    """Total bytes of the tensors in nested dicts, lists and tuples (of a DTensor: the shard this process holds)."""
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if is_sharded(tree) else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True if no tensor holds a NaN or an infinity.

    Real floating tensors go through torch's fused non-finite check (the one ``GradScaler`` uses, at a scale of
    1, which leaves them unchanged): one pass over all of a device's tensors in a single call, which measured
    3x cheaper than a Python loop of per-tensor sums on an 85K-parameter model (equal when memory-bound).
    Other dtypes are summed (NaN and infinities propagate through a sum). One host sync.
    """
    fused: dict[torch.device, list[torch.Tensor]] = {}
    others = []
    for t in tensors:
        if t is None or not t.numel():
            continue
        if t.is_sparse:
            raise TypeError("a gradient is sparse; CMDOptimizer needs dense gradients")
        if t.dtype in _FUSED_CHECK:
            fused.setdefault(t.device, []).append(t)
        else:
            others.append(t)
    found = []
    for device, group in fused.items():
        found.append(torch.zeros(1, device=device))
        torch._amp_foreach_non_finite_check_and_unscale_(group, found[-1], torch.ones(1, device=device))
    found += [(~torch.isfinite(t.sum())).reshape(1).float() for t in others]
    if not found:
        return True
    if len(found) == 1:
        return not bool(found[0])
    return not bool(torch.cat([f.to(found[0].device) for f in found]).any())


#: dtypes torch's fused non-finite check takes
_FUSED_CHECK = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
