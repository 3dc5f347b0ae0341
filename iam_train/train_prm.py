"""Stage 1: train the classification/peak network from image-level labels (docs/method.md, section 1)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .batchnorm import recalibrate_batchnorm
from .checkpoint import PRMMetadata
from .config import PRMTrainConfig, save_config
from .data.datasets import ClassificationDataset, collate_skip
from .engine import (
    EpochSampler,
    RunLog,
    Runtime,
    all_gather,
    all_reduce_sum,
    autocast,
    average_batchnorm_statistics,
    epoch_losses,
    open_run,
    restore_training_state,
    save_training_state,
)
from .evaluate import average_precision
from .models import ResNetFCN, find_peaks, peak_stimulated_scores

logger = logging.getLogger(__name__)


def class_scores(model: torch.nn.Module, images: torch.Tensor, config: PRMTrainConfig) -> torch.Tensor:
    """Peak-stimulated class scores (B, C) of a batch of images."""
    crm = model(images).crm.float()
    peaks = find_peaks(crm.detach(), config.win_size, config.threshold_mode, 0.0, config.upsample_factor, 1)
    return peak_stimulated_scores(crm, peaks.peak_map, config.upsample_factor)


def build_model(config: PRMTrainConfig, num_classes: int) -> ResNetFCN:
    torch.manual_seed(config.seed)
    return ResNetFCN(config.backbone, num_classes=num_classes, weights=config.weights)


def _optimizer(model: ResNetFCN, config: PRMTrainConfig):
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.SGD(
        [{"params": body, "lr": config.lr * config.backbone_lr_mult}, {"params": head, "lr": config.lr}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    if config.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    elif config.scheduler == "none":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    else:
        raise ValueError(f"unknown scheduler {config.scheduler!r} (none, cosine)")
    return opt, sched


@dataclass
class ClassificationMetric:
    mAP: float  # over classes with positives among the evaluated images; difficult (0) ignored
    evaluated: int  # images scored
    skipped: int  # images of the split that could not be read (left out of the metric)


@torch.no_grad()
def evaluate_classification(model, loader, config: PRMTrainConfig, rt: Runtime,
                            dataset: ClassificationDataset) -> ClassificationMetric:
    """Classification mAP on ``dataset`` (the loader's). Scores travel with their dataset
    indices, so an unreadable image drops out of the metric instead of shifting every later
    image onto the wrong labels; under DDP the ranks' shards are gathered first, so every rank
    gets the metric of the whole split."""
    model.eval()
    scores, indices = [], []
    for batch in loader:
        if batch is None:
            continue
        images, _, index = batch
        with autocast(rt, config.amp):
            scores.append(class_scores(model, images.to(rt.device), config).float().cpu())
        indices.append(index)
    local = (torch.cat(scores).numpy() if scores else np.zeros((0, dataset.labels.shape[1]), np.float32),
             torch.cat(indices).numpy() if indices else np.zeros(0, np.int64))
    gathered = all_gather(rt, local)
    all_scores = np.concatenate([g[0] for g in gathered])
    index, first = np.unique(np.concatenate([g[1] for g in gathered]), return_index=True)  # shards repeat to pad
    all_scores, labels = all_scores[first], dataset.labels[index]
    aps = []
    for c in range(labels.shape[1]):
        keep = labels[:, c] != 0
        ap = average_precision(all_scores[keep, c], labels[keep, c] == 1)
        if ap == ap:
            aps.append(ap)
    return ClassificationMetric(float(np.mean(aps)) if aps else float("nan"), len(index), len(dataset) - len(index))


def train_prm(config: PRMTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a PRM run in ``out``; returns the final summary."""
    out = Path(out)
    rt, ckpt = open_run(out, "iam-prm", config.device, resume)

    train_set = ClassificationDataset(config.data, config.split, config.image_size, config.flip, config.seed)
    classes = train_set.voc.classes
    sampler = EpochSampler(len(train_set), config.seed, True, rt.rank, rt.world_size)
    loader = DataLoader(train_set, config.batch_size, sampler=sampler, num_workers=config.workers,
                        collate_fn=collate_skip, drop_last=False, persistent_workers=False)
    val_loader = val_set = None
    if config.val_split:
        val_set = ClassificationDataset(config.data, config.val_split, config.image_size, 0.0, config.seed)
        val_loader = DataLoader(val_set, config.batch_size, num_workers=config.workers, collate_fn=collate_skip,
                                sampler=EpochSampler(len(val_set), config.seed, False, rt.rank, rt.world_size))

    model = build_model(config, len(classes)).to(rt.device)
    opt, sched = _optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and rt.device.type == "cuda" and not torch.cuda.is_bf16_supported())
    start_epoch, best = 0, float("-inf")
    if ckpt is not None:
        if tuple(ckpt["classes"]) != tuple(classes):
            raise ValueError(f"{out / 'last.pt'} was trained on classes {ckpt['classes']}, the data has {classes}")
        start_epoch, best = restore_training_state(ckpt, model, opt, sched)
    if rt.is_main:
        save_config(config, out / "config.yaml")
    net = DistributedDataParallel(model) if rt.distributed else model
    log = RunLog(out, rt.is_main)

    summary: dict = {"run": str(out), "classes": list(classes), "skipped_images": train_set.skipped, "rank": rt.rank}
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        net.train()
        started, seen, total_loss, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"prm epoch {epoch + 1}/{config.epochs}", disable=not (progress and rt.is_main))
        for batch in bar:
            if batch is None:
                continue
            images, targets = (t.to(rt.device, non_blocking=True) for t in batch[:2])
            with autocast(rt, config.amp):
                scores = class_scores(net, images, config)
            loss = F.multilabel_soft_margin_loss(scores.float(), targets)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(images)
            total_loss += loss.item()
            steps += 1
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
            log.scalar("train/loss", loss.item(), epoch * len(loader) + steps)
        sched.step()
        seconds = time.perf_counter() - started
        if config.bn_recalibration_batches:
            recalibrate_batchnorm(model, itertools.islice(loader, config.bn_recalibration_batches),
                                  lambda batch: model(batch[0].to(rt.device)))
            average_batchnorm_statistics(rt, model)
        row = {"epoch": epoch + 1, **epoch_losses(rt, total_loss, steps),
               "images_per_s": all_reduce_sum(rt, seen)[0] / seconds, "lr": opt.param_groups[1]["lr"]}
        if val_loader is not None:
            val = evaluate_classification(model, val_loader, config, rt, val_set)
            row["val_mAP"], row["val_skipped"] = val.mAP, val.skipped
            if val.skipped and rt.is_main:
                logger.warning("%d of %d validation images could not be read: val_mAP is over the other %d",
                            val.skipped, len(val_set), val.evaluated)
        metric = row.get("val_mAP", -row["train_loss"])
        is_best = metric > best
        best = max(best, metric)
        if rt.is_main:
            save_training_state(out, "iam-prm", model, opt, sched, epoch + 1, best, config, is_best,
                                **PRMMetadata(tuple(classes), config.backbone, config.image_size,
                                              config.upsample_factor, config.win_size,
                                              config.threshold_mode).to_dict())
            log.epoch(row)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        summary.update(row)
    log.close()
    summary["best_metric"] = best
    return summary
