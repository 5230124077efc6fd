"""The Open Inference Protocol over gRPC: inference.GRPCInferenceService and grpc.health.v1, on their own port."""
