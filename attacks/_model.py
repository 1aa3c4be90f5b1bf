"""Model plumbing shared by the attacks: functional forward passes, gradients and layer lookup."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call

from privfl.errors import AttackError

__all__ = ["ModelView", "check_alignment"]


class ModelView:
    """A read-only functional view of a user's module.

    Attacks differentiate through the model many times; doing it on detached copies of the parameters and
    buffers (via ``torch.func.functional_call``) means the user's module is never modified, not even a
    BatchNorm running statistic.

    Args:
        model: Any ``torch.nn.Module`` mapping a batch of inputs to class logits.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        if not self.names:
            raise AttackError("the model has no parameters, so its gradients carry nothing to invert")
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        first = next(iter(self.params.values()))
        self.device = first.device
        self.dtype = first.dtype

    def parameters(self) -> list[torch.Tensor]:
        """The detached parameter copies, in ``model.parameters()`` order."""
        return [self.params[n] for n in self.names]

    def logits(self, inputs: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Forward pass with the given (or the stored) parameters, on fresh buffer copies."""
        state = dict(self.params if params is None else params)
        state.update({k: v.clone() for k, v in self.buffers.items()})
        return functional_call(self.model, state, (inputs,))

    def gradients(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        params: dict[str, torch.Tensor] | None = None,
        create_graph: bool = False,
    ) -> list[torch.Tensor]:
        """Gradient of the mean cross-entropy with respect to every parameter, in ``parameters()`` order.

        Args:
            inputs: Batch of inputs.
            targets: Integer labels ``(n,)`` or soft label distributions ``(n, classes)``.
            params: Parameters to differentiate at; the stored ones when ``None``.
            create_graph: Keep the graph so the result can be differentiated again (gradient matching).

        Returns:
            One gradient tensor per parameter.
        """
        base = self.params if params is None else params
        live = {n: (t if t.requires_grad else t.detach().requires_grad_(True)) for n, t in base.items()}
        loss = torch.nn.functional.cross_entropy(self.logits(inputs, live), targets)
        grads = torch.autograd.grad(loss, [live[n] for n in self.names], create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(live[n]) if g is None else g for n, g in zip(self.names, grads, strict=True)]

    def last_linear(self) -> tuple[int, int | None, int]:
        """Locates the classifier: the last ``nn.Linear`` registered in the module.

        Returns:
            ``(weight_index, bias_index_or_None, num_classes)``, indices into ``parameters()`` order.

        Raises:
            AttackError: If the model has no ``nn.Linear``.
        """
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise AttackError("label recovery needs a final nn.Linear producing the logits; the model has none")
        last = linears[-1]
        bias = None if last.bias is None else index[id(last.bias)]
        return index[id(last.weight)], bias, last.out_features


def check_alignment(view: ModelView, tensors: Sequence[torch.Tensor]) -> None:
    """Checks that an observed gradient or update lines up with the model's parameters.

    Raises:
        AttackError: On a count or shape mismatch.
    """
    params = view.parameters()
    if len(tensors) != len(params):
        raise AttackError(
            f"observation has {len(tensors)} tensors but the model has {len(params)} parameters; "
            "gradients must follow model.parameters() order"
        )
    for i, (t, p) in enumerate(zip(tensors, params, strict=True)):
        if t.shape != p.shape:
            raise AttackError(f"observed tensor {i} has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}")
