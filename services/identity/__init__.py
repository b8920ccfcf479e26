"""The identity service: stitches identifiers into profiles (gRPC 50052, metrics 9102)."""
