"""Re-estimating BatchNorm running statistics for the final weights ("precise BN").

During training the running averages lag behind weights that move quickly, so inference with
running statistics (which deployment needs: docs/method.md, section 3) drifts from what the network
learned. After each epoch the statistics are recomputed exactly as the average over a number of
training batches, with the weights fixed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, forward: Callable[[object], object]) -> int:
    """Reset every BatchNorm's running stats and average them over ``forward(batch)`` calls in
    train mode (cumulative average, momentum=None). Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for batch in batches:
            if batch is None:
                continue
            if forward(batch) is not False:
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used
