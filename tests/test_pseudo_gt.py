"""Proposal retrieval for the filling network's pseudo ground truth (docs/method.md, section 3)."""

from __future__ import annotations

import torch

from iam_runtime.masks import mask_ious
from iam_train.data.datasets import FillingDataset
from iam_train.pseudo_gt import contour_band, pseudo_targets, score_proposals

from .conftest import shared_path


def _square(size, y0, x0, side):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_contour_band_is_the_inner_edge():
    band = contour_band(_square(20, 5, 5, 10)[None], 2)[0]
    assert band.sum() == 10 * 10 - 6 * 6
    assert band[5, 5] and band[6, 6] and not band[7, 7]


def test_scores_follow_the_formula():
    prm = torch.rand(2, 16, 16)
    masks = torch.stack([_square(16, 2, 2, 8), _square(16, 6, 5, 9)])
    scores = score_proposals(prm, masks, balance=0.1, contour_width=2)
    for p in range(2):
        for n in range(2):
            expected = 0.1 * prm[p][masks[n]].sum() + prm[p][contour_band(masks, 2)[n]].sum()
            torch.testing.assert_close(scores[p, n], expected)


def test_retrieval_prefers_the_segment_that_fits_the_response():
    size = 32
    truth = _square(size, 8, 8, 12)
    prm = torch.zeros(1, size, size)
    prm[0, 8:20, 8:20] = 1.0
    prm /= prm.sum()
    proposals = torch.stack([_square(size, 0, 0, 30), _square(size, 14, 14, 12), truth, _square(size, 9, 9, 10)])
    g = torch.Generator().manual_seed(0)
    target, valid = pseudo_targets(prm, proposals, g, top_k=1)
    assert valid.all() and torch.equal(target[0].bool(), truth)


def test_near_duplicates_are_removed_before_sampling():
    size = 32
    truth = _square(size, 8, 8, 12)
    near = truth.clone()
    near[8, 8] = False  # IoU 143/144 with the truth
    other = _square(size, 20, 20, 10)
    prm = truth.float()[None] / truth.sum()
    picks = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        target, _ = pseudo_targets(prm, torch.stack([truth, near, other]), g, top_k=3, duplicate_iou=0.8)
        picks.add(int(mask_ious(target.bool().numpy(), torch.stack([truth, near, other]).numpy()).argmax()))
    assert picks == {0, 2}  # 'near' never drawn: it duplicates the better 'truth'


def test_no_proposals_gives_no_target():
    target, valid = pseudo_targets(torch.rand(3, 8, 8), torch.zeros(0, 8, 8, dtype=torch.bool), torch.Generator())
    assert not valid.any() and target.shape == (3, 8, 8)


def test_real_voc_sample_proposals_give_image_size_masks():
    root = shared_path("voc-sample")
    data = FillingDataset(root, "trainval", image_size=448)
    g = torch.Generator().manual_seed(0)
    for index in range(len(data)):
        item = data[index]
        assert item is not None and 0 < item.proposals.shape[0] <= 100
        assert item.proposals.shape[1:] == (448, 448)
        full = [torch.from_numpy(m) for m in data.voc.proposals(data.ids[index], limit=100)]
        h, w = full[0].shape
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        prm = torch.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 8) ** 2))[None]
        target, valid = pseudo_targets(prm / prm.sum(), torch.stack(full), g)
        assert valid.all() and target.shape == (1, h, w)
        # the drawn target is one of the top-5 proposals by the retrieval score
        stack = torch.stack(full)
        top5 = score_proposals(prm / prm.sum(), stack).topk(5, dim=1).indices[0]
        assert any(torch.equal(target[0].bool(), stack[i]) for i in top5)
