"""Foundation: CenterNet architectures, checkpoints and ONNX export."""
