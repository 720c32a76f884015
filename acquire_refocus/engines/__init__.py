"""Inference backends behind one interface: TensorRT, ONNX Runtime, PyTorch."""
