"""How the MoE block finds the LoRA adapters peft puts on its fused experts, so peft code runs unchanged.

`get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))`
replaces the block's experts module by one peft `ParamWrapper` per targeted tensor, nested (the outer wraps the
inner, the innermost wraps the experts). Each holds, per adapter, lora_A [E*r, in] (rows e*r .. e*r+r-1 are
expert e's A_e) and lora_B [out, r*E] (column j*E + e is column j of expert e's B_e), and peft's delta of expert e
is scaling * B_e @ A_e in the [out, in] sense, whichever way the parameter itself is stored (peft reads the
experts' `is_transposed`). The block keeps peft's modules, names and tensors as they are (so save_pretrained,
loading into plain HF + peft and merge_and_unload see what they see on the HF model) and only reads the factors
from them, as views, in grouped_mm's orientation: a [E, in, r] and b [E, r, out], scaling folded into b.
Under expert parallelism (distributed.adapters) lora_A and lora_B are DTensors whose local shards are this same
layout for the rank's own experts, and the factors are read from those shards.
The projection math (`project` and its gradients) is shared by the fused custom ops (kernels.moe) and
the composed path of Experts: on the routed rows a projection is y = x W_e + (x a_e) b_e, two grouped GEMMs of rank
r beside the base one, never W + B·A; the rank-r product x a_e is all the fused ops keep for backward ([rows, r],
about 1 MB a layer at 4096 tokens).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .grouped_mm import grouped_mm as _grouped_mm
from .spec import ExpertsSpec

LoraFactors = tuple[torch.Tensor, torch.Tensor]  # (a [E, in, r], b [E, r, out]) with the scaling folded into b


def project(inputs: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
            offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs @ W_e + (inputs @ a_e) @ b_e, the rank-r product inputs @ a_e or None) per expert group of rows."""
    out = _grouped_mm(inputs, weight, offs=offsets)
    if a is None:
        return out, None
    low = _grouped_mm(inputs, a, offs=offsets)
    return out + _grouped_mm(low, b, offs=offsets), low


def project_input_grad(grad: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                       offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d inputs, d of the rank-r product or None) of `project` given d out."""
    d_inputs = _grouped_mm(grad, weight.transpose(-2, -1), offs=offsets)
    if a is None:
        return d_inputs, None
    d_low = _grouped_mm(grad, b.transpose(-2, -1), offs=offsets)
    return d_inputs + _grouped_mm(d_low, a.transpose(-2, -1), offs=offsets), d_low


def factor_grads(inputs: torch.Tensor, grad: torch.Tensor, low: torch.Tensor | None, d_low: torch.Tensor | None,
                 offsets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d a [E, in, r], d b [E, r, out]) per expert from the rows' inputs, d out, and the rank-r product and its
    gradient; (None, None) without factors."""
    if low is None:
        return None, None
    return _grouped_mm(inputs.t(), d_low, offs=offsets), _grouped_mm(low.t(), grad, offs=offsets)


ADAPTED_PARAMETERS = ("gate_up_proj", "down_proj")
# grouped_mm on CUDA wants 16-byte rows: ranks are padded with zero columns up to a multiple of this
RANK_MULTIPLE = 8


def _param_wrapper_class() -> type | None:
    """peft's ParamWrapper if peft is imported; without peft loaded no module can be one."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "ParamWrapper", None)


def split_param_wrappers(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(the experts module under any peft ParamWrappers, those wrappers by the parameter each adapts)."""
    wrapper_cls = _param_wrapper_class()
    wrappers = {}
    while wrapper_cls is not None and isinstance(module, wrapper_cls):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    unknown = set(wrappers) - set(ADAPTED_PARAMETERS)
    if unknown:
        raise ValueError(
            f"automoe computes expert LoRA on {ADAPTED_PARAMETERS} only; the LoraConfig also targets "
            f"{sorted(unknown)}. Drop those from target_parameters."
        )
    return module, wrappers


def projection_dims(spec: ExpertsSpec, name: str) -> tuple[int, int]:
    """(in, out) features of one expert projection."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    return (hidden, 2 * inter) if name == "gate_up_proj" else (inter, hidden)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (expert adapters under expert parallelism,
    distributed.adapters), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def lora_factors(wrapper: nn.Module, spec: ExpertsSpec, dtype: torch.dtype, num_experts: int) -> LoraFactors | None:
    """(a [E, in, r], b [E, r, out]) of the wrapper's active, unmerged adapters (several sum: their ranks are
    concatenated) for the `num_experts` experts this rank computes, in `dtype`, or None when peft would add
    nothing (adapters disabled, merged or none active)."""
    if wrapper.disable_adapters or wrapper.merged:
        return None
    adapters = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if not adapters:
        return None
    name = wrapper.parameter_name
    dims = projection_dims(spec, name)
    if (wrapper.in_features, wrapper.out_features) != dims:
        raise ValueError(
            f"peft's LoRA on experts.{name} has (in, out) = ({wrapper.in_features}, {wrapper.out_features}) but the "
            f"experts compute {dims}: the adapter was made for another layout (a model whose experts module did not "
            "declare is_transposed). Build the peft model from an automoe model of this version."
        )
    fan_in, fan_out = dims
    a_parts, b_parts = [], []
    for adapter in adapters:
        lora_a, lora_b = local_tensor(wrapper.lora_A[adapter].weight), local_tensor(wrapper.lora_B[adapter].weight)
        rank = wrapper.r[adapter]
        if lora_a.shape[0] != num_experts * rank:
            raise ValueError(
                f"peft's LoRA on experts.{name} holds {lora_a.shape[0] // rank} experts' factors here but this rank "
                f"computes {num_experts} experts (expert parallelism): after get_peft_model, and before building the "
                "optimizer, call automoe.distributed.distribute_adapters(model, setup), which gives each rank its "
                "experts' adapters."
            )
        a_parts.append(lora_a.view(num_experts, rank, fan_in).transpose(1, 2))
        b_parts.append(lora_b.view(fan_out, rank, num_experts).permute(2, 1, 0) * wrapper.scaling[adapter])
    a, b = torch.cat(a_parts, dim=2).to(dtype), torch.cat(b_parts, dim=1).to(dtype)
    pad = -a.shape[2] % RANK_MULTIPLE
    if pad:
        a, b = F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))
    return a, b.contiguous()


def adapter_factors(
    wrappers: dict[str, nn.Module], spec: ExpertsSpec, dtype: torch.dtype, num_experts: int
) -> tuple[LoraFactors | None, LoraFactors | None]:
    """(gate/up factors or None, down factors or None) from `split_param_wrappers`' wrappers, for the
    `num_experts` experts this rank computes."""
    return tuple(  # type: ignore[return-value]
        lora_factors(wrappers[name], spec, dtype, num_experts) if name in wrappers else None
        for name in ADAPTED_PARAMETERS
    )
