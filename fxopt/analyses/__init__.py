"""Analyses: facts about a graph, computed once and cached by the AnalysisManager."""
from .channel_groups import ChannelGroup, ChannelGroups, ChannelGroupsResult, GroupMember
from .cost import Cost, CostTable, CostTracker, NodeCost
from .fidelity import divergence, output_kind, output_kinds
from .graph_view import GraphView
from .sensitivity import Sensitivity, SensitivityRow, SensitivityTable
from .shapes import Shapes, ShapeTable

__all__ = ["ChannelGroup", "ChannelGroups", "ChannelGroupsResult", "Cost", "CostTable", "CostTracker",
           "GraphView", "Sensitivity", "SensitivityRow", "SensitivityTable", "divergence", "output_kind",
           "output_kinds", "GroupMember", "NodeCost", "ShapeTable", "Shapes"]
