"""bertrec: text-aware recommendations, trained with PyTorch and served with ONNX Runtime over gRPC."""

__version__ = "0.1.0"
