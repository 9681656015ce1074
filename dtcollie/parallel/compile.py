"""torch.compile of the transformer blocks, and the compiler settings a run needs, applied only
while it trains (`compile_settings`): nothing leaks into the rest of the process."""

import contextlib

import torch._functorch.config
import torch._inductor.config
from torch import nn


def compile_blocks(model: nn.Module, tensor_parallel: bool) -> None:
    """torch.compile each transformer block in place (parameter names unchanged); the compile itself
    happens at the first call, under `compile_settings`.

    Under tensor parallelism the attention and feed-forward inside each block are compiled instead:
    with torch 2.13, a compiled whole block whose norms are sequence-parallel (or replicated)
    DTensor modules fails in backward ("'Tensor' object has no attribute '_local_tensor'"), while
    the two sub-modules, which hold all the matmuls, compile and train correctly."""
    for block in model.layers.values():
        if tensor_parallel:
            block.attention.compile()
            block.feed_forward.compile()
        else:
            block.compile()


@contextlib.contextmanager
def compile_settings(tensor_parallel: bool, retains_graph: bool):
    """The compiler settings compiled blocks need, restored on exit.

    `retains_graph`: a backward runs with retain_graph=True (LOMO/AdaLomo's norm pass), which
    compiled backwards with donated buffers refuse. `tensor_parallel`: with torch 2.13 a compiled TP
    module loaded from the inductor/AOTAutograd caches on a later run trains with wrong gradients
    (a fresh compile is exact), so those caches are not used."""
    with contextlib.ExitStack() as stack:
        if retains_graph:
            stack.enter_context(torch._functorch.config.patch(donated_buffer=False))
        if tensor_parallel:
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        yield
