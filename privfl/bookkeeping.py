"""Book-keeping clipping for DP-SGD: per-example norms and the clipped gradient sum in one backward pass.

Book-keeping (Bu, Wang, Zha, Karypis 2023, "Differentially private optimization on large model at
small cost") never materialises per-example gradients of linear layers. One forward pass keeps each
layer's input ``a`` and output ``z``; one backward pass of the summed loss gives the output gradients
``b = dL/dz`` (and nothing else: no parameter gradient is computed). For a linear layer the
per-example weight gradient is ``g_i = b_i^T a_i``, so

- its norm comes from the ghost-norm trick (Goodfellow 2015; Li et al. 2021): for 2-D inputs
  ``||g_i||^2 = ||a_i||^2 ||b_i||^2``; for sequence inputs (B, T, d) either the Gram form
  ``<a_i a_i^T, b_i b_i^T>`` (cost B T^2 (d + p)) or the instantiated ``g_i`` (cost B T d p),
  whichever is cheaper;
- the clipped sum is ``sum_i c_i g_i = (diag(c) B)^T A``, one matrix product, with
  ``c_i = min(1, C / (||g_i|| + 1e-6))`` over the whole per-example gradient (all layers), the
  factor Opacus' DP optimizer uses.

Small layers other than linear ones (convolutions, GroupNorm, LayerNorm, Embedding) get explicit
per-example gradients from their recorded input and output gradient (``torch.func``); any other
layer holding trainable parameters is refused with a :class:`~privfl.errors.ConfigError`.

Privacy: the released step is ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / E[B]``, the Gaussian
mechanism on Poisson-sampled batches that Opacus' DP optimizer runs, so the DP event charged is
the same as with the other clipping modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from privfl.errors import ConfigError

__all__ = [
    "PER_SAMPLE_FALLBACK_LAYERS",
    "BookKeeping",
    "ClippedSum",
    "bookkeeping_unsupported",
]

PER_SAMPLE_FALLBACK_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Embedding,
)
"""Layers whose per-example gradients book-keeping instantiates (they treat each example on its own)."""

CLIP_EPSILON = 1e-6
"""Added to each per-example norm before dividing, as Opacus' flat clipping does."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClippedSum:
    """One batch's clipped gradient sum.

    Attributes:
        grads: ``sum_i c_i g_i`` for each trainable parameter, in ``model.parameters()`` order.
        norms: ``||g_i||``, each example's gradient norm over all parameters before clipping.
        loss: the summed loss over the batch (detached).
    """

    grads: tuple[torch.Tensor, ...]
    norms: torch.Tensor
    loss: torch.Tensor


@dataclass(slots=True)
class _Record:
    """What one layer saw in one forward pass: its inputs and outputs, one entry per call."""

    inputs: list[tuple[torch.Tensor, ...]]
    outputs: list[torch.Tensor]


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad]


def bookkeeping_unsupported(model: nn.Module) -> str | None:
    """Why book-keeping cannot train ``model``, or ``None`` when it can.

    Every trainable parameter must belong directly to an ``nn.Linear`` or to a layer of
    :data:`PER_SAMPLE_FALLBACK_LAYERS`, no parameter may be shared between layers (a tied
    weight's per-example gradient spans several layers' records), and no BatchNorm may mix the
    examples of a batch. As with Opacus, a custom ``forward`` that mixes examples without
    parameters of its own is not detected.
    """
    seen: dict[int, str] = {}
    for path, module in model.named_modules():  # a layer registered twice is one layer, called twice
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # It mixes the examples of a batch: no per-example gradient exists (convert_for_dp replaces it).
            return f"layer {path or '<model>'} ({type(module).__name__}) mixes the examples of a batch"
        params = _trainable(module)
        if not params:
            continue
        if not isinstance(module, (nn.Linear, *PER_SAMPLE_FALLBACK_LAYERS)):
            return f"layer {path or '<model>'} ({type(module).__name__}) holds trainable parameters"
        for name, p in params:
            where = f"{path}.{name}" if path else name
            if id(p) in seen and seen[id(p)] != where:
                return f"parameter {where} is shared with {seen[id(p)]}"
            seen[id(p)] = where
    return None


class BookKeeping:
    """Clipped per-example gradient sums of ``model`` by book-keeping (one forward, one backward).

    Hooks are attached only while :meth:`clipped_sum` runs; the model is left as it was.

    Args:
        model: the model to train; its trainable parameters must live in supported layers.
        max_grad_norm: C, the bound on each example's gradient norm over all parameters.

    Raises:
        ConfigError: a layer holds trainable parameters book-keeping cannot clip (the message
            names the layer), or ``max_grad_norm`` is not positive.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        problem = bookkeeping_unsupported(model)
        if problem is not None:
            raise ConfigError(
                "training.dp.clipping",
                "bookkeeping",
                f"{problem}; book-keeping supports nn.Linear and "
                f"{', '.join(t.__name__ for t in PER_SAMPLE_FALLBACK_LAYERS)}; use 'per_sample' or 'ghost'",
            )
        if not max_grad_norm > 0:
            raise ConfigError("max_grad_norm", max_grad_norm, "must be positive")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("model", type(model).__name__, "has no trainable parameters")
        self._layers = [m for m in model.modules() if _trainable(m)]

    def clipped_sum(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> ClippedSum:
        """Runs the model on one batch and returns ``sum_i c_i g_i`` for every trainable parameter.

        Args:
            inputs: the batch, examples along the first dimension (may be empty).
            labels: one label per example.
            loss_fn: the summed loss, e.g. ``nn.CrossEntropyLoss(reduction="sum")``; the sum
                (not the mean) keeps each ``b_i`` the gradient of example i's own loss.

        Returns:
            The clipped sums, the per-example norms and the summed loss.
        """
        grads = tuple(torch.zeros_like(p) for p in self.params)
        norms, loss = self._accumulate(inputs, labels, loss_fn, grads)
        return ClippedSum(grads=grads, norms=norms, loss=loss)

    def private_gradients(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Sets each parameter's ``.grad`` to ``(sum_i c_i g_i + N(0, (sigma C)^2 I)) / E[B]``.

        What Opacus' DP optimizer releases for a Poisson-sampled batch: the noise is drawn
        parameter by parameter, in ``model.parameters()`` order, from ``generator`` with each
        parameter's shape, device and dtype (nothing is drawn when sigma is 0), and the sum is
        divided by the expected batch size, not the batch's size. An empty batch gives a
        noise-only gradient. Existing ``.grad`` tensors are reused, so a step allocates no
        parameter-sized memory.

        Args:
            inputs: the batch (may be empty).
            labels: one label per example.
            loss_fn: the summed loss (see :meth:`clipped_sum`).
            noise_multiplier: sigma.
            expected_batch_size: E[B], the divisor.
            generator: the noise source.

        Returns:
            The summed loss over the batch (detached; 0 for an empty batch).
        """
        std = noise_multiplier * self.max_grad_norm
        # 1 / E[B] is folded into the noise's scale and the clipping factors: no pass over the
        # parameters to divide them (on a 2M-parameter MLP that pass costs a tenth of a step).
        scale = 1.0 / expected_batch_size
        grads = []
        for p in self.params:
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.empty_like(p)
            if std == 0:
                p.grad.zero_()
            else:
                # The draws of torch.normal(0, std, size=p.shape, generator=generator), which Opacus
                # makes, times 1 / E[B] (equal up to rounding), written in place.
                p.grad.normal_(0.0, std * scale, generator=generator)
            grads.append(p.grad)
        _, loss = self._accumulate(inputs, labels, loss_fn, grads, scale=scale)
        return loss

    def _accumulate(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        into: Sequence[torch.Tensor],
        *,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds ``scale * sum_i c_i g_i`` to ``into`` (one tensor per parameter); returns the norms and the loss."""
        batch = len(inputs)
        if batch == 0:
            # An empty Poisson batch: nothing to clip, the step is noise only.
            return inputs.new_zeros((0,)), inputs.new_zeros(())
        records: dict[nn.Module, _Record] = {m: _Record(inputs=[], outputs=[]) for m in self._layers}

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            record = records[module]
            record.inputs.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            record.outputs.append(output)
            # The model goes on with a copy: an in-place op after the layer (ReLU(inplace=True))
            # would otherwise rewrite the recorded output, and its gradient with it.
            return output.clone()

        # Prepended, so the layer's own output is recorded even if a user's hook replaces it.
        handles: list[RemovableHandle] = [m.register_forward_hook(keep, prepend=True) for m in self._layers]
        try:
            loss = loss_fn(self.model(inputs), labels)
        finally:
            for handle in handles:
                handle.remove()
        outputs = [z for record in records.values() for z in record.outputs]
        # Gradients with respect to the layers' outputs only: autograd skips every parameter
        # gradient (the non-private A^T B products), which book-keeping computes clipped below.
        output_grads = torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True)
        grads_of = iter(output_grads)
        squared = torch.zeros(batch, dtype=self.params[0].dtype, device=self.params[0].device)
        pending: list[_Finish] = []
        for module, record in records.items():
            b = [next(grads_of).detach() for _ in record.outputs]
            if not b:
                continue  # the layer took no part in this forward pass: its gradient is zero
            if isinstance(module, nn.Linear):
                norm2, finish = _linear(module, [x[0] for x in record.inputs], b)
            else:
                norm2, finish = _instantiated(module, record.inputs, b)
            squared += norm2.to(squared.dtype)
            pending.append(finish)
        norms = squared.sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        accumulators = {id(p): acc for p, acc in zip(self.params, into, strict=True)}
        for finish in pending:
            finish(factors * scale, accumulators)
        return norms, loss.detach()


_Finish = Callable[[torch.Tensor, dict[int, torch.Tensor]], None]
"""Adds a layer's clipped sum, given the clipping factors, to the accumulators keyed by parameter id."""


def _as_sequence(tensors: Sequence[torch.Tensor], batch: int, width: int) -> torch.Tensor:
    """(B, T, width): a 2-D tensor is T = 1; several calls are concatenated along T (one call is not copied)."""
    if len(tensors) == 1:
        return tensors[0].reshape(batch, -1, width)
    return torch.cat([x.reshape(batch, -1, width) for x in tensors], dim=1)


def _linear(
    module: nn.Linear, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, _Finish]:
    """Per-example squared norms of a linear layer's gradient, and a function giving its clipped sum.

    Several calls of one layer in a forward pass are one longer sequence: ``g_i = sum_t b_it^T a_it``.
    """
    batch = inputs[0].shape[0]
    d, p = module.in_features, module.out_features
    a, b = _as_sequence(inputs, batch, d), _as_sequence(grads, batch, p)
    steps = a.shape[1]
    weight, bias = module.weight, module.bias
    norm2 = torch.zeros(batch, dtype=a.dtype, device=a.device)
    if steps == 1:
        a2, b2 = a[:, 0], b[:, 0]
        b_sq = b2.pow(2).sum(dim=1)
        if weight.requires_grad:
            norm2 = norm2 + a2.pow(2).sum(dim=1) * b_sq
        if bias is not None and bias.requires_grad:
            norm2 = norm2 + b_sq
    else:
        if weight.requires_grad:
            if 2 * steps * steps <= d * p:
                # Gram form: ||b_i^T a_i||_F^2 = <a_i a_i^T, b_i b_i^T>, never forming the d x p gradient.
                norm2 = norm2 + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum(dim=(1, 2))
            else:
                norm2 = norm2 + torch.bmm(b.transpose(1, 2), a).pow(2).sum(dim=(1, 2))
        if bias is not None and bias.requires_grad:
            norm2 = norm2 + b.sum(dim=1).pow(2).sum(dim=1)

    def finish(factors: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
        scaled = b * factors.to(b.dtype).view(-1, 1, 1)  # diag(c) B
        if weight.requires_grad:
            into[id(weight)].addmm_(scaled.reshape(-1, p).T, a.reshape(-1, d))  # (diag(c) B)^T A
        if bias is not None and bias.requires_grad:
            into[id(bias)].add_(scaled.sum(dim=(0, 1)))

    return norm2, finish


def _instantiated(
    module: nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]], grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, _Finish]:
    """Explicit per-example gradients of a small layer from its recorded inputs and output gradients."""
    from torch.func import functional_call, vjp, vmap

    params = dict(_trainable(module))

    def one(args: tuple[torch.Tensor, ...], cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
        def forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            batched = tuple(a.unsqueeze(0) for a in args)  # a batch of one, as the layer expects
            return functional_call(module, weights, batched).squeeze(0)

        pull = vjp(forward, params)[1]
        (grad,) = pull(cotangent)
        return grad

    per_example: dict[str, torch.Tensor] = {}
    for args, b in zip(inputs, grads, strict=True):
        for name, g in vmap(one)(args, b).items():
            per_example[name] = per_example[name] + g if name in per_example else g
    batch = grads[0].shape[0]
    norm2 = torch.stack([g.reshape(batch, -1).pow(2).sum(dim=1) for g in per_example.values()]).sum(dim=0)

    def finish(factors: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
        for name, g in per_example.items():
            into[id(params[name])].add_(torch.tensordot(factors.to(g.dtype), g, dims=1))

    return norm2, finish
