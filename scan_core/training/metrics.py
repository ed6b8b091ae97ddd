"""Small exact metrics used by training and evaluation (no sklearn dependency)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of their ranks (float64)."""
    flat = values.reshape(-1).double()
    _, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # last rank of each group of equal values
    group_rank = ends - (counts.double() - 1) / 2
    return group_rank[inverse]


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Exact area under the ROC curve: P(score of a positive > score of a negative), ties = 1/2.

    Computed with the Mann-Whitney U statistic over average ranks, so it is exact for any number of
    ties. Returns NaN when ``labels`` holds only one class (the AUROC is undefined there).

    Shapes: scores, labels (...) with the same number of elements; labels are 0/1 or bool.
    """
    scores = scores.detach().reshape(-1)
    positive = labels.detach().reshape(-1).bool()
    if scores.numel() != positive.numel():
        raise ValueError(f"{scores.numel()} scores but {positive.numel()} labels")
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    ranks = average_ranks(scores.cpu())
    rank_sum = float(ranks[positive.cpu()].sum())
    u_statistic = rank_sum - num_pos * (num_pos + 1) / 2
    return u_statistic / (num_pos * num_neg)
