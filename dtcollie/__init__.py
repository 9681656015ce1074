"""dtcollie: LLM training on native PyTorch distributed (DeviceMesh, DTensor, FSDP2, pipelining)."""
