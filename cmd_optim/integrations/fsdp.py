"""Saving and loading a CMDOptimizer's state with torch.distributed.checkpoint (DCP), sharded under FSDP2.

Every rank passes its state; tensors that differ between ranks (this rank's rows of the warm-up snapshots,
of the mode map, of the base optimizer's state) are DTensors and are written shard by shard; the rest is the
same on every rank. DCP loads into a state of the same structure: :func:`load` reads the saved structure
first and builds that, so a freshly built optimizer can resume from any phase::

    from cmd_optim.integrations import fsdp
    fsdp.save(optimizer, "checkpoints/step-400")          # beside dcp.save(model.state_dict(), ...)
    fsdp.load(optimizer, "checkpoints/step-400")          # in the resumed run, after the model is loaded
"""

from __future__ import annotations

import json

import torch
import torch.distributed.checkpoint as dcp

__all__ = ["load", "save"]


def save(optimizer, checkpoint_id) -> None:
    """``optimizer.state_dict()`` into the DCP checkpoint ``checkpoint_id`` (every rank calls it)."""
    leaves: dict[str, torch.Tensor] = {}
    structure = _describe(optimizer.state_dict(), leaves)
    dcp.save({"cmd_leaves": leaves, "cmd_structure": json.dumps(structure)}, checkpoint_id=checkpoint_id)


def load(optimizer, checkpoint_id) -> None:
    """Load the state :func:`save` wrote into ``optimizer`` (every rank calls it)."""
    described = {"cmd_structure": ""}
    dcp.load(described, checkpoint_id=checkpoint_id)
    structure = json.loads(described["cmd_structure"])
    mesh = optimizer.sharding.mesh if getattr(optimizer, "sharding", None) is not None else None
    leaves: dict[str, torch.Tensor] = {}
    _templates(structure, leaves, mesh)
    target = {"cmd_leaves": leaves}
    dcp.load(target, checkpoint_id=checkpoint_id)
    optimizer.load_state_dict(_rebuild(structure, target["cmd_leaves"]))


def _describe(value, leaves: dict):
    """A JSON description of a nested state; its tensors go into ``leaves`` under numbered keys."""
    if isinstance(value, torch.Tensor):
        key = str(len(leaves))
        leaves[key] = value
        placements = getattr(value, "placements", None)
        dim = placements[0].dim if placements else None
        return {"tensor": key, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "sharded_dim": dim}
    if isinstance(value, dict):
        return {"dict": [[_describe_key(k), _describe(v, leaves)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_describe(v, leaves) for v in value]}
    return {"value": value}


def _describe_key(key):
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"state keys must be strings or integers, got {key!r}")
    return {"int": key} if isinstance(key, int) else {"str": key}


def _templates(structure, leaves: dict, mesh) -> None:
    """Empty tensors (DTensors on ``mesh`` where sharded) of every saved tensor's shape, for DCP to fill."""
    if "tensor" in structure:
        dtype = getattr(torch, structure["dtype"])
        if structure["sharded_dim"] is None:
            leaves[structure["tensor"]] = torch.zeros(structure["shape"], dtype=dtype)
        else:
            if mesh is None:
                raise ValueError("the checkpoint holds FSDP2 shards; this optimizer's parameters are not sharded")
            from torch.distributed.tensor import Shard, zeros

            leaves[structure["tensor"]] = zeros(structure["shape"], dtype=dtype, device_mesh=mesh,
                                                placements=[Shard(structure["sharded_dim"])])
    for child in _children(structure):
        _templates(child, leaves, mesh)


def _children(structure):
    if "dict" in structure:
        return [child for _, child in structure["dict"]]
    return structure.get("list", structure.get("tuple", []))


def _rebuild(structure, leaves: dict):
    if "tensor" in structure:
        return leaves[structure["tensor"]]
    if "dict" in structure:
        return {next(iter(key.values())): _rebuild(child, leaves) for key, child in structure["dict"]}
    if "list" in structure:
        return [_rebuild(child, leaves) for child in structure["list"]]
    if "tuple" in structure:
        return tuple(_rebuild(child, leaves) for child in structure["tuple"])
    return structure["value"]
