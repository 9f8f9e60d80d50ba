"""Expert parallelism orthogonal to FSDP2: the setup (mesh), the all-to-all dispatcher, and how they are applied.

Under torchrun, every rank runs::

    torch.distributed.init_process_group()          # "nccl" on GPUs, "gloo" on CPU
    setup = create_distributed_setup_from_config({"strategy": "fsdp2", "ep_size": 8,
                                                  "activation_checkpointing": "selective"})
    model = AutoMoEForCausalLM.from_pretrained(path, dtype=torch.bfloat16, distributed_setup=setup)
    ...                                             # each rank trains on its own batches
    clip_grad_norm_(model.parameters(), 1.0)        # torch's own refuses the mixed expert / data meshes
    model.save_pretrained(out)                      # collective; rank 0 writes a standard HF checkpoint

Expert tensors are DTensors Shard(0) over the mesh dimension "ep" and FSDP2-sharded over the other ranks;
every other weight is FSDP2-sharded over the whole data-parallel world. Each rank reads only its slices of the
safetensors files, and the checkpoint it saves has transformers' per-expert keys.
"""

from .adapters import distribute_adapters
from .grad_norm import clip_grad_norm_
from .setup import DistributedSetup, create_distributed_setup_from_config

__all__ = ["DistributedSetup", "clip_grad_norm_", "create_distributed_setup_from_config", "distribute_adapters"]
