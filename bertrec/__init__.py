"""bertrec: text-aware recommendations, trained with PyTorch, served with ONNX Runtime over gRPC."""

__version__ = "0.1.0"
