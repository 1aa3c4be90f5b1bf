"""Fresh copies of a run's initial model, one per local training, without a deep copy each time.

Every local training (a Site's, or a client's in ``Federation``) starts from the run's initial
model (its full state: frozen parameters and buffers included) and then takes the global
parameters. A deep copy of that model per request costs 0.25-0.4 ms for a logistic regression, the
largest per-site cost of a 1,000-site round over ``LocalSites`` after the training itself
(docs/performance.md); ``Federation`` built one with ``model_fn`` and ``load_state_dict`` instead,
about 0.2 ms. A model whose training changed nothing but the values of its tensors can instead be
reset in place: every parameter and buffer copied back from the template, every ``.grad`` dropped.

:class:`ModelPool` keeps such a model between requests, and only such a model. It is handed back
after training and kept only if it is, apart from tensor values, what the template is:

- the same modules in the same order, of the same types;
- on each module, the same attribute names, the same parameters and buffers (names, shapes, dtypes,
  ``requires_grad``), as many hooks of each kind as the template, and every other attribute a plain
  value (numbers, strings, None, dtypes, tuples and lists of them) equal to the template's;
- no attribute set on a parameter or buffer (Opacus' ``grad_sample``, say) and no tensor hook.

Anything else (hooks or attributes a training library left behind, a module that keeps a list or a
tensor as Python state) is not kept, and the next request gets a new copy, as before. What Opacus
leaves (activation lists, per-example gradients, torch's backward-hook mark) is removed by
``privfl.training.train_dp_sgd`` when a training ends, so models trained in every clipping mode are
kept. So a reused
model is the template's state exactly, and the updates it trains are bit-identical to a new copy's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ModelPool", "differs_beyond_values"]

_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# Module attributes holding the module's own tensors and sub-modules, compared by name below.
_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules", "training"})


def _plain(value: object) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, frozenset, set)):
        return all(_plain(item) for item in value)
    return False


def _tensor_differs(tensor: torch.Tensor | None, template: torch.Tensor | None, where: str) -> str | None:
    if tensor is None or template is None:
        return None if tensor is None and template is None else f"{where} is set on one model only"
    if tensor.shape != template.shape or tensor.dtype != template.dtype:
        return f"{where} has shape {tuple(tensor.shape)} {tensor.dtype}, the template {tuple(template.shape)} {template.dtype}"
    if isinstance(tensor, nn.Parameter) != isinstance(template, nn.Parameter) or tensor.requires_grad != template.requires_grad:
        return f"{where} is trained on one model only"
    if tensor.__dict__.keys() != template.__dict__.keys():
        return f"{where} carries attributes {sorted(tensor.__dict__.keys() ^ template.__dict__.keys())}"
    for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
        if getattr(tensor, hooks, None) or getattr(template, hooks, None):
            return f"{where} has a tensor hook"
    return None


def differs_beyond_values(model: nn.Module, template: nn.Module) -> str | None:
    """What, other than tensor values and ``.grad``, sets ``model`` apart from ``template``; None if nothing.

    Conservative: a difference this cannot judge (a Python attribute holding an object) counts as one.
    """
    modules, templates = list(model.named_modules()), list(template.named_modules())
    if [name for name, _ in modules] != [name for name, _ in templates]:
        return "the module tree differs"
    for (name, module), (_, other) in zip(modules, templates, strict=True):
        where = name or "the model"
        if type(module) is not type(other):
            return f"{where} is a {type(module).__name__}, the template's a {type(other).__name__}"
        if module.__dict__.keys() != other.__dict__.keys():
            return f"{where} has attributes {sorted(module.__dict__.keys() ^ other.__dict__.keys())} on one model only"
        for key, value in module.__dict__.items():
            theirs = other.__dict__[key]
            if key in _CONTAINERS:
                continue
            if isinstance(value, dict) and "hook" in key:
                if len(value) != len(theirs):
                    return f"{where} has {len(value)} {key}, the template {len(theirs)}"
            elif not (_plain(value) and _plain(theirs) and value == theirs):
                return f"{where}.{key} is not a plain value equal to the template's"
        for kind in ("_parameters", "_buffers"):
            ours, its = getattr(module, kind), getattr(other, kind)
            if ours.keys() != its.keys():
                return f"{where} has other {kind.strip('_')}"
            for key in ours:
                reason = _tensor_differs(ours[key], its[key], f"{where}.{key}")
                if reason is not None:
                    return reason
    return None


class ModelPool:
    """Copies of ``template`` for successive trainings: :meth:`take` one, :meth:`give_back` it after.

    One model at a time is kept (a site trains one request at a time). The template itself is never
    handed out, and is not changed.

    Args:
        template: the model every copy starts as.
        build: makes a new copy when none is kept (default: a deep copy of ``template``); it must
            return the template's architecture and state.
    """

    def __init__(self, template: nn.Module, *, build: Callable[[], nn.Module] | None = None) -> None:
        self.template = template
        self._build = build
        self._spare: nn.Module | None = None
        self.reused = 0  # how many takes were served by a reset instead of a new copy (for tests)

    def take(self) -> nn.Module:
        """A model whose state (parameters, buffers) is the template's, with no ``.grad``."""
        spare, self._spare = self._spare, None
        if spare is None:
            return self._build() if self._build is not None else copy.deepcopy(self.template)
        with torch.no_grad():
            for parameter, initial in zip(spare.parameters(), self.template.parameters(), strict=True):
                parameter.copy_(initial)
                parameter.grad = None
            for buffer, value in zip(spare.buffers(), self.template.buffers(), strict=True):
                buffer.copy_(value)
        spare.train(self.template.training)
        self.reused += 1
        return spare

    def give_back(self, model: nn.Module) -> None:
        """Keeps ``model`` for the next :meth:`take` if its training changed only tensor values."""
        if model is not self.template and differs_beyond_values(model, self.template) is None:
            self._spare = model
