"""Activation checkpointing: recompute a block's activations in backward instead of storing them."""

from torch import nn

from dtcollie.torch_private import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """mode "full": every block; "selective": every `every`-th block (counting by layer id, so a
    pipeline stage checkpoints the same layers the whole model would). State-dict keys are unchanged."""
    if mode == "none":
        return
    for layer_id, block in list(model.layers.items()):
        if mode == "full" or int(layer_id) % every == 0:
            model.layers[layer_id] = checkpoint_wrapper(block, preserve_rng_state=False)
