"""
What train.py needs beyond one process, and for stopping cleanly: the runtime (device, precision and,
under torchrun, the process group), DDP and FSDP2, sharded state dicts in and out, and stop signals.

    torchrun --standalone --nproc_per_node=2 train.py ...              # DDP: a whole copy per process
    torchrun --standalone --nproc_per_node=2 train.py ... --fsdp=True  # FSDP2: each process a shard

Checkpoints are always the ones a single process writes: whole() gathers FSDP's shards before a save,
sharded_like() cuts a saved optimizer state to this process's shards, so a run resumes sharded or
not, on any number of processes. FSDP and DTensor are imported only when fsdp is on (torch >= 2.7).
Ctrl-C, SIGTERM and SIGHUP inside stops_deferred() end training at the next step boundary.
"""

import inspect
import os
import signal
import threading
import warnings
from types import SimpleNamespace

import torch

from lorakit.common import autocast, pick_device, pick_dtype
from configurator import ConfigError, Interrupted, stop_signals


# --- the runtime ------------------------------------------------------------------------------------

def setup_runtime(c):
    """Device, precision and, under torchrun, the process group (DDP, or FSDP with c.fsdp)."""
    rt = SimpleNamespace(distributed='RANK' in os.environ, fsdp=c.fsdp, rank=0, world=1)
    if rt.fsdp:
        check_fsdp_available()
    if rt.distributed:
        rt.rank, local_rank, rt.world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        use_cuda = torch.cuda.is_available() and c.device != 'cpu'
        torch.distributed.init_process_group(backend='nccl' if use_cuda else 'gloo')
        rt.device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(rt.device)
    else:
        rt.device = pick_device(c.device)
    rt.master = rt.rank == 0
    rt.dtype = pick_dtype(c.dtype, rt.device)
    rt.ctx = autocast(rt.device, rt.dtype)
    return rt


def check_fsdp_available():
    """FSDP2's fully_shard is public from torch 2.6, distribute_tensor's src_data_rank from 2.7."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import distribute_tensor
        ok = 'src_data_rank' in inspect.signature(distribute_tensor).parameters
    except ImportError:
        ok = False
    if not ok:
        raise ConfigError(f"fsdp=True needs torch >= 2.7 (FSDP2), this is torch {torch.__version__}: upgrade torch, "
                          f"or drop --fsdp to train with DDP")


def wrap(model, rt):
    """The model as it trains on this process's share: under DDP, wrapped; one process: model itself."""
    if rt.distributed and not rt.fsdp:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[rt.device] if rt.device.startswith('cuda') else None)
    return model


def shard(model):
    """
    FSDP2: each block, then the rest (the embeddings, whose weight the head shares, and ln_f), split
    over the processes; a block's whole weights exist only while it computes, forward and backward.
    """
    from torch.distributed.fsdp import fully_shard
    # a block returns its keys and values as views; they are only ever read (the KV cache concatenates),
    # so FSDP's warning about in-place changes to a view does not apply; nor does its scaler's, about its
    # own one-element tensor
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
    warnings.filterwarnings('ignore', message='Found a non-scalar tensor with numel=1')
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def gradient_scaler(rt):
    """float16's gradient scaler (disabled otherwise); FSDP's agrees across processes on a shard's overflow."""
    device_type = rt.device.split(':')[0]
    if rt.fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device_type, enabled=rt.dtype == 'float16')
    return torch.amp.GradScaler(device_type, enabled=rt.dtype == 'float16')


def all_reduce(t, rt, op='SUM'):
    """t summed (or op'd: 'MAX') over the processes in place, under torchrun; t itself."""
    if rt.distributed:
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t


def finish(rt):
    """End the process group. Every process waits at a barrier first, the GIL released: a gloo thread that
    still has to free a tensor needs the GIL, which the group's destructor would hold while it waits."""
    if rt.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --- sharded state dicts ----------------------------------------------------------------------------

def local(p, rt):
    """This process's part of a parameter: its shard under FSDP, else p."""
    return p.to_local() if rt.fsdp and hasattr(p, 'to_local') else p


def non_finite_parameter(model, rt):
    """The name of a trained parameter that is not all finite, or None. Under FSDP each process checks
    its shards, and every process learns the answer."""
    trained = [(n, local(p, rt)) for n, p in model.named_parameters() if p.requires_grad]
    bad = torch.stack([~torch.isfinite(p.detach()).all() for _, p in trained]).int()
    if rt.fsdp:
        all_reduce(bad, rt, 'MAX')
    return next((n for (n, _), b in zip(trained, bad.tolist()) if b), None)


def whole(state, rt):
    """
    A state_dict (nested) as one process holds it: FSDP's shards (DTensors) gathered into whole tensors
    on the CPU, kept on rank 0 and dropped elsewhere; every process must call it. A tensor that appears
    twice is gathered once and stays one tensor. Without FSDP: state itself.
    """
    if not rt.fsdp:
        return state
    from torch.distributed.tensor import DTensor
    seen = {}

    def gathered(v):
        if isinstance(v, dict):
            return {k: gathered(x) for k, x in v.items()}
        if not isinstance(v, DTensor):
            return v
        if id(v) not in seen:
            full = v.full_tensor().detach()
            seen[id(v)] = full.cpu() if rt.master else None
        return seen[id(v)]
    return gathered(state)


def optimized(optimizer):
    """The optimizer's parameters in the order its state_dict numbers them."""
    return [p for group in optimizer.param_groups for p in group['params']]


def sharded_like(optimizer, saved, rt):
    """A saved optimizer state_dict (one process's) with every tensor cut to this process's shard of its
    parameter, to load into an optimizer of FSDP's sharded parameters. Without FSDP: saved itself."""
    if not rt.fsdp:
        return saved
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = optimized(optimizer)

    def cut(p, v):
        if isinstance(p, DTensor) and v.shape == p.shape:  # not the step count
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return v
    return {**saved, 'state': {i: {k: cut(params[i], v) for k, v in s.items()} for i, s in saved['state'].items()}}


# --- stop signals -----------------------------------------------------------------------------------
# Ctrl-C, Colab's stop button, SIGTERM (Slurm, Kubernetes, `timeout`) or SIGHUP end a run at the
# next step boundary, with a checkpoint; a second signal stops it at once

STOP = {}


def defer_stop(signum, frame):
    if STOP:
        raise Interrupted(signum, "stopped at once; the last complete checkpoint is kept")
    STOP['signum'] = signum


class stops_deferred:
    """While the block runs, a stop signal is noted (STOP) rather than raised; the handlers before it
    come back afterwards. Only the main thread can set handlers: elsewhere signals stay as they are."""

    def __enter__(self):
        STOP.clear()
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {sig: signal.signal(sig, defer_stop) for sig in stop_signals()}

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def stop_requested(rt, it, log_interval):
    """The number of the stop signal received, or 0; under torchrun every rank learns it at the same log step."""
    if not rt.distributed:
        return STOP.get('signum', 0)
    if it % log_interval:
        return 0
    flag = torch.tensor([STOP.get('signum', 0)], device=rt.device)
    return int(all_reduce(flag, rt, 'MAX').item())
