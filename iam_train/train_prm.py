"""Stage 1: train the classification/peak network from image-level labels (SPEC section 1)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .batchnorm import recalibrate_batchnorm
from .config import PRMTrainConfig, save_config
from .data.datasets import ClassificationDataset, collate_skip
from .engine import (
    EpochSampler,
    RunLog,
    Runtime,
    autocast,
    open_run,
    restore_training_state,
    save_training_state,
)
from .evaluate import average_precision
from .models import ResNetFCN, find_peaks, peak_stimulated_scores


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


@torch.no_grad()
def evaluate_classification(model, loader, config: PRMTrainConfig, rt: Runtime, labels: np.ndarray) -> float:
    """Classification mAP over classes with positives; difficult (0) labels are ignored."""
    model.eval()
    scores = []
    for batch in loader:
        if batch is None:
            continue
        with autocast(rt, config.amp):
            scores.append(class_scores(model, batch[0].to(rt.device), config).float().cpu())
    scores = torch.cat(scores).numpy()
    aps = []
    for c in range(labels.shape[1]):
        keep = labels[: len(scores), c] != 0
        ap = average_precision(scores[keep, c], labels[: len(scores), c][keep] == 1)
        if ap == ap:
            aps.append(ap)
    return float(np.mean(aps)) if aps else float("nan")


def train_prm(config: PRMTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a PRM run in ``out``; returns the final summary."""
    out = Path(out)
    rt, ckpt = open_run(out, "iam-prm", config.device, resume)

    train_set = ClassificationDataset(config.data, config.split, config.image_size, config.flip, config.seed)
    classes = train_set.voc.classes
    sampler = EpochSampler(len(train_set), config.seed, True, rt.rank, rt.world_size)
    loader = DataLoader(train_set, config.batch_size, sampler=sampler, num_workers=config.workers,
                        collate_fn=collate_skip, drop_last=False, persistent_workers=False)
    val_loader = val_labels = None
    if config.val_split:
        val_set = ClassificationDataset(config.data, config.val_split, config.image_size, 0.0, config.seed)
        val_loader = DataLoader(val_set, config.batch_size, shuffle=False, num_workers=config.workers, collate_fn=collate_skip)
        val_labels = val_set.labels

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

    summary: dict = {"run": str(out), "classes": list(classes), "skipped_images": train_set.skipped}
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        net.train()
        started, seen, total_loss, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"prm epoch {epoch + 1}/{config.epochs}", disable=not (progress and rt.is_main))
        for batch in bar:
            if batch is None:
                continue
            images, targets = (t.to(rt.device, non_blocking=True) for t in batch)
            with autocast(rt, config.amp):
                scores = class_scores(net, images, config)
            loss = F.multilabel_soft_margin_loss(scores.float(), targets)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(images) * rt.world_size
            total_loss += loss.item()
            steps += 1
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
            log.scalar("train/loss", loss.item(), epoch * len(loader) + steps)
        sched.step()
        if config.bn_recalibration_batches:
            recalibrate_batchnorm(model, itertools.islice(loader, config.bn_recalibration_batches),
                                  lambda batch: model(batch[0].to(rt.device)))
        row = {"epoch": epoch + 1, "train_loss": total_loss / max(steps, 1),
               "images_per_s": seen / (time.perf_counter() - started), "lr": opt.param_groups[1]["lr"]}
        if val_loader is not None:
            row["val_mAP"] = evaluate_classification(model, val_loader, config, rt, val_labels)
        metric = row.get("val_mAP", -row["train_loss"])
        is_best = metric > best
        best = max(best, metric)
        if rt.is_main:
            save_training_state(out, "iam-prm", model, opt, sched, epoch + 1, best, config, is_best,
                                classes=list(classes), arch=config.backbone, image_size=config.image_size,
                                upsample_factor=config.upsample_factor, win_size=config.win_size,
                                threshold_mode=config.threshold_mode)
            log.epoch(row)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        summary.update(row)
    log.close()
    summary["best_metric"] = best
    return summary
