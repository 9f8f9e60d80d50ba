"""Gradient-norm clipping for a model whose gradients live on several device meshes.

Under EP the expert gradients are DTensors on the (ep_shard, ep) mesh and the others on the data-parallel mesh;
torch.nn.utils.clip_grad_norm_ stacks all norms together and refuses mixed meshes. Here each mesh's norm is
reduced on its own, then combined.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_ on EP + FSDP2 models: clips in place, returns the total norm
    (a plain tensor, identical on every rank)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef.to(grad.device))
    return total
