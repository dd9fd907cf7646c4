"""Small graph edits the inductor rewrites share."""
from __future__ import annotations

import torch.fx as fx


def _erase_if_unused(graph: fx.Graph, node: fx.Node) -> None:
    if node.users or node.op not in ("call_module", "get_attr"):
        return
    inputs = [a for a in node.all_input_nodes]
    graph.erase_node(node)
    for a in inputs:
        _erase_if_unused(graph, a)
