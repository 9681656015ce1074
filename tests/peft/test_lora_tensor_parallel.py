"""LoRA under tensor parallelism (and FSDP2) on 2 gloo ranks equals one process.

Every rank builds the same single-process reference (same seed) and a parallelised copy with the
same weights, then compares logits, adapter gradients, the merged model and the gathered PEFT
export. All layouts run in one spawned group: process start-up dominates the cost.
"""

import os
import sys
import tempfile

import torch
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from dtcollie.models.llama import Transformer
from dtcollie.parallel.tensor import apply_tensor_parallel
from dtcollie.peft import apply_lora, is_lora_key, merge_lora, peft_adapter_tensors, save_peft_adapter
from lora_models import ALL_TARGETS, lora_model, random_tokens, tiny_args

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parallel"))
from spawn import run_ranks  # noqa: E402

LAYOUTS = ["tp2_sp_lp", "tp2_no_sp_no_lp", "fsdp2"]
ADAPTER = dict(rank=4, alpha=8.0, use_rslora=True)


def loss_and_logits(model, tokens, weights):
    logits = forward(model, tokens)
    return (logits * weights).mean(), logits.detach()


def forward(model, tokens) -> torch.Tensor:
    """Logits as a full tensor (loss parallel leaves them vocab-sharded)."""
    logits = model(tokens)
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def collectives(model, tokens) -> dict:
    with torch.no_grad(), CommDebugMode() as comms:
        model(tokens)
    return {str(op): count for op, count in comms.get_comm_counts().items()}


def lora_grads(model) -> dict:
    grads = {}
    for name, param in model.named_parameters():
        assert param.requires_grad == is_lora_key(name), name
        if param.requires_grad:
            grads[name] = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
    return grads


def copy_weights(model, source: dict) -> None:
    """Load full tensors into a parallelised model, each parameter keeping its layout."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            full = source[name]
            tensor.copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements)
                         if isinstance(tensor, DTensor) else full)


def parallel_model(layout: str, mesh, reference) -> Transformer:
    with torch.device("meta"):
        model = Transformer(tiny_args())
    apply_lora(model, target_modules=ALL_TARGETS, **ADAPTER)
    if layout == "fsdp2":
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        apply_tensor_parallel(model, mesh, sequence_parallel="no_sp" not in layout, loss_parallel="lp" in layout)
    model.to_empty(device="cpu")
    model.init_rope()
    copy_weights(model, reference.state_dict())
    return model


def placements(model) -> dict:
    return {name: tuple(param.placements) for name, param in model.named_parameters() if "layers.0." in name}


def worker(rank: int, world: int, adapter_dir: str) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    reference = lora_model(ALL_TARGETS, **ADAPTER)
    tokens = random_tokens(seq=16)
    weights = torch.randn(2, 16, tiny_args().vocab_size, generator=torch.Generator().manual_seed(2))
    loss, expected_logits = loss_and_logits(reference, tokens, weights)
    loss.backward()
    expected_grads = lora_grads(reference)
    report = {}
    for layout in LAYOUTS:
        model = parallel_model(layout, mesh, reference)
        loss, logits = loss_and_logits(model, tokens, weights)
        loss.backward()
        grads = lora_grads(model)
        report[layout] = {
            "logits": (logits - expected_logits).abs().max().item(),
            "grads": max((grads[n] - g).abs().max().item() for n, g in expected_grads.items()),
            "grad_scale": max(g.abs().max().item() for g in expected_grads.values()),
        }
        if layout.startswith("tp"):
            report[layout]["placements"] = placements(model)
            adapted_collectives = collectives(model, tokens)
            merge_lora(model)
            with torch.no_grad():
                report[layout]["merged"] = (forward(model, tokens) - expected_logits).abs().max().item()
            # The adapters add no communication: the rowwise update is reduced with the base output.
            report[layout]["same_collectives"] = adapted_collectives == collectives(model, tokens)
        else:
            folder = os.path.join(adapter_dir, layout)
            save_peft_adapter(model, folder)  # gathers the FSDP shards; rank 0 writes
            torch.distributed.barrier()
            written = load_file(os.path.join(folder, "adapter_model.safetensors"))
            expected = peft_adapter_tensors(reference.state_dict())
            assert written.keys() == expected.keys()
            report[layout]["export"] = max((written[k] - t).abs().max().item() for k, t in expected.items())
    return report


def test_lora_under_tp_and_fsdp_equals_one_process():
    with tempfile.TemporaryDirectory() as adapter_dir:
        reports = run_ranks(2, worker, adapter_dir, timeout=300)
    for report in reports:
        for layout in LAYOUTS:
            numbers = report[layout]
            assert numbers["grad_scale"] > 1e-3, "the adapter gradients must be far above the tolerance"
            assert numbers["logits"] <= 1e-5 and numbers["grads"] <= 1e-5, (layout, numbers)
            assert numbers.get("merged", 0.0) <= 1e-4 and numbers.get("export", 0.0) == 0.0, (layout, numbers)
            assert numbers.get("same_collectives", True), layout
        for layout in ("tp2_sp_lp", "tp2_no_sp_no_lp"):
            layer = report[layout]["placements"]
            assert layer["layers.0.attention.wq.weight"] == (Shard(0),)
            assert layer["layers.0.attention.wq.lora_a"] == (Replicate(),)
            assert layer["layers.0.attention.wq.lora_b"] == (Shard(0),)
            assert layer["layers.0.feed_forward.w2.weight"] == (Shard(1),)
            assert layer["layers.0.feed_forward.w2.lora_a"] == (Shard(1),)
            assert layer["layers.0.feed_forward.w2.lora_b"] == (Replicate(),)
