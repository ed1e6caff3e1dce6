"""`trainer.strategy: fsdp`: fully sharded data parallel (PyTorch's FSDP2, `fully_shard`), each
transformer block its own unit.

Every process keeps 1/N of each weight, gradient and optimizer state; a block's weights are
gathered just before it runs and freed after, so a model N times larger than one device holds
trains at DDP's global batch. Blocks are the units because they are the repeated, equal-sized
pieces: a unit per block overlaps one block's gathering with the previous block's compute; the
rest (embeddings, the tied output, the task heads) forms the root unit.

FSDP2 runs on GPUs (NCCL) and CPUs (gloo), so the same config is tested on a laptop. Lightning's
ModelParallelStrategy sets up the processes and the device mesh; the model shards itself in
`MultiTaskModel.configure_model`. Checkpoints are gathered into one ordinary file on rank 0, the
same file any other run writes, so fine-tuning and `polyhead predict` read them unchanged.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from modules.errors import UserError
from modules.layers import TransformerBlock


class FullyShardedBlocks(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP: every process of every node in one
    data-parallel group (no tensor parallelism), checkpoints saved whole."""

    def __init__(self) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # all processes shard
        super().setup_environment()


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard each TransformerBlock of `model`, then the rest of it, over `mesh`'s data-parallel
    dimension. Idempotent: Lightning may call configure_model again on a model already sharded."""
    if isinstance(model, FSDPModule):
        return
    if model.backbone.config.reversible:
        raise UserError(
            "trainer.strategy fsdp cannot shard reversible layers (model.backbone.reversible: true): their "
            "backward pass reruns each block's branches outside the hooks that gather its weights; use "
            "strategy ddp, which reversible layers already spare most activation memory"
        )
    data_parallel = mesh["data_parallel"]
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)
