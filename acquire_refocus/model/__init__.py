"""The refocus network, its losses, training and evaluation."""
