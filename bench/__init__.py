"""Benchmarks: each prints FaceFleet's figure beside a baseline measured in the same run."""
