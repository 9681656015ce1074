"""Parallelism applied to a model from outside: mesh, tensor, data (FSDP2), pipeline, activation checkpointing."""
