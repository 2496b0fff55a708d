"""A tied input embedding whose lookup gradient is added into the LM head's in place.

With tied weights (Gemma's LM head is its input embedding) backward computes the head's
dense ``[V, H]`` gradient first and the embedding lookup's last: torch's dense embedding
backward builds a second, mostly zero ``[V, H]`` tensor and autograd adds it to the first.
Both are alive at the end of backward, beside every other gradient: that temporary is the
training step's peak on the CPU (0.625 GiB for gemma-3-270m in fp32, docs/benchmarks.md).

:func:`tied_pass` ties one forward's uses of the weight together. Each head call reads
the weight detached, so its backward computes only the hidden states' gradient; ``_HoldGrad``
keeps the call's ``(grad_logits, hidden)``. The lookup's backward (``_Lookup``), which
autograd can only reach after every head call's and the whole trunk's, computes the head's
weight gradient from them (the same ``mm`` autograd's would run, summed in the same order),
then adds the lookup's own rows in place, and returns the sum as the weight's whole gradient.
Its rows are torch's own dense kernel (``embedding_dense_backward``) run on the distinct ids,
so each sums the same token gradients in the same order: the weight's gradient is bit for
bit the dense path's (up to the sign of an exact zero). No zero-filled ``[V, H]`` is built,
and the head's ``[V, H]`` gradient is allocated after the trunk's backward has freed the
activations instead of beside them; just before, the pages malloc holds freed (those
activations) go back to the OS (`fpo.heap`), so the gradient does not stack on them. A
lookup whose forward no head call read returns torch's dense gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fpo.heap import release_free_heap

#: ``F.embedding``'s arguments, in order (``nn.Embedding.forward`` passes them all).
EMBEDDING_ARGS = (
    "input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"
)  # fmt: skip


@dataclass
class _Box:
    """What the backward passes of one forward share."""

    looked_up: bool = False  # the lookup ran with grad: its backward will come
    held: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (grad_logits, hidden)


class _HoldGrad(torch.autograd.Function):
    """The identity on one head call's logits ``[C, V]``, computed from a detached weight;
    backward keeps ``(grad_logits, hidden)`` for the lookup's backward, which computes the
    weight's gradient from them once the trunk's backward has freed the activations."""

    @staticmethod
    def forward(ctx, logits: Tensor, hidden: Tensor, box: _Box) -> Tensor:
        ctx.save_for_backward(hidden)
        ctx.box = box
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (hidden,) = ctx.saved_tensors
        ctx.box.held.append((grad, hidden))
        return grad, None, None


class _Lookup(torch.autograd.Function):
    """``weight[ids]`` (``[..., H]``); backward returns the weight's whole gradient: the held
    head calls' ``grad_logits^T @ hidden`` (``[V, H]``, summed in autograd's order) with
    this lookup's rows added in place."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, padding_idx: int | None, box: _Box):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.num_weights, ctx.box = padding_idx, weight.shape[0], box
        box.looked_up = True
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        box, padding = ctx.box, -1 if ctx.padding_idx is None else ctx.padding_idx
        grad = grad.reshape(-1, grad.shape[-1])  # [N * T, H]
        held, box.held = box.held, []
        if not held:  # no head read the weight: torch's own dense gradient
            dense = torch.ops.aten.embedding_dense_backward(
                grad, ids.reshape(-1), ctx.num_weights, padding, False
            )
            return dense, None, None, None
        release_free_heap()  # the freed activations, before the [V, H] gradient is allocated
        total = None
        while held:  # MmBackward's weight gradient per call, added as autograd adds them
            grad_logits, hidden = held.pop(0)
            part = grad_logits.t().mm(hidden)
            del grad_logits, hidden
            total = part if total is None else total.add_(part)
            del part
        distinct, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        hit = (distinct == padding).nonzero()
        rows = torch.ops.aten.embedding_dense_backward(
            grad, inverse, distinct.numel(), int(hit[0, 0]) if hit.numel() else -1, False
        )  # [U, H]: the same sums as the dense kernel's rows of those ids
        return total.index_add_(0, distinct, rows), None, None, None


class _LookupMode(TorchFunctionMode):
    """Routes ``F.embedding`` of ``weight`` (plain arguments) through ``_Lookup``."""

    def __init__(self, weight: Tensor, box: _Box) -> None:
        super().__init__()
        self.weight, self.box = weight, box

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            bound = dict(zip(EMBEDDING_ARGS, args, strict=False)) | kwargs
            plain = bound.get("max_norm") is None and not any(
                bound.get(k) for k in ("scale_grad_by_freq", "sparse")
            )
            if bound.get("weight") is self.weight and plain:
                padding = bound.get("padding_idx")
                if padding is not None and padding < 0:
                    padding += self.weight.shape[0]
                return _Lookup.apply(self.weight, bound["input"], padding, self.box)
        return func(*args, **kwargs)


class TiedPass:
    """One forward's embedding lookup and head calls, sharing the weight's gradient.

    ``embed(input_ids [N, T]) -> inputs_embeds [N, T, H]`` runs the embedding module's own
    forward (its scaling included); ``head(hidden [C, H]) -> logits [C, V]`` is the plain
    head ``weight @ hidden^T`` on the detached weight, its weight gradient deferred to the
    lookup's backward (before it, the head's backward computes only ``hidden``'s).
    """

    def __init__(self, embedding: nn.Module) -> None:
        self.embedding, self.box = embedding, _Box()

    def embed(self, input_ids: Tensor) -> Tensor:
        with _LookupMode(self.embedding.weight, self.box):
            return self.embedding(input_ids)

    def head(self, hidden: Tensor) -> Tensor:
        weight = self.embedding.weight
        if not self.box.looked_up:  # no lookup to take the gradient: the plain head
            return torch.mm(weight, hidden.t()).t()
        logits = torch.mm(weight.detach(), hidden.t()).t()
        return _HoldGrad.apply(logits, hidden, self.box)


def _unhooked(module: nn.Module) -> bool:
    """No forward hook changes the module's call (strategies gather sharded weights in one)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def tied_pass(
    embedding: nn.Module, lm_head: nn.Module, head_is_plain: Callable[[nn.Module], bool]
) -> TiedPass | None:
    """A :class:`TiedPass` for one forward, or ``None`` where it does not apply.

    It applies (checked at each call) on the CPU with grad enabled and no autocast, to a plain
    ``nn.Embedding`` (no hooks, ``max_norm``, ``scale_grad_by_freq`` or ``sparse``) whose
    trainable strided weight *is* the LM head's, the head a plain linear
    (``head_is_plain(lm_head)``). Elsewhere (CUDA, untied or frozen weights, FSDP- or
    DeepSpeed-wrapped modules, no grad) the caller runs the model as it is.
    """
    weight = getattr(embedding, "weight", None)
    usable = (
        torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and isinstance(embedding, nn.Embedding)
        and isinstance(weight, nn.Parameter)
        and weight.requires_grad
        and weight.device.type == "cpu"
        and weight.layout == torch.strided
        and getattr(lm_head, "weight", None) is weight
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
        and _unhooked(embedding)
        and head_is_plain(lm_head)
    )
    return TiedPass(embedding) if usable else None
