"""Analyses: facts about a graph, computed once and cached by the AnalysisManager."""
from .channel_groups import ChannelGroup, ChannelGroups, ChannelGroupsResult, GroupMember
from .cost import Cost, CostTable, CostTracker, NodeCost
from .graph_view import GraphView
from .shapes import Shapes, ShapeTable

__all__ = ["ChannelGroup", "ChannelGroups", "ChannelGroupsResult", "Cost", "CostTable", "CostTracker",
           "GraphView", "GroupMember", "NodeCost", "ShapeTable", "Shapes"]
