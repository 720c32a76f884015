"""Hooks that hand frames from an acquisition (pymmcore-plus, pycromanager) to the pipeline."""
