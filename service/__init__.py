"""The application service layer (adr/0007): what every door (HTTP, gRPC, CLI) calls alike."""
