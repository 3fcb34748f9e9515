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


def setup(device_name):
    """-> (rank, world size, device); under torchrun it joins the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
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
    return rank, world, device


def cleanup(rt):
    if rt.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, rt):
    """Sum of `tensor` over all processes (in place; returned for convenience). No-op for one process."""
    if rt.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model, rt):
    """DistributedDataParallel under torchrun (gradients all-reduced in backward); the model itself otherwise."""
    if not rt.active:
        return model
    ids = [rt.device.index] if rt.cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
