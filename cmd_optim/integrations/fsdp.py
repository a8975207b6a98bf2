"""Saving and loading a CMDOptimizer's state with torch.distributed.checkpoint (DCP), sharded under FSDP2.

Every rank passes its state; tensors that differ between ranks (this rank's rows of the warm-up snapshots,
of the mode map, of the base optimizer's state) are DTensors and are written shard by shard; the rest is the
same on every rank. DCP loads into a state of the same structure: :func:`load` reads the saved structure
first and builds that, so a freshly built optimizer can resume from any phase. The parameters may sit on
several DeviceMesh objects over the same ranks (``fully_shard`` per block, then on the root); each loaded
shard is placed on a mesh of the same dimension names as the one it was saved from::

    from cmd_optim.integrations import fsdp
    fsdp.save(optimizer, "checkpoints/step-400")          # beside dcp.save(model.state_dict(), ...)
    fsdp.load(optimizer, "checkpoints/step-400")          # in the resumed run, after the model is loaded
"""

from __future__ import annotations

import json

import torch
import torch.distributed.checkpoint as dcp

from ..optim.sharding import is_sharded

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
    leaves: dict[str, torch.Tensor] = {}
    _templates(structure, leaves, _meshes(optimizer))
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
        described = {"tensor": key, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                     "sharded_dim": dim}
        if placements:
            described["mesh_dim_names"] = value.device_mesh.mesh_dim_names
        return described
    if isinstance(value, dict):
        return {"dict": [[_describe_key(k), _describe(v, leaves)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_describe(v, leaves) for v in value]}
    return {"value": value}


def _describe_key(key):
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"state keys must be strings or integers, got {key!r}")
    return {"int": key} if isinstance(key, int) else {"str": key}


def _meshes(optimizer) -> list:
    """The optimizer's device meshes, the one its sharding's collectives use first, then one per set of
    dimension names among its parameters' meshes (which CMDOptimizer checked to span the same ranks)."""
    sharding = getattr(optimizer, "sharding", None)
    meshes = [] if sharding is None else [sharding.mesh]
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_sharded(p) and all(m.mesh_dim_names != p.device_mesh.mesh_dim_names for m in meshes):
                meshes.append(p.device_mesh)
    return meshes


def _templates(structure, leaves: dict, meshes: list) -> None:
    """Empty tensors (DTensors where sharded, on the mesh of the saved one's dimension names, or the
    sharding's) of every saved tensor's shape, for DCP to fill."""
    if "tensor" in structure:
        dtype = getattr(torch, structure["dtype"])
        if structure["sharded_dim"] is None:
            leaves[structure["tensor"]] = torch.zeros(structure["shape"], dtype=dtype)
        else:
            if not meshes:
                raise ValueError("the checkpoint holds FSDP2 shards; this optimizer's parameters are not sharded")
            from torch.distributed.tensor import Shard, zeros

            names = structure.get("mesh_dim_names")
            names = tuple(names) if names is not None else None
            mesh = next((m for m in meshes if m.mesh_dim_names == names), meshes[0])
            leaves[structure["tensor"]] = zeros(structure["shape"], dtype=dtype, device_mesh=mesh,
                                                placements=[Shard(structure["sharded_dim"])])
    for child in _children(structure):
        _templates(child, leaves, meshes)


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
