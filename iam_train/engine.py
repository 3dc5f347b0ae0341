"""What both training stages share: device and distributed set-up, a deterministic sharded
sampler, the run directory and its logs (progress bar, CSV, TensorBoard)."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def all_reduce_sum(rt: Runtime, *values: float) -> list[float]:
    """Each value summed over the ranks (the values themselves in a single process)."""
    if not rt.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(rt: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order ([obj] in a single process)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def average_batchnorm_statistics(rt: Runtime, model: torch.nn.Module) -> None:
    """After each rank re-estimated BatchNorm statistics on its own shard: every rank gets their
    average, so that all ranks validate, and rank 0 saves, the same model."""
    if not rt.distributed:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= rt.world_size


def epoch_losses(rt: Runtime, loss_sum: float, steps: int) -> dict[str, float]:
    """The epoch's mean training loss over every rank's steps (``train_loss``, which chooses
    best.pt without validation) and, under DDP, each rank's own (``train_loss_rank<r>``)."""
    per_rank = all_gather(rt, (loss_sum, steps))
    row = {"train_loss": sum(s for s, _ in per_rank) / max(sum(n for _, n in per_rank), 1)}
    if rt.distributed:
        row.update({f"train_loss_rank{r}": s / max(n, 1) for r, (s, n) in enumerate(per_rank)})
    return row


def setup_runtime(device: str = "auto") -> Runtime:
    """CUDA when present (or asked), CPU otherwise; joins the process group under torchrun
    (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world)


def autocast(rt: Runtime, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on the CPU."""
    if not enabled or rt.device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch), then shards it over
    ranks: a resumed or re-sharded run sees the same order."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.tolist()
        order += order[: self.per_rank * self.world_size - len(order)]  # pad so every rank gets as many
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


class RunLog:
    """metrics.csv (one row per epoch) and TensorBoard events in the run directory; only the
    main process writes."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path = out / "metrics.csv"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and value == value:
                self.scalar(f"epoch/{key}", value, row["epoch"])
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def prepare_run_dir(out: Path, resume: bool) -> None:
    """A new run needs an empty or absent folder; --resume needs a previous last.pt there."""
    if resume:
        if not (out / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {out / 'last.pt'} to resume from")
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def open_run(out: Path, kind: str, device: str, resume: bool) -> tuple[Runtime, dict | None]:
    """Device/process-group set-up and the run directory: a new run needs it empty, a resumed
    one gets its last checkpoint (kind-checked) back."""
    from .checkpoint import load_checkpoint

    rt = setup_runtime(device)
    if rt.is_main:
        prepare_run_dir(out, resume)
    else:  # one voice: rank 0 reports (the warnings are the same on every rank)
        logging.getLogger("iam_train").setLevel(logging.ERROR)
    if rt.distributed:
        dist.barrier()  # the run directory exists before any rank reads or writes it
    return rt, (load_checkpoint(out / "last.pt", kind) if resume else None)


def restore_training_state(ckpt: dict, model, optimizer, scheduler) -> tuple[int, float]:
    """Load a checkpoint written by :func:`save_training_state`: returns (epochs done, best metric)
    and restores the RNG states, so the run continues bit for bit (on the CPU: some CUDA backward
    kernels accumulate with atomics, in an order that varies from run to run)."""
    from .checkpoint import set_rng_state

    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["best_metric"]


def save_training_state(out: Path, kind: str, model, optimizer, scheduler, epoch: int, best: float, config,
                        is_best: bool, **extra) -> None:
    """last.pt (and best.pt when ``is_best``), atomically, with all a resume needs."""
    import dataclasses

    from .checkpoint import rng_state, save_checkpoint

    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "epoch": epoch, "best_metric": best, "rng": rng_state(), "config": dataclasses.asdict(config), **extra}
    save_checkpoint(out / "last.pt", kind, payload)
    if is_best:
        save_checkpoint(out / "best.pt", kind, payload)
