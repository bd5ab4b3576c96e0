"""Generated KServe v2 protobuf and gRPC modules (see regenerate.py)."""
