"""Domain values shared by every layer: plain Python, no gRPC, no protobuf."""
