"""Data-parallel training over processes: one process per GPU (or CPU worker), started by torchrun.

Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: synchronized SGD on 8 GPUs, 2 images each (batch 16),
with SyncBN statistics over all of them when BN is used. Goyal et al. 2017 ("Accurate, Large Minibatch SGD") for
why a distributed step must equal one step on the joint batch: then the linear LR scaling rule applies unchanged.

    torchrun --nproc_per_node=8 train.py --preset r50_fpn_gn --batch-size 2        # 8 x 2 = the paper's batch 16
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...   # several machines

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `init` reads them (the env:// rendezvous).
W = world size (processes), r = this process's rank, n_r = a count (sampled anchors, RoIs, mask pixels) on rank r.

How the pieces fit:
- data.TrainSampler gives rank r the items r, r + W, ... of one global stream, so the W shards of iteration k
  together are exactly the single-process batch k of W x batch images;
- DistributedDataParallel averages gradients over the processes;
- every loss is a sum over its rank's items divided by `loss_denominator(n_r)` = (sum_q n_q) / W, so the average
  over the processes of the per-rank gradients is the gradient of the joint-batch loss, sum_r S_r / sum_q n_q;
- norm.SyncBatchNorm all-reduces its statistics, so BN layers also see the joint batch;
- evaluation shards the images (data.make_eval_loader) and `gather` collects the results on rank 0.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def init(device):
    """Join the process group torchrun describes in the environment; without torchrun, a single process.

    device: "cpu" or "cuda"; each GPU process takes cuda:LOCAL_RANK. Backends: nccl for GPUs, gloo for CPUs.
    Returns (rank, world_size, torch.device).
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device.startswith("cuda")
    if world_size == 1:
        # cuda:N becomes the current device, which torch.cuda's memory statistics and RNG state refer to
        if cuda and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device).index)
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # the others wait in a collective while rank 0 alone runs COCOeval, which on COCO val can pass nccl's
        # default timeout of 10 minutes
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def loss_denominator(count, device=None):
    """What a per-process loss divides its sum by: (count summed over the processes) / W, at least 1; a float tensor
    (W > 1) or a float (one process).

    One process: the count itself (a mean). W processes: DistributedDataParallel averages the W gradients, so the
    result is the gradient of sum_r S_r / sum_q n_q, the loss of one process holding the joint batch.
    Departure: Detectron, Detectron2 and torchvision divide by the local count (the mean on each GPU). The two agree
    when every image fills its sampling quota (256 anchors, 512 RoIs); they differ for the mask loss, whose count is
    the positives on each GPU. DETR normalizes its box losses over all processes in the same way.
    """
    if not is_distributed():  # a Python number: no host-to-device copy (which synchronizes with a GPU)
        return max(float(count), 1.0)
    count = torch.as_tensor(float(count), device=device)
    dist.all_reduce(count)
    return (count / dist.get_world_size()).clamp(min=1.0)


def mean_over_processes(values):
    """{name: scalar tensor} -> the same, averaged over the processes (for logging and the non-finite check)."""
    if not is_distributed() or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / dist.get_world_size()))


def sum_over_processes(numbers, device=None):
    """[int or float] -> the same list, each summed over the processes (e.g. images seen per iteration). device:
    where the backend reduces, i.e. this process's GPU with nccl (which has no CPU tensors), the CPU with gloo."""
    if not is_distributed():
        return list(numbers)
    totals = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return [type(n)(t) for n, t in zip(numbers, totals.tolist())]


def gather(obj):
    """Any picklable object from every process -> [obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere
    (with nccl the pickles travel through rank 0's GPU only)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_buffers(module):
    """Rank 0's buffers on every process: BatchNorm's running statistics drift apart between the processes, as
    DistributedDataParallel copies rank 0's only at the start of each forward (before evaluating, not needed for GN)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier():
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (e.g. writes the synthetic data set), then the others (which find it done)."""
    if get_rank() != 0:
        barrier()
    yield
    if get_rank() == 0:
        barrier()
