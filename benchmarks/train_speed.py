"""Training throughput of the PRM stage (forward + peak stimulation + backward + SGD step).

    python -m benchmarks.train_speed --configs resnet18@224,resnet50@448 --batch-size 8
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
import torch.nn.functional as F

from iam_train.config import PRMTrainConfig
from iam_train.models import ResNetFCN
from iam_train.train_prm import class_scores

from .common import machine_info, time_call, write_json


@click.command()
@click.option("--configs", default="resnet18@224,resnet50@448", show_default=True, help="backbone@size,...")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(configs: str, batch_size: int, repeats: int, out: Path | None) -> None:
    results = {"machine": machine_info(), "batch_size": batch_size, "runs": {}}
    for item in configs.split(","):
        arch, size = item.split("@")
        config = PRMTrainConfig(backbone=arch, image_size=int(size))
        model = ResNetFCN(arch, num_classes=20).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch_size, 3, int(size), int(size))
        targets = (torch.rand(batch_size, 20) > 0.8).float()

        def step(model=model, images=images, config=config, targets=targets, opt=opt):
            loss = F.multilabel_soft_margin_loss(class_scores(model, images, config), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t = time_call(step, repeats)
        t["images_per_s"] = batch_size / t["median_s"]
        results["runs"][item] = t
        click.echo(f"{item}: {t['images_per_s']:.2f} images/s (batch {batch_size}, median of {repeats} steps)")
    if out:
        write_json(out, results)


if __name__ == "__main__":
    main()
