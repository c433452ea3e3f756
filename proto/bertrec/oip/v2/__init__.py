"""Open Inference Protocol v2 gRPC stubs: `inference.GRPCInferenceService`."""
