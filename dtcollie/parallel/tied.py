"""Tied embeddings across pipeline stages: the first stage holds the embedding, the last the output
projection, two copies of one matrix kept exactly equal (Megatron's way).

- They start equal: after initialisation or loading, the first stage sends its embedding to the
  last stage, which copies it into the output projection. Checkpoints hold the one matrix under
  `tok_embeddings.weight` (`dtcollie.dcp_weights.model_state_dict`), so a tied model saves and
  exports as one weight on any layout.
- They stay equal: after each backward the two stages exchange their gradients and both add them,
  so each copy gets the gradient of the one tied weight (a + b == b + a exactly, so the sums are
  bit-identical), and every optimizer, being deterministic, updates both alike. The gradient norm
  counts the matrix once (`counted_parameters` leaves the copy out).

The pair lives in each pp group of the one mesh: pipeline rank 0 holds stage 0 and rank pp - 1
the last stage (looped placement; the V schedule, which puts both on rank 0, is refused). With
FSDP and TP both copies are DTensors of one layout over the same dp/tp coordinates, so their local
shards line up and are exchanged as they are.
"""

import torch
import torch.distributed as dist
from torch import nn

from dtcollie.optim.grad_norm import local


class TiedPipelineEmbedding:
    """The tied embedding/output pair of a pipelined model, as this rank sees it."""

    def __init__(self, parts: list[nn.Module], pp_group: dist.ProcessGroup):
        self.pp_group = pp_group
        pp = dist.get_world_size(pp_group)
        first = next((p for p in parts if p.tok_embeddings is not None), None)
        last = next((p for p in parts if p.output is not None), None)
        # This rank's copy and the global rank of the stage holding the other one.
        self.param = first.tok_embeddings.weight if first is not None else last.output.weight if last else None
        self.is_copy = first is None and last is not None
        self.peer = dist.get_global_rank(pp_group, pp - 1 if first is not None else 0)

    @classmethod
    def of(cls, parts: list[nn.Module], tie_embeddings: bool, pp_group) -> "TiedPipelineEmbedding | None":
        """The pair, or None where nothing is to be kept equal (no tying, no pipeline)."""
        return cls(parts, pp_group) if tie_embeddings and pp_group is not None else None

    def _exchange(self, mine: torch.Tensor) -> torch.Tensor:
        """Send `mine` to the peer and return the peer's tensor of the same shape (the first stage
        sends first, so the blocking pair cannot deadlock)."""
        theirs = torch.empty_like(mine)
        if self.is_copy:
            dist.recv(theirs, self.peer, group=self.pp_group)
            dist.send(mine, self.peer, group=self.pp_group)
        else:
            dist.send(mine, self.peer, group=self.pp_group)
            dist.recv(theirs, self.peer, group=self.pp_group)
        return theirs

    @torch.no_grad()
    def copy_embedding_to_output(self) -> None:
        """Make the last stage's output projection equal to the first stage's embedding."""
        if self.param is None:
            return
        mine = local(self.param).contiguous()
        theirs = self._exchange(mine)
        if self.is_copy:
            local(self.param).copy_(theirs)

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Both copies' gradients become their sum (the gradient of the one tied weight)."""
        if self.param is None or not self.param.requires_grad:
            return
        grad = local(self.param.grad)
        grad.add_(self._exchange(grad.contiguous()))

    def counted_parameters(self, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
        """`parameters` without the output copy, so a norm counts the tied matrix once."""
        return [p for p in parameters if not (self.is_copy and p is self.param)]
