"""Readers of image datasets on disk in the layouts of public benchmarks (and the simulated datasets written in
them)."""
