"""Composite PTransforms and DoFns of the clickstream graph, one stage per module."""
