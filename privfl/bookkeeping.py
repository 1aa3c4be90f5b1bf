"""Book-keeping clipping for DP-SGD: per-example norms and the clipped gradient sum in one backward pass.

Book-keeping (Bu, Wang, Zha, Karypis 2023, "Differentially private optimization on large model at
small cost") never materialises per-example gradients of linear layers. One forward pass keeps each
layer's input ``a`` and output ``z``; one backward pass of the summed loss gives the output gradients
``b = dL/dz`` (and nothing else: no parameter gradient is computed). For a linear layer the
per-example weight gradient is ``g_i = b_i^T a_i``, so

- its norm comes from the ghost-norm trick (Goodfellow 2015; Li et al. 2021): for 2-D inputs
  ``||g_i||^2 = ||a_i||^2 ||b_i||^2``; for sequence inputs (B, T, d) either the Gram form
  ``<a_i a_i^T, b_i b_i^T>`` (two B x T x T matrices, computed in float64: the Gram entries are
  large and cancel when an example's tokens share a large common component) or the instantiated
  ``g_i`` (a B x d x p tensor), chosen by memory: the Gram form when ``2 T^2 <= d p``;
- the clipped sum is ``sum_i c_i g_i = (diag(c) B)^T A``, one matrix product (in float64 after a
  Gram-form norm, so the released sum is the gradient whose norm was clipped; from the
  instantiated ``g_i`` when those were formed), with
  ``c_i = min(1, C / (||g_i|| + 1e-6))`` over the whole per-example gradient (all layers), the
  factor Opacus' DP optimizer uses.

Small layers other than linear ones (convolutions, GroupNorm, LayerNorm, Embedding) get explicit
per-example gradients from their recorded input and output gradient (``torch.func``), which
allocates B times each such layer's parameters; any other layer holding trainable parameters is
refused with a :class:`~privfl.errors.ConfigError`, as are subclasses of the supported layers and
layers reparametrised by hooks or ``torch.nn.utils.parametrize`` (their gradient is not the one
computed here). Every layer must keep the examples along the first dimension of its input and
output, and every parameter must be used only by its own layer: :func:`check_gradient_coverage`
checks the latter once, on a real batch, before training.

Privacy: the released step is ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / E[B]``, the Gaussian
mechanism on Poisson-sampled batches that Opacus' DP optimizer runs, so the DP event charged is
the same as with the other clipping modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from privfl.errors import ConfigError

__all__ = [
    "PER_SAMPLE_FALLBACK_LAYERS",
    "BookKeeping",
    "ClippedSum",
    "bookkeeping_unsupported",
    "check_gradient_coverage",
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

LINEAR_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, NonDynamicallyQuantizableLinear)
"""Layers book-keeping clips by the ghost-norm trick (the second is nn.MultiheadAttention's output layer)."""

_HANDLED_PARAMETERS = frozenset({"weight", "bias"})

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


def _layer_problem(path: str, module: nn.Module, params: list[tuple[str, nn.Parameter]]) -> str | None:
    """Why book-keeping cannot clip the parameters ``module`` holds directly, or ``None``."""
    where = f"layer {path or '<model>'} ({type(module).__name__})"
    # Exact types: a subclass may compute something else from its weight in its own forward.
    if type(module) not in (*LINEAR_LAYERS, *PER_SAMPLE_FALLBACK_LAYERS):
        return f"{where} holds trainable parameters"
    extra = sorted(name for name, _ in params if name not in _HANDLED_PARAMETERS)
    if extra:
        return f"{where} holds trainable parameters other than weight and bias ({', '.join(extra)})"
    if parametrize.is_parametrized(module):
        return f"{where} is reparametrised (torch.nn.utils.parametrize)"
    if module._forward_pre_hooks:
        # weight_norm / spectral_norm and the like rewrite the weight before each call.
        return f"{where} has forward pre-hooks (e.g. weight_norm or spectral_norm)"
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return f"{where} has sparse=True (sparse gradients)"
        if module.max_norm is not None:
            return f"{where} has max_norm (it renormalises its weight in place during the forward pass)"
    return None


def bookkeeping_unsupported(model: nn.Module) -> str | None:
    """Why book-keeping cannot train ``model``, or ``None`` when it can.

    Every trainable parameter must be the ``weight`` or ``bias`` of an ``nn.Linear`` or of a
    layer of :data:`PER_SAMPLE_FALLBACK_LAYERS`, of exactly that type (not a subclass, whose
    forward may differ), with no forward pre-hook or parametrization rewriting it (weight_norm,
    spectral_norm); an Embedding must be dense and without ``max_norm``. No parameter may be
    shared between layers (a tied weight's per-example gradient spans several layers' records),
    and no BatchNorm may mix the examples of a batch. A parameter also used outside its layer
    (``x @ self.fc.weight.T`` in a forward) is not visible here: :func:`check_gradient_coverage`
    detects it on a batch. As with Opacus, a custom ``forward`` that mixes examples without
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
        problem = _layer_problem(path, module, params)
        if problem is not None:
            return problem
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
        self._names = {m: path or "<model>" for path, m in model.named_modules()}

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
        noise-only gradient. Existing ``.grad`` tensors are reused: linear layers allocate no
        parameter-sized memory, but the layers of :data:`PER_SAMPLE_FALLBACK_LAYERS` (convolutions,
        GroupNorm, LayerNorm, Embedding) hold their per-example gradients, B times their size.

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

        def keep(
            module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], output: torch.Tensor
        ) -> torch.Tensor:
            record = records[module]
            # The supported layers take one input; a keyword call (fc(input=x)) is the same input.
            called = (*args, *kwargs.values())
            record.inputs.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in called))
            record.outputs.append(output)
            # The model goes on with a copy: an in-place op after the layer (ReLU(inplace=True))
            # would otherwise rewrite the recorded output, and its gradient with it.
            return output.clone()

        # Prepended, so the layer's own output is recorded even if a user's hook replaces it.
        handles: list[RemovableHandle] = [
            m.register_forward_hook(keep, prepend=True, with_kwargs=True) for m in self._layers
        ]
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
            _check_batch_first(self._names[module], module, record.inputs, b, batch)
            if isinstance(module, nn.Linear):
                norm2, finish = _linear(module, [x[0] for x in record.inputs], b)
            else:
                norm2, finish = _instantiated(module, record.inputs, b)
            squared += norm2.to(squared.dtype)
            pending.append(finish)
        norms = squared.clamp_min(0).sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        accumulators = {id(p): acc for p, acc in zip(self.params, into, strict=True)}
        for finish in pending:
            finish(factors * scale, accumulators)
        return norms, loss.detach()


def _check_batch_first(
    name: str,
    module: nn.Module,
    inputs: Sequence[tuple[object, ...]],
    output_grads: Sequence[torch.Tensor],
    batch: int,
) -> None:
    """Every recorded input and output gradient of a layer holds the batch's examples along dimension 0.

    Book-keeping reads row i as example i: a layer run on (T, B, d) or on flattened (B T, d)
    tensors would be clipped per time step or per row, not per example.

    Raises:
        ConfigError: a recorded tensor's first dimension is not the batch size (names the layer).
    """
    tensors = [a for call in inputs for a in call if isinstance(a, torch.Tensor)] + list(output_grads)
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ConfigError(
                "training.dp.clipping",
                "bookkeeping",
                f"layer {name} ({type(module).__name__}) was called on a tensor of shape {tuple(t.shape)} "
                f"for a batch of {batch}: book-keeping needs the examples along the first dimension "
                "of every layer's input and output",
            )


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
    gram = False
    per_example: torch.Tensor | None = None
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
                # In float64: when an example's tokens share a large component s, the Gram entries
                # are of order ||s||^2 and their weighted sum cancels down to the small true norm;
                # float32 rounding then gives a norm too small, or negative (NaN after the sqrt).
                gram = True
                a64, b64 = a.double(), b.double()
                products = torch.bmm(a64, a64.transpose(1, 2)) * torch.bmm(b64, b64.transpose(1, 2))
                norm2 = norm2 + products.sum(dim=(1, 2)).clamp_min(0).to(norm2.dtype)
            else:
                # The instantiated g_i (B x p x d, small here: d p < 2 T^2) is kept for the clipped
                # sum too, so the norm and the released gradient are of the very same tensor.
                per_example = torch.bmm(b.transpose(1, 2), a)
                norm2 = norm2 + per_example.pow(2).sum(dim=(1, 2))
        if bias is not None and bias.requires_grad:
            norm2 = norm2 + b.sum(dim=1).pow(2).sum(dim=1)

    def finish(factors: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
        scaled = b * factors.to(b.dtype).view(-1, 1, 1)  # diag(c) B
        if weight.requires_grad:
            if per_example is not None:
                into[id(weight)].add_(torch.tensordot(factors.to(per_example.dtype), per_example, dims=1))
            elif gram:
                # (diag(c) B)^T A in float64, as the norm: in float32 the same cancellation makes the
                # released sum differ from the gradient whose norm was clipped (by 1e-5 relative and more).
                summed = (b.double() * factors.double().view(-1, 1, 1)).reshape(-1, p).T @ a.double().reshape(-1, d)
                into[id(weight)].add_(summed.to(into[id(weight)].dtype))
            else:
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


_COVERAGE_RTOL = 1e-4
"""Relative tolerance of :func:`check_gradient_coverage` (float32 rounding is far below it)."""


def _float_leaves(output: object) -> list[torch.Tensor]:
    leaves, _ = pytree.tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_gradient_coverage(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Checks, on one batch, that each trainable parameter's gradient flows only through its own layer.

    DP-SGD clips what each layer's records give: for a parameter the per-example gradient through
    the calls of the module that holds it. A parameter also used elsewhere (a tied output head
    ``h @ self.embed.weight.T``, a skip path ``x @ self.fc.weight.T`` in a ``forward``) has a part
    of its gradient outside those records: book-keeping drops it and Opacus' ghost clipping
    releases it unclipped. This runs the model once on ``inputs`` (in eval mode, so dropout
    draws nothing; the training flags are restored), records every call of every module holding
    trainable parameters, and compares the autograd gradient of the summed loss with the sum of
    the layers' own vector-Jacobian products at the recorded inputs (no clipping). It also checks
    that the examples stay independent along the first dimension: the loss of example 0 alone
    must give every recorded layer output a gradient that vanishes on the other rows (a layer run
    on (T, B, d) tensors, or one mixing the examples, fails this).

    Nothing is left on the model: no ``.grad`` is written and every hook is removed. A gradient
    part that happens to vanish on this batch (a dead ReLU path) is not seen, so pass a real
    batch of a few examples, e.g. the first batch of the training data.

    Args:
        model: the model to train, on the device of ``inputs``.
        inputs: a small batch of real inputs, examples along the first dimension (at least 2
            examples for the independence check; 1 checks coverage only).
        labels: their labels.
        loss_fn: the summed loss; ``nn.CrossEntropyLoss(reduction="sum")`` when ``None``.

    Raises:
        ConfigError: a parameter's gradient has a part outside its own layer (names the
            parameter), a layer's input or output does not keep the examples along the first
            dimension (names the layer), or a layer cannot be re-run on its recorded inputs.
    """
    from torch.func import functional_call, vjp

    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batch = len(inputs)
    if batch == 0:
        raise ConfigError("inputs", tuple(inputs.shape), "the coverage check needs at least one example")
    names = {m: path or "<model>" for path, m in model.named_modules()}
    layers = [m for m in model.modules() if _trainable(m)]
    if not layers:
        return
    calls: list[tuple[nn.Module, tuple[object, ...], dict[str, object], list[torch.Tensor]]] = []

    def keep(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object) -> object:
        detached_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        detached_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        calls.append((module, detached_args, detached_kwargs, _float_leaves(output)))
        # The model goes on with a copy, so an in-place op after the layer leaves the record intact.
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    handles = [m.register_forward_hook(keep, prepend=True, with_kwargs=True) for m in layers]
    try:
        output = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    try:
        owners = {id(p): f"{names[m]}.{n}" if names[m] != "<model>" else n for m in layers for n, p in _trainable(m)}
        params = [p for m in layers for _, p in _trainable(m)]
        params = list({id(p): p for p in params}.values())
        recorded = [z for _, _, _, leaves in calls for z in leaves]
        loss = loss_fn(output, labels)

        # Batch-first and independent examples: example 0's loss reaches only row 0 of every layer output.
        if batch > 1:
            first = torch.autograd.grad(
                loss_fn(output[:1], labels[:1]), recorded, allow_unused=True, materialize_grads=True, retain_graph=True
            ) if recorded else ()
            grads_of = iter(first)
            for module, args, kwargs, leaves in calls:
                shaped = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)] + leaves
                for t in shaped:
                    if t.dim() == 0 or t.shape[0] != batch:
                        raise ConfigError(
                            "model",
                            names[module],
                            f"layer {names[module]} ({type(module).__name__}) was called on a tensor of shape {tuple(t.shape)} for a batch of "
                            f"{batch}: DP-SGD needs the examples along the first dimension of every layer's input "
                            "and output",
                        )
                for _ in leaves:
                    g = next(grads_of)
                    scale = float(g.abs().max()) if g.numel() else 0.0
                    if scale > 0 and float(g[1:].abs().max()) > 1e-6 * scale:
                        raise ConfigError(
                            "model",
                            names[module],
                            f"layer {names[module]} ({type(module).__name__}) mixes the examples of a batch (the loss of example 0 reaches "
                            "other rows of its output): DP-SGD needs the examples along the first dimension, "
                            "each on its own",
                        )

        total = torch.autograd.grad(loss, params + recorded, allow_unused=True, materialize_grads=True)
        true_grads, output_grads = total[: len(params)], total[len(params) :]
        rebuilt = {id(p): torch.zeros_like(p) for p in params}
        grads_of = iter(output_grads)
        for module, args, kwargs, leaves in calls:
            cotangents = tuple(next(grads_of).detach() for _ in leaves)
            own = dict(_trainable(module))

            def forward(
                weights: dict[str, torch.Tensor],
                module: nn.Module = module,
                args: tuple[object, ...] = args,
                kwargs: dict[str, object] = kwargs,
            ) -> tuple[torch.Tensor, ...]:
                return tuple(_float_leaves(functional_call(module, weights, args, kwargs)))

            try:
                pulled_back = vjp(forward, {n: p.detach() for n, p in own.items()})
                outs, pull = pulled_back[0], pulled_back[1]
            except Exception as error:  # any failure to re-run the layer: refuse rather than guess
                raise ConfigError(
                    "model",
                    names[module],
                    f"layer {names[module]} ({type(module).__name__}) cannot be re-run on its recorded inputs to check its gradient ({error})",
                ) from error
            if len(outs) != len(cotangents):
                raise ConfigError(
                    "model",
                    names[module],
                    f"layer {names[module]} ({type(module).__name__}) gives different outputs when re-run on its recorded inputs",
                )
            (pulled,) = pull(cotangents)
            for n, p in own.items():
                rebuilt[id(p)] += pulled[n]
        for p, expected in zip(params, true_grads, strict=True):
            got = rebuilt[id(p)]
            gap = float((got - expected).double().norm())
            if not gap <= _COVERAGE_RTOL * float(expected.double().norm()) + 1e-6:
                raise ConfigError(
                    "parameters",
                    owners[id(p)],
                    "used outside its module (e.g. weight tying or a direct use in forward); "
                    "DP-SGD cannot clip it per example",
                )
    finally:
        for m, training in modes.items():
            m.train(training)
