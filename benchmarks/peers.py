"""The default reduction's peers, built on a switch checkpoint: GaLore, APOLLO and PEFT's LoRA.

GaLore (galore-torch's ``GaLoreAdamW``; for SGD bases :class:`GaLoreSGD`, galore-torch ships no SGD) and APOLLO
(apollo-torch's ``APOLLOAdamW``) project every 2-D weight matrix's gradient (the rest trains in a plain group)
at their documented settings; LoRA adapts every linear and convolution layer.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

GALORE = dict(update_proj_gap=200, scale=0.25, proj_type="std")  # the GaLore README's settings
APOLLO = dict(proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")  # APOLLO's


def state_bytes(tree) -> int:
    """Bytes of the tensors in an optimizer's state (``tree``: an optimizer or part of its state), the
    projector objects' matrices included."""
    if isinstance(tree, torch.optim.Optimizer):
        tree = tree.state
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return state_bytes(vars(tree)) if hasattr(tree, "__dict__") else 0


class GaLoreSGD(torch.optim.Optimizer):
    """SGD with momentum (torch's rule: ``b = momentum * b + g``, ``w -= lr * b``) whose momentum, in groups with
    a ``rank``, lives in galore_torch's projected space: ``g`` is projected by a ``GaLoreProjector`` and the step
    ``b`` projected back (times ``scale``). Groups without ``rank`` are plain SGD with momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        from galore_torch.galore_projector import GaLoreProjector

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                if "rank" in group:
                    if "projector" not in state:
                        state["step"] = 0
                        state["projector"] = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                             scale=group["scale"], proj_type=group["proj_type"])
                    grad = state["projector"].project(grad, state["step"])
                    state["step"] += 1
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                update = state["momentum_buffer"]
                p.add_(state["projector"].project_back(update) if "rank" in group else update, alpha=-group["lr"])


def projected_groups(params: list[torch.Tensor], rank: int, settings: dict) -> list[dict]:
    """A plain group of the parameters that are not 2-D and a group of the 2-D ones at ``rank``."""
    return [{"params": [p for p in params if p.ndim != 2]},
            {"params": [p for p in params if p.ndim == 2], "rank": rank, **settings}]


def galore(params: list[torch.Tensor], rank: int, base: str, base_kwargs: dict) -> torch.optim.Optimizer:
    """GaLore on ``params`` at ``rank`` with the base's hyperparameters (AdamW: its eps, torch's default 1e-8)."""
    groups = projected_groups(params, rank, GALORE)
    if base == "SGD":
        return GaLoreSGD(groups, **base_kwargs)
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(groups, **{"eps": 1e-8, **base_kwargs}, no_deprecation_warning=True)


def apollo(params: list[torch.Tensor], rank: int, base_kwargs: dict) -> torch.optim.Optimizer:
    """APOLLO (random projection, channel-wise scaling, norm-growth limiter on) at ``rank``; AdamW bases only."""
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW(projected_groups(params, rank, APOLLO), **{"eps": 1e-8, **base_kwargs})


def matched_rank(model: nn.Module, make: Callable[[list[torch.Tensor], int], torch.optim.Optimizer],
                 target: int, loss: torch.Tensor) -> tuple[int, int]:
    """The rank whose optimizer ``make(params, rank)`` holds state bytes closest to ``target`` after one step
    with the gradients of ``loss`` (on copies of ``model``'s parameters); returns (rank, its bytes). A binary
    search: the bytes grow with the rank."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    @functools.cache  # each rank stepped once (a GaLore step is an SVD per matrix)
    def measured(rank: int) -> int:
        copies = [p.detach().clone().requires_grad_() for p in params]
        for copy, grad in zip(copies, grads):
            copy.grad = grad
        optimizer = make(copies, rank)
        optimizer.step()
        return state_bytes(optimizer)

    low, high = 1, max(min(p.shape) for p in params if p.ndim == 2)
    while low < high:  # the least rank whose bytes reach the target
        middle = (low + high) // 2
        low, high = (middle + 1, high) if measured(middle) < target else (low, middle)
    candidates = {rank: measured(rank) for rank in {max(1, low - 1), low}}
    return min(candidates.items(), key=lambda item: abs(item[1] - target))


def galore_rank(model: nn.Module, loss: torch.Tensor, target: int, base: str, base_kwargs: dict) -> tuple[int, int]:
    """GaLore's rank (:func:`galore` with the base's hyperparameters) whose state bytes come closest to
    ``target`` after one step with the gradients of ``loss``; returns (rank, its bytes)."""
    return matched_rank(model, lambda params, rank: galore(params, rank, base, base_kwargs), target, loss)


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D))


def lora(model: nn.Module, rank: int, save: tuple[str, ...]) -> nn.Module:
    """PEFT LoRA (r = alpha = ``rank``, no dropout, biases frozen) on every linear and convolution layer
    except the modules ``save``, which train in full (PEFT's ``modules_to_save``); everything else frozen."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, module in model.named_modules() if _adaptable(module)
               and not any(name == s or name.startswith(s + ".") for s in save)]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=list(save) or None, bias="none")
    with warnings.catch_warnings():  # GPT-2's Conv1D: PEFT sets fan_in_fan_out itself, and says so
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def adapter_numbers(model: nn.Module) -> int:
    """Numbers in LoRA's A and B matrices."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def rank_like(model: nn.Module, save: tuple[str, ...], target: int) -> int:
    """The LoRA rank whose adapter count (``rank`` times the count at rank 1) comes closest to ``target``."""
    import copy

    per_rank = adapter_numbers(lora(copy.deepcopy(model), 1, save))
    return max(1, round(target / per_rank))
