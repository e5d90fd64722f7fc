"""Layers and objectives: blocks, shared towers, folding, heads, losses, metrics, and the replicas of a step."""
