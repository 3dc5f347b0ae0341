"""Export of trained IAM models to an ONNX bundle and TensorRT engines."""
