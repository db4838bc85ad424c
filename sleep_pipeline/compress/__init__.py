"""Compress: prune, quantise, merge and distil a candidate, and choose on a capability-cost Pareto record."""
