"""torchvision's classification models as the zoo checks build them, and how outputs are compared.

Random weights (nothing is downloaded), random BatchNorm statistics and affine parameters
(a fresh BatchNorm is the identity, so folding it would prove nothing), zero-initialised
weight matrices such as ViT's head made random (else outputs are all zero and any
backend "agrees"), on the smallest input each family accepts.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

IMAGE_SIZE = {
    "inception_v3": 75,      # its stem needs >= 75x75
    "maxvit_t": 224,         # every stage's grid must be a multiple of partition_size=7
    "vit_h_14": 56,          # ViTs are built for the input size (image_size=...): patch 14
}


def vision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def image_size(name: str) -> int:
    return IMAGE_SIZE.get(name, 64)


def build_vision(name: str) -> torch.nn.Module:
    """torchvision's model `name` in eval mode, made a meaningful test (see the module doc)."""
    import torchvision

    kwargs = {"image_size": image_size(name)} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
                if bn.affine:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.1, 0.1)
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def relative_difference(expected, actual) -> float:
    """max |actual - expected| / max |expected| over the output leaves (scale 0 counts as 1)."""
    worst = 0.0
    for e, a in zip(tree_leaves(expected), tree_leaves(actual), strict=True):
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            continue
        scale = e.abs().max().item() or 1.0
        worst = max(worst, (a.float() - e.float()).abs().max().item() / scale)
    return worst
