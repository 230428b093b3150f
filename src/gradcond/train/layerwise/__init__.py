"""Layer-wise training (seed 002 ch. 6): DLL (Algorithm 3), DSL (sliding windows), random robin (Algorithm 4),
decision heads, gradient dropout and peak-memory accounting. See ``docs/layerwise.md``."""

from .blocks import is_classifier_block, split_blocks, starts_block, weight_layers
from .fit import METHODS, LayerwiseResult, Subnet, fit_layerwise
from .heads import (GradientDropout, NoHeadFits, build_head, describe_head, gradient_dropout, head_configs,
                    input_dropout_p, make_head, search_head)
from .memory import OPTIMIZER_STATE_FACTOR, MemoryReport, memory_accounting, optimizer_state_bytes

__all__ = [
    "fit_layerwise", "LayerwiseResult", "METHODS", "Subnet", "split_blocks", "starts_block", "weight_layers",
    "is_classifier_block", "build_head", "head_configs", "make_head", "describe_head", "NoHeadFits", "search_head",
    "GradientDropout", "gradient_dropout", "input_dropout_p", "memory_accounting", "MemoryReport",
    "optimizer_state_bytes", "OPTIMIZER_STATE_FACTOR",
]

# Partition-wise training (DPL, ``dpl.py``) loads torch.distributed machinery: imported on first use.
_DPL_NAMES = ("fit_partitionwise", "PartitionwiseResult", "PartitionPeerLost", "make_partitions", "partition_model")
__all__ += list(_DPL_NAMES)


def __getattr__(name: str):
    if name in _DPL_NAMES:
        from . import dpl

        return getattr(dpl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
