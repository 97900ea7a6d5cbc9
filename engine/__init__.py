"""TensorRT engines from exported or calibrated CenterNet ONNX models (``centernet-build``)."""
