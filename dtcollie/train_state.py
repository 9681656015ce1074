"""What a training checkpoint holds, as components that each save and load their own state.

Each component follows DCP's `Stateful` protocol with flat dicts of tensors: `state_dict()` gives
the tensors to save, or to load into (DCP loads in place, so live parameters and optimizer state
are filled directly), and `load_state_dict(state)` applies what was loaded. `Checkpointer` stores
component `name`'s entry `key` as `name.key` (the key "" as `name` itself); the names and keys are
the checkpoint format of `dtcollie.checkpointer`, unchanged since the first resumable checkpoints.
"""

import json

import torch

from dtcollie.dcp_weights import model_state_dict, stored_name


def json_tensor(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()).decode())


class ModelState:
    """Every trainable parameter of this rank's model parts, under the whole model's names (with
    LoRA only the adapters: the frozen base comes from checkpoint.initial_load_path again)."""

    def __init__(self, parts: list):
        self.parts = parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for part in self.parts:
            trainable = {stored_name(part, name) for name, p in part.named_parameters() if p.requires_grad}
            state.update({name: t for name, t in model_state_dict(part).items() if name in trainable})
        return state

    def load_state_dict(self, state: dict) -> None:
        pass  # loaded in place


class OptimizerState:
    """Each parameter's optimizer state under `<parameter name>.<state name>`, DTensors where the
    parameter is one (so it reshards like the weights); a tied output copy's state is stored as the
    embedding's, which it equals."""

    def __init__(self, optimizer: torch.optim.Optimizer, parts: list):
        self.optimizer, self.parts = optimizer, parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for part in self.parts:
            for name, param in part.named_parameters():
                for key, value in self.optimizer.state.get(param, {}).items():
                    state[f"{stored_name(part, name)}.{key}"] = value
        return state

    def load_state_dict(self, state: dict) -> None:
        pass  # loaded in place

    def prepare_to_load(self) -> None:
        """Create every parameter's state (torch optimizers create it lazily, on the first step) with
        one step on zero gradients at lr 0, so that a checkpoint can be loaded into it in place."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for param in params:
            param.grad = torch.zeros_like(param)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)


class LossScalerState:
    """LOMO/AdaLomo's fp16 dynamic loss scale."""

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.scaler.scale, dtype=torch.float64),
                "clean_steps": torch.tensor(self.scaler.clean_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.scale, self.scaler.clean_steps = float(state["scale"]), int(state["clean_steps"])


class SchedulerState:
    """The LR schedule's state_dict as JSON bytes; loading also sets the optimizer's current lr."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer):
        self.scheduler, self.optimizer = scheduler, optimizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"": json_tensor(self.scheduler.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(from_json_tensor(state[""]))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


class LoaderState:
    """The training loader's position in the global data order, which does not depend on the layout:
    `epoch` and `sequences` consumed of it for in-memory data, the blocks `taken` from each token
    corpus (and their `blocks` counts) for streams; in-memory data also saves its `fingerprint`."""

    added_later = ("fingerprint",)  # absent from checkpoints saved before it: those load without the check

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.loader.position()

    def load_state_dict(self, state: dict) -> None:
        self.loader.restore(state)


class RNGState:
    """torch's CPU generator, and this rank's CUDA generator on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class StepCounter:
    """The number of optimizer steps taken; present in resumable checkpoints only."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"": torch.tensor(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state[""])
