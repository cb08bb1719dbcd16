"""The gRPC services and the engines and shared core they stand on."""
