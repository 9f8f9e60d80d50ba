"""The columns a bench run compares: how each model is built and which optimizer it steps with.

automoe: AutoMoEForCausalLM with its kernels and fused loss; automoe+compile: the same model after
`model.compile()` (torch.compile's default inductor backend; not among the default columns). v5: Transformers v5
at its best on one GPU (experts_implementation="grouped_mm", attn_implementation="sdpa"). v5+liger: v5 after
Liger-Kernel's patch for the family (it patches classes, so it only ever runs in a process of its own or last).
nemo: NeMo AutoModel's NeMoAutoModelForCausalLM with its recipe's loss, one GPU, in a process of its own
(nemo_column.py). All in bf16 with AdamW; under torchrun, FSDP2 (automoe's distributed setup; fully_shard per
decoder layer + root for the v5 columns; no nemo column).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

COLUMNS = ("automoe", "automoe+compile", "v5", "v5+liger", "nemo")
DEFAULT_COLUMNS = ("automoe", "v5", "v5+liger", "nemo")
OPTIMIZERS = ("automoe", "automoe-in-backward", "torch")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    router: str = "model"
    kernels: str = "auto"
    optimizer: str = "torch"  # automoe column: one of OPTIMIZERS; the peers always step torch's fused AdamW

    @property
    def automoe(self) -> bool:
        return self.name.startswith("automoe")

    @property
    def key(self) -> str:
        """Unique per column of a run, safe in file names."""
        base = self.name.replace("+", "-")
        return f"{base}-{self.optimizer}" if self.automoe else base

    @property
    def label(self) -> str:
        if self.automoe:
            router = "balanced router" if self.router == "balanced" else "own router"
            extra = ", AdamW in backward" if self.optimizer == "automoe-in-backward" else ""
            extra += ", torch AdamW" if self.optimizer == "torch" else ""
            compiled = " + torch.compile" if self.name == "automoe+compile" else ""
            return f"automoe{compiled} ({router}{extra})"
        return {"v5": "Transformers v5 (grouped_mm + sdpa)", "v5+liger": "v5 + Liger-Kernel",
                "nemo": "NeMo AutoModel"}[self.name]


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def build_model(spec: ColumnSpec, config, device: torch.device):
    """The column's model in bf16 on `device`, random weights from the current seed."""
    if spec.name == "nemo":
        raise ValueError("the nemo column's model is built by automoe.bench.nemo_column.build, with its recipe loss")
    common = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if spec.automoe:
        from automoe import AutoMoEForCausalLM

        options = {"kernels": spec.kernels, "fused_loss": True, "router": spec.router}
        if distributed():
            from automoe import create_distributed_setup_from_config

            setup = create_distributed_setup_from_config({"strategy": "fsdp2"})
            model = AutoMoEForCausalLM.from_config(config, automoe_options=options, distributed_setup=setup, **common)
        else:
            with device:
                model = AutoMoEForCausalLM.from_config(config, automoe_options=options, **common)
        if spec.name == "automoe+compile":
            model.compile()  # in place: the same module, its forward compiled on the first (warm-up) step
        return model
    if spec.name == "v5+liger":
        import liger_kernel.transformers as liger

        patch = getattr(liger, f"apply_liger_kernel_to_{config.model_type}", None)
        if patch is None:
            raise RuntimeError(f"liger-kernel has no apply_liger_kernel_to_{config.model_type}")
        patch()
    with device:
        model = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm", **common)
    if distributed():
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def build_optimizer(spec: ColumnSpec, model, lr: float = 1e-5) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    on_gpu = params[0].is_cuda
    if spec.automoe and spec.optimizer.startswith("automoe"):
        from automoe.kernels import AdamW

        in_backward = spec.optimizer == "automoe-in-backward"
        return AdamW(params, lr=lr, weight_decay=0.01, kernels=spec.kernels, in_backward=in_backward)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=on_gpu)
