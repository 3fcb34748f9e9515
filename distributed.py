"""Multi-process training through torchrun (DistributedDataParallel): PyTorch's engine, nothing home-made.

    torchrun --nproc_per_node 4 train.py ...                                    # one node, 4 processes
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...        # several nodes

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for one
process. Backend NCCL on GPUs, gloo on CPU. Each process trains on its own shard of every
batch-list (--batch_size is per process: the global batch is batch_size x WORLD_SIZE).
"""
import datetime
import os

import torch
import torch.distributed as dist

from utils import UserError, resolve_device

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering ends the job instead of hanging forever


class Context:
    """rank, world size and this process's device."""

    def __init__(self, rank=0, world=1, device=None):
        self.rank, self.world, self.device = rank, world, device

    @property
    def main(self):
        """Only the main process prints, draws progress bars and writes files."""
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


def setup(device_name):
    """Resolves the device and, under torchrun, joins the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(0, 1, resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {local_rank + 1}+ processes on a node with {torch.cuda.device_count()} "
                            "GPU(s); use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Context(rank, world, device)


def cleanup(ctx):
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, ctx):
    """Sum of `tensor` over all processes (in place; returned for convenience). No-op for one process."""
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(order, ctx):
    """This process's share of a list of indices: every world-th one, equal lengths on every rank."""
    usable = len(order) - len(order) % ctx.world
    return order[ctx.rank:usable:ctx.world]


def wrap(model, ctx):
    """DistributedDataParallel under torchrun (gradients all-reduced in backward); the model itself otherwise."""
    if not ctx.active:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
