"""The Open Inference Protocol (KServe / Triton "v2" gRPC API) on bertrec's server.

`servicer` implements `inference.GRPCInferenceService`, `models` adapts the encoder and the
ranker to the protocol's tensors, and `tensors` decodes and encodes them (typed or raw).
"""

from bertrec.server.oip.servicer import SERVICE_NAME, InferenceServicer

__all__ = ["SERVICE_NAME", "InferenceServicer"]
