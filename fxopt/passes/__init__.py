"""The built-in passes; importing this package registers them."""
from .canonicalize import Canonicalize
from .dce import DeadCodeElimination
from .fake_quant import FakeQuant
from .fold_bn import FoldBatchNorm
from .prune_channels import PruneChannels
from .prune_weights import PruneWeights
from .low_rank import LowRank
from .mixed_precision import MixedPrecision
from .split_stages import SplitStages

__all__ = ["Canonicalize", "DeadCodeElimination", "FakeQuant", "FoldBatchNorm", "LowRank", "MixedPrecision",
           "PruneChannels", "PruneWeights", "SplitStages"]
