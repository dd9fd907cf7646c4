"""Analyses: facts about a graph, computed once and cached by the AnalysisManager."""
from .cost import Cost, CostTable, CostTracker, NodeCost
from .graph_view import GraphView
from .shapes import Shapes, ShapeTable

__all__ = ["Cost", "CostTable", "CostTracker", "GraphView", "NodeCost", "ShapeTable", "Shapes"]
