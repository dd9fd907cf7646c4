"""The graph layer: tracing, node.meta keys, graph helpers, rewrite helpers."""
from .graph import const_value, fetch_attr, node_location, set_attr, to_networkx
from .meta import INPUT_SHAPES, TENSOR, TensorInfo, tensor_info
from .registry import OpRegistry
from .rewrite import RuleTable, is_call, pattern_graph, replace_pattern
from .shape_prop import propagate_shapes
from .trace import trace

__all__ = [
    "INPUT_SHAPES", "TENSOR", "OpRegistry", "RuleTable", "TensorInfo", "const_value", "fetch_attr", "is_call",
    "node_location", "pattern_graph", "propagate_shapes", "replace_pattern", "set_attr",
    "tensor_info", "to_networkx", "trace",
]
