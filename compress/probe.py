"""A classifier re-fitted on frozen features: multinomial logistic regression fitted to convergence (L-BFGS),
the linear probe of the representation-learning literature. What a user with one trained model and a little
labelled data can do in seconds, and so a baseline for what costs more (fusion, a finetune).

Example:
    >>> refit_classifier(model, shared_set)          # the head now fits the shared set; the body is untouched
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import CompressError

__all__ = ["pre_logits", "fit_linear", "refit_classifier"]


@torch.no_grad()
def pre_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The features `model`'s classifier reads (timm's `forward_head(..., pre_logits=True)`), in eval mode."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model.forward_head(model.forward_features(x), pre_logits=True).float()
                          for x in images.split(batch_size)])
    finally:
        model.train(was)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3,
               steps: int = 100, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the logistic regression minimising mean cross-entropy + l2 / 2 * ||weight||^2, by
    L-BFGS from zero (without `bias`, the bias returned is zero and not fitted).

    Example:
        >>> w, b = fit_linear(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3)
        >>> w.shape, b.shape
        (torch.Size([3, 8]), torch.Size([3]))
    """
    x, y = features.double(), labels.long().to(features.device)
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def refit_classifier(model: nn.Module, data: Dataset, l2: float = 1e-3) -> nn.Module:
    """Replace `model`'s classifier (timm's `get_classifier`: one Linear, or the pair of a distilled model, whose
    eval output is their mean) by a logistic regression fitted on the features it reads over `data` (images,
    labels), the rest of the model unchanged; returns `model`.

    Example:
        >>> refit_classifier(parent, as_data("digits", spec, subset="fraction=0.1").train)
    """
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, tuple) else (heads,)
    if not all(isinstance(h, nn.Linear) for h in heads) or not hasattr(model, "forward_head"):
        raise CompressError(f"a classifier re-fit needs a timm model with Linear classifiers, found "
                            f"{type(model).__name__} with {', '.join(type(h).__name__ for h in heads)}",
                            expected="get_classifier() -> nn.Linear and forward_head(..., pre_logits=True)")
    head = heads[0]
    xs, ys = zip(*DataLoader(data, batch_size=256))
    feats = pre_logits(model, torch.cat(xs).to(head.weight.device))
    if feats.ndim != 2 or feats.shape[1] != head.in_features:
        raise CompressError("the classifier's input is not the model's pooled features",
                            expected=f"(N, {head.in_features}) pre-logits", found=str(tuple(feats.shape)))
    w, b = fit_linear(feats, torch.cat(ys), head.out_features, l2, bias=head.bias is not None)
    with torch.no_grad():  # a distilled pair's pre-logits are the mean of what its two heads read: one fit for both
        for h in heads:
            h.weight.copy_(w.to(h.weight))
            if h.bias is not None:
                h.bias.copy_(b.to(h.bias))
    return model
