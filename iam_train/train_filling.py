"""Stage 2: train the instance extent filling network on proposal pseudo ground truth, with the
peak network frozen and its peak backprop in the batched form (docs/method.md, section 3)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .batchnorm import recalibrate_batchnorm
from .checkpoint import PRMMetadata, load_checkpoint
from .config import FillingTrainConfig, save_config
from .data.datasets import FillingDataset, FillingItem, collate_skip
from .engine import (
    EpochSampler,
    RunLog,
    all_reduce_sum,
    autocast,
    average_batchnorm_statistics,
    epoch_losses,
    open_run,
    restore_training_state,
    save_training_state,
)
from .models import InstanceExtentFilling, PeakBackprop, ResNetFCN, find_peaks
from .pseudo_gt import pseudo_targets
from .validate import instance_quality


def prm_checkpoint_path(source: str | Path) -> Path:
    """A PRM run directory (its best.pt, else last.pt) or a checkpoint file."""
    path = Path(source)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    return path


def load_prm(source: str | Path) -> tuple[ResNetFCN, PRMMetadata]:
    """A trained PRM network from a run directory or a checkpoint file (see
    :func:`prm_checkpoint_path`): the model in eval mode and the checkpoint's metadata."""
    path = prm_checkpoint_path(source)
    ckpt = load_checkpoint(path, "iam-prm")
    meta = PRMMetadata.from_dict(ckpt, str(path))
    model = ResNetFCN(meta.arch, num_classes=len(meta.classes), weights=None)
    model.load_state_dict(ckpt["model"])
    return model.eval(), meta


def select_peaks(crm: Tensor, labels: Tensor, meta: PRMMetadata, limit: int) -> Tensor:
    """Peaks (P, 3) of one image's CRM (1, C, h, w) on classes the image is labelled with
    (present or difficult), highest first, at most ``limit``."""
    found = find_peaks(crm, meta.win_size, meta.threshold_mode, 0.0, meta.upsample_factor, 10 * limit + 10)
    coords = found.coords[0, : found.counts[0]]
    keep = labels.to(coords.device)[coords[:, 0]] >= 0
    return coords[keep][:limit]


class PeakTeacher:
    """The frozen PRM network: features, peaks and peak response maps of images, from one
    forward pass per batch (its :class:`~iam_train.models.peak_backprop.PeakTape`)."""

    def __init__(self, model: ResNetFCN, meta: PRMMetadata):
        self.model, self.meta = model, meta
        self.backprop = PeakBackprop(model, meta.upsample_factor)
        for p in model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, items: list[FillingItem], limit: int, device) -> tuple:
        """-> (BackboneOutput of the batch, PRMs (N, H, W), owners (N,) image index of each,
        peaks (N, 3)); the last three None when no image has a peak."""
        tape = self.backprop.record(torch.stack([it.image for it in items]).to(device))
        out = tape.features
        prms, owners, peaks = [], [], []
        for i, item in enumerate(items):
            p = select_peaks(out.crm[i : i + 1].float(), item.labels, self.meta, limit)
            if len(p):
                prms.append(tape.backward(p, i))
                owners.append(torch.full((len(p),), i, device=device))
                peaks.append(p)
        if not prms:
            return out, None, None, None
        return out, torch.cat(prms), torch.cat(owners), torch.cat(peaks)


def train_filling(config: FillingTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    rt, ckpt = open_run(out, "iam-filling", config.device, resume)

    prm_model, meta = load_prm(config.prm)
    prm_model = prm_model.to(rt.device)
    teacher = PeakTeacher(prm_model, meta)
    dataset = FillingDataset(config.data, config.split, meta.image_size, config.max_proposals,
                             config.min_area, config.max_area, flip=0.0, seed=config.seed)
    if tuple(dataset.voc.classes) != meta.classes:
        raise ValueError(f"the PRM network knows classes {list(meta.classes)}, the data has {dataset.voc.classes}")
    sampler = EpochSampler(len(dataset), config.seed, True, rt.rank, rt.world_size)
    loader = DataLoader(dataset, config.batch_size, sampler=sampler, num_workers=config.workers, collate_fn=collate_skip)

    torch.manual_seed(config.seed)
    model = InstanceExtentFilling(prm_model.feature_channels, config.channels, config.kernel_size,
                                  config.hidden, config.steps, config.align_corners).to(rt.device)
    if config.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=config.lr)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (rmsprop, adam)")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    start_epoch, best = 0, float("-inf")
    if ckpt is not None:
        start_epoch, best = restore_training_state(ckpt, model, opt, sched)
    if rt.is_main:
        save_config(config, out / "config.yaml")
    net = DistributedDataParallel(model) if rt.distributed else model
    log = RunLog(out, rt.is_main)
    val_set = None
    if config.val_split:
        val_set = FillingDataset(config.data, config.val_split, meta.image_size, config.max_proposals,
                                 config.min_area, config.max_area)

    def bn_forward(items):
        if items is None:
            return False
        feats, prm, owners, _ = teacher(items, config.max_peaks_per_image, rt.device)
        if prm is None:
            return False
        model(prm, model.affinity_kernels(feats.c2, feats.c3, feats.c4)[owners])

    summary: dict = {"run": str(out), "prm": str(prm_checkpoint_path(config.prm)), "skipped_images": dataset.skipped, "rank": rt.rank}

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        net.train()
        started, seen, total, steps, peaks_seen = time.perf_counter(), 0, 0.0, 0, 0
        bar = tqdm(loader, desc=f"filling epoch {epoch + 1}/{config.epochs}", disable=not (progress and rt.is_main))
        for step, items in enumerate(bar):
            if items is None:
                continue
            feats, prm, owners, _ = teacher(items, config.max_peaks_per_image, rt.device)
            if prm is None:
                continue
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 10_007 + step * 101 + rt.rank)
            targets, valid = [], []
            for i, item in enumerate(items):
                sel = owners == i
                t, v = pseudo_targets(prm[sel].cpu(), item.proposals, gen, config.balance, config.contour_width,
                                      config.top_k, config.duplicate_iou)
                targets.append(t)
                valid.append(v)
            targets = torch.cat(targets).to(rt.device)
            valid = torch.cat(valid).to(rt.device)
            if not valid.any():
                continue
            with autocast(rt, config.amp):
                kernels = model.affinity_kernels(feats.c2, feats.c3, feats.c4)
                iam = net(prm, kernels[owners])
            loss = F.binary_cross_entropy(iam.float()[valid].clamp(1e-6, 1 - 1e-6), targets[valid])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(items)
            peaks_seen += int(valid.sum())
            total += loss.item()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
            log.scalar("train/loss", loss.item(), epoch * len(loader) + steps)
        sched.step()
        seconds = time.perf_counter() - started
        if config.bn_recalibration_batches:
            recalibrate_batchnorm(model, itertools.islice(loader, config.bn_recalibration_batches), bn_forward)
            average_batchnorm_statistics(rt, model)
        images, peaks_total = all_reduce_sum(rt, seen, peaks_seen)
        row = {"epoch": epoch + 1, **epoch_losses(rt, total, steps), "peaks": int(peaks_total),
               "images_per_s": images / seconds}
        if val_set is not None:  # every rank the same (identical weights), keyed by dataset index
            quality = instance_quality(teacher, model, val_set, config.max_peaks_per_image, rt.device)
            row["val_mean_iou"], row["val_prm_mean_iou"] = quality.mean_iou, quality.prm_mean_iou
            row["val_skipped"] = quality.skipped
        metric = row.get("val_mean_iou", -row["train_loss"])
        is_best = metric > best
        best = max(best, metric)
        if rt.is_main:
            save_training_state(out, "iam-filling", model, opt, sched, epoch + 1, best, config, is_best, prm_meta=meta.to_dict(),
                                filling=model.architecture())
            log.epoch(row)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        summary.update(row)
    log.close()
    return summary
