"""Multi-process training under ``torchrun``: process group, model wrapping, collectives, the row split.

Everything that knows about ranks lives here (and in :mod:`worldflow.train.trainer`, which calls it);
the model and loss code only ever asks :func:`rows_of` "which rows of the global batch are mine?".

- **Process group.** :func:`init` joins the group torchrun describes in its environment variables (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA (each process
  then owns ``cuda:LOCAL_RANK``). Without torchrun (or with one process) nothing is initialised and every
  helper answers as the single process it is: rank 0 of 1.
- **Wrapping.** :func:`wrap` puts a module under DDP, or under FSDP2 (``fully_shard`` on every transformer
  block, then on the root) when the ``fsdp`` switch is on; :func:`checkpoint_blocks` turns on activation
  checkpointing per transformer block. Checkpoints always hold the unwrapped module's full state dict, so
  they load the same in one process or many (:func:`full_model_state`, :func:`load_full_model_state`).
- **Row split.** Every rank draws the *global* batch from the same-seeded generator and keeps a contiguous
  slice of its rows (:func:`split_rows`, :func:`take_rows`). While the loss runs, :func:`batch_rows` tells
  :func:`rows_of` which rows those are, so the objective's own random draws (flow noise, τ, d, masks) can
  be made for the global batch and sliced: each rank then sees exactly the numbers a single process would
  for its rows, and the averaged gradient equals the single-process gradient.
- **Collectives** for the training loop: averaging logged scalars, agreeing on a stop flag, barriers and a
  rank-0 broadcast of Python objects. All are no-ops in a single process.
"""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from worldflow.config import Config

# ---------------------------------------------------------------------------------------------------
# Process group and rank helpers


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK): the CUDA device it owns."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that writes checkpoints, logs, TensorBoard, media and progress bars."""
    return rank() == 0


def init(device: str | torch.device = "cpu") -> bool:
    """Join torchrun's process group once (later calls do nothing); True when running distributed.

    gloo for CPU, nccl for CUDA (after ``torch.cuda.set_device(LOCAL_RANK)``). Does nothing and returns
    False outside torchrun or with ``WORLD_SIZE=1``.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if env_world_size() <= 1 or not dist.is_available():
        return False
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_shutdown)
    return is_distributed()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shutdown(rc: int = 0) -> None:
    """End a successful torchrun command: wait for every rank, flush, and leave the process with ``rc``
    at once (``os._exit``), skipping interpreter finalisation and C++ static destructors; a no-op
    (returns) outside torchrun.

    Why not ``destroy_process_group`` and a normal exit: after a finished run rank 0 sometimes aborted in
    that teardown ("terminate called without an active exception", a joinable C++ thread destroyed),
    first with teardown left to ``atexit`` (2 of 7 FSDP2 runs) and again, rarely, with
    ``destroy_process_group`` called before exit (a DDP run in CI, 2026-12-04). Everything that matters
    is on disk by then (checkpoints are written atomically and the run logs closed by the trainer), so
    the operating system reclaims the sockets and threads. The ``atexit`` hook stays for errors.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def device_for(device: str | torch.device) -> torch.device:
    """The device this process should use for a configured ``device``: ``cuda`` becomes
    ``cuda:LOCAL_RANK`` under torchrun (joining the process group first); anything else is unchanged."""
    dev = torch.device(device)
    if dev.type == "cuda" and env_world_size() > 1:
        init(dev)
        return torch.device("cuda", local_rank())
    return dev


def quiet_unless_main() -> None:
    """Send this process's stdout to /dev/null unless it is rank 0 of a torchrun job (or not under
    torchrun): summaries print once. Errors and warnings (stderr) still show from every rank."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for nccl, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_scalars(values: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over ranks; a key some ranks lack (a loss term of rows only others hold)
    is averaged over the ranks that have it. NaN/Inf on any rank makes the average non-finite on every
    rank, so a NaN guard on the result stops all of them together."""
    if not is_distributed():
        return values
    key_lists: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(key_lists, list(values))
    keys = list(dict.fromkeys(k for ks in key_lists for k in ks))
    t = torch.tensor([[values.get(k, 0.0), float(k in values)] for k in keys], dtype=torch.float64,
                     device=_comm_device()).reshape(-1, 2)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t.cpu()
    return {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(keys)}


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. a wall-time budget running out)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (so every rank starts identical)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


# ---------------------------------------------------------------------------------------------------
# Row split of the global batch


@dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of a batch of ``total`` rows (the whole batch in a single process)."""

    start: int
    stop: int
    total: int

    @property
    def count(self) -> int:
        return self.stop - self.start

    def take(self, x: Tensor) -> Tensor:
        """This slice of ``x``, a tensor drawn for all ``total`` rows (batch first)."""
        return x[self.start : self.stop]

    def within(self, lo: int, hi: int) -> Rows:
        """This slice restricted to global rows ``[lo, hi)`` and renumbered from ``lo`` (may be empty)."""
        clip = lambda i: min(max(i, lo), hi) - lo
        return Rows(clip(self.start), clip(self.stop), hi - lo)

    def repeat(self, k: int) -> Rows:
        """The same rows after every row becomes ``k`` consecutive rows (e.g. frames split into items)."""
        return Rows(self.start * k, self.stop * k, self.total * k)


_ROWS: contextvars.ContextVar[Rows | None] = contextvars.ContextVar("worldflow_rows", default=None)


def rows_of(n: int) -> Rows:
    """Where a batch of ``n`` rows sits in the global batch.

    Inside :func:`batch_rows` (the trainer sets it while a rank computes its loss) and when ``n`` is that
    rank's row count: the rank's slice. Otherwise — a single process, evaluation, a sub-batch of another
    size — the batch is the whole batch: ``Rows(0, n, n)``. Random draws made for ``rows_of(n).total`` rows
    and cut with :meth:`Rows.take` are therefore the single-process draws for these rows.
    """
    r = _ROWS.get()
    return r if r is not None and r.count == n else Rows(0, n, n)


@contextmanager
def batch_rows(rows: Rows) -> Iterator[None]:
    """Declare, for the code run inside, that the batch being processed is ``rows`` of the global batch."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def split_rows(total: int, rank_: int | None = None, world: int | None = None) -> Rows:
    """This rank's contiguous share of a global batch of ``total`` rows; ``total`` must divide evenly."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if total % world:
        from worldflow.config import ConfigError

        raise ConfigError(f"a global batch of {total} rows does not split evenly over {world} processes: "
                          f"make the batch size (train_*.batch, agent.imag_batch) a multiple of {world}")
    per = total // world
    return Rows(rank_ * per, (rank_ + 1) * per, total)


def _leaves(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _leaves(v)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from _leaves(getattr(batch, f.name))


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch (tensor, dict, list/tuple or dataclass of them)."""
    for t in _leaves(batch):
        if t.dim() > 0:
            return t.shape[0]
    raise ValueError(f"cannot find a batch dimension in {type(batch).__name__}")


def take_rows(batch: Any, rows: Rows) -> Any:
    """Slice every batch-first tensor of ``batch`` (leading dim ``rows.total``) to ``rows``; tensors,
    dicts, lists/tuples and dataclasses are walked; anything else is kept as is."""
    if rows.start == 0 and rows.stop == rows.total:
        return batch
    if isinstance(batch, Tensor):
        return rows.take(batch) if batch.dim() > 0 and batch.shape[0] == rows.total else batch
    if isinstance(batch, dict):
        return type(batch)((k, take_rows(v, rows)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [take_rows(v, rows) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: take_rows(getattr(batch, f.name), rows)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


# ---------------------------------------------------------------------------------------------------
# Wrapping: activation checkpointing, DDP, FSDP2


def _block_types() -> tuple[type[nn.Module], ...]:
    from worldflow.nn import SpaceTimeBlock

    return (SpaceTimeBlock,)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (the units of FSDP2 sharding and activation checkpointing)."""
    types = _block_types()
    return [m for m in model.modules() if isinstance(m, types)]


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per transformer block: activations inside a block are recomputed in the
    backward pass instead of stored. Applies only to passes that record gradients and use no KV cache
    (streaming inference is unchanged); the state dict is unchanged. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    from worldflow.nn import KVCache

    blocks = transformer_blocks(model)
    for blk in blocks:
        if getattr(blk, "_wf_checkpointed", False):
            continue
        inner = blk.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and not any(isinstance(a, KVCache) for a in (*args, *kwargs.values())):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        blk.forward = forward
        blk._wf_checkpointed = True
    return len(blocks)


def wrap(module: nn.Module, fsdp: bool = False) -> nn.Module:
    """``module`` ready for data-parallel training: unchanged in a single process; DDP across processes;
    with ``fsdp``, FSDP2 (``fully_shard``) on each transformer block and then on ``module`` itself, which
    becomes the root (its forward must run the whole step so root parameters are gathered for it).

    DDP uses ``find_unused_parameters=True``: a rank's rows may leave some parameters unused (e.g. a rank
    whose rows are all single-frame items never touches the action embeddings) while another rank uses them.
    """
    if not is_distributed():
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = next(module.parameters()).device
        broadcast_module(module)  # every rank shards the same weights
        mesh = init_device_mesh(dev.type, (world_size(),))
        for blk in transformer_blocks(module):
            fully_shard(blk, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    ids = [dev.index if dev.index is not None else local_rank()] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` (or a submodule) has FSDP2-sharded parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    """Let code call the submodules of an FSDP2 ``root`` directly (evaluation): the root's own parameters
    are all-gathered for the duration; blocks gather themselves when called. Collective: every rank must
    enter and run the same calls. A no-op unless ``root`` is sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` that also returns a plain float for FSDP2 (DTensor) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------------------------------
# Full (unsharded) state dicts: the checkpoint format is the single-process one


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unwrapped module's full state dict on CPU (collective under FSDP2; complete on rank 0)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in optimizer order (the order ``Optimizer.state_dict`` numbers them)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict in the single-process format (parameters numbered in optimizer order),
    gathered from FSDP2 shards (collective; complete on rank 0)."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_optimizer_state_dict(model, opt, options=options)
    if not sd:
        return {}
    names = _param_names(model, opt)
    index = {n: i for i, n in enumerate(names)}
    # group options as Optimizer.state_dict() writes them (from the live groups), params numbered in order
    groups, start = [], 0
    for g in opt.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (strict) into a possibly FSDP2-sharded module; each rank keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process-format optimizer state dict into the optimizer of a (sharded) module."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, opt)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    sd = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(opt.param_groups, state["param_groups"]):  # options exactly as saved (tuples
        group.update({k: v for k, v in saved.items() if k != "params"})  # stay tuples), as load_state_dict


def device_of(cfg: Config) -> torch.device:
    """The configured device (CPU when CUDA is absent); under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return device_for(cfg.device)
