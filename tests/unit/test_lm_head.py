"""The split LM head (`fpo.models.hf.split_causal_lm`): same logits and gradients as the
model's own head, and a tied embedding's two gradients summed in place (no third ``[V, H]``
tensor at the peak of backward)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fpo.models.hf import contiguous_grad_head, split_causal_lm
from fpo.models.tiny import build_tiny_model


def _logps_loss(model, parts, input_ids):
    """Sum of log-softmax at the last position, through the split trunk and head."""
    hidden = parts.decoder(input_ids=input_ids).last_hidden_state[:, -1]  # [N, H]
    return torch.log_softmax(parts.head(hidden), dim=-1)[:, 3].sum()


def test_head_gives_the_models_own_logits_and_gradients():
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    hidden = torch.randn(5, model.config.hidden_size)
    assert torch.allclose(parts.head(hidden), model.get_output_embeddings()(hidden), atol=1e-6)

    input_ids = torch.randint(3, model.config.vocab_size, (2, 7))
    _logps_loss(model, parts, input_ids).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits[:, -1]
    torch.log_softmax(logits, dim=-1)[:, 3].sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name


def test_head_under_bf16_autocast_matches_the_models_own_head():
    """The rewritten matrix multiply is autocast like F.linear: bf16 logits, fp32 grads."""
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 7))
    grads = []
    for head in (parts.head, model.get_output_embeddings()):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(parts.decoder(input_ids=input_ids).last_hidden_state[:, -1])
        assert logits.dtype == torch.bfloat16
        torch.log_softmax(logits.float(), dim=-1)[:, 3].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads[1][name], atol=1e-2, rtol=1e-2)


def test_tied_embedding_gradients_add_in_place():
    """F.linear's weight gradient is a transposed view, which autograd cannot add the
    embedding's gradient into: it allocates a third [V, H] tensor (0.625 GiB for
    gemma-3-270m). The split head's gradient is contiguous, so the sum is in place."""
    torch.manual_seed(0)
    model = build_tiny_model().float()
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight  # tied
    vocab_matrix_bytes = weight.numel() * weight.element_size()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 7))

    def adds_allocating_a_vocab_matrix(parts) -> int:
        model.zero_grad(set_to_none=True)
        loss = _logps_loss(model, parts, input_ids)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss.backward()
        return sum(
            1
            for event in prof.events()
            if event.name == "aten::add" and event.cpu_memory_usage >= vocab_matrix_bytes
        )

    assert adds_allocating_a_vocab_matrix(split_causal_lm(model)) == 0
    # the same check sees the third tensor with the module's own head
    unsplit = split_causal_lm(model)._replace(head=model.get_output_embeddings())
    assert adds_allocating_a_vocab_matrix(unsplit) == 1


def test_softcapped_head_keeps_its_cap():
    """Gemma-2's final soft-capping is applied on top of the rewritten head."""
    from benchmarks.models import GEMMA2_TINY, _random_gemma2

    model, _ = _random_gemma2(GEMMA2_TINY, "cpu", seed=0)
    hidden = torch.randn(4, model.config.hidden_size) * 100  # logits far beyond the cap (30)
    logits = split_causal_lm(model).head(hidden)
    raw = model.get_output_embeddings()(hidden)
    assert raw.abs().max() > 30 and logits.abs().max() <= 30
    assert torch.allclose(logits, torch.tanh(raw / 30) * 30, atol=1e-5)


def test_heads_that_are_not_plain_linears_are_called_as_modules():
    """A bias, a subclass (LoRA, quantised, FSDP's) or a forward hook (FSDP / DeepSpeed
    gather a sharded weight in one) keeps the module's own call; so does a 3-D input.
    Hooks added after the split count: strategies wrap the model after it."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 4)
    calls = []

    plain = nn.Linear(4, 6, bias=False)
    head = contiguous_grad_head(plain)
    plain.register_forward_pre_hook(lambda module, args: calls.append("hook"))
    head(hidden)
    assert calls == ["hook"]

    with_bias = nn.Linear(4, 6)
    assert torch.allclose(contiguous_grad_head(with_bias)(hidden), with_bias(hidden))

    class Sub(nn.Linear):
        def forward(self, x):
            calls.append("sub")
            return super().forward(x)

    contiguous_grad_head(Sub(4, 6, bias=False))(hidden)
    assert calls[-1] == "sub"
    unhooked = nn.Linear(4, 6, bias=False)
    batched = hidden[None].expand(2, 3, 4)  # [N, T, H]
    assert torch.allclose(contiguous_grad_head(unhooked)(batched), unhooked(batched))


def _tied_loss(parts, input_ids, tie) -> torch.Tensor:
    """`_logps_loss` with the decoder fed by ``tie`` (a `TiedPass`) or by the ids."""
    inputs = {"input_ids": input_ids} if tie is None else {"inputs_embeds": tie.embed(input_ids)}
    hidden = parts.decoder(**inputs).last_hidden_state[:, -1]
    # two head calls (the LM head's chunks): both gradients are held, then the lookup's added
    first, second = (parts.head(h, tie) for h in hidden.split([1, 2]))
    return torch.log_softmax(torch.cat([first, second]), dim=-1)[:, 3].sum()


def test_tied_embedding_gradients_are_bit_identical_without_a_second_vocab_matrix():
    """The tied embedding's lookup adds its rows into the head's held gradient in place: no
    second [V, H] tensor at the end of backward (0.625 GiB for gemma-3-270m), and every
    gradient bit for bit the dense path's (repeated ids, the pad id)."""
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    weight = model.get_input_embeddings().weight
    input_ids = torch.randint(3, 40, (3, 9))  # ids repeat within and across rows
    input_ids[:, 0] = 2
    input_ids[0, -2:] = model.get_input_embeddings().padding_idx
    vocab_matrix_bytes = weight.numel() * weight.element_size()

    def backward(tied: bool) -> tuple[dict, int]:
        """The gradients, and the [V, H] tensors backward allocated beside the head's."""
        model.zero_grad(set_to_none=True)
        loss = _tied_loss(parts, input_ids, parts.tie() if tied else None)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        big = [
            e.name
            for e in prof.events()
            if e.cpu_memory_usage >= vocab_matrix_bytes and e.name.startswith("aten::")
        ]
        return grads, len([name for name in big if name != "aten::mm"])

    dense, dense_extra = backward(tied=False)
    tied, tied_extra = backward(tied=True)
    for name, grad in dense.items():
        assert tied[name].layout == torch.strided, name
        assert torch.equal(tied[name], grad), name
    assert dense_extra >= 1  # torch's embedding backward: a zero-filled [V, H]
    assert tied_extra == 0


def test_tied_pass_applies_only_where_it_is_safe():
    """``tie()`` is None (the model then runs as it is) without grad, for an untied or
    frozen weight, and for a hooked embedding (a strategy's gather)."""
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    with torch.no_grad():
        assert parts.tie() is None
    embedding = model.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda *_: None)
    assert parts.tie() is None
    handle.remove()
    assert parts.tie() is not None
    embedding.weight.requires_grad_(False)
    assert parts.tie() is None
    embedding.weight.requires_grad_(True)
    model.get_output_embeddings().weight = nn.Parameter(embedding.weight.detach().clone())
    assert split_causal_lm(model).tie() is None  # untied


def test_tied_lookup_without_the_head_gives_the_dense_gradient():
    """A pass whose head never reads the held weight (features only) still gets the whole,
    dense gradient."""
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    input_ids = torch.randint(3, 40, (2, 6))
    parts.decoder(input_ids=input_ids).last_hidden_state.square().sum().backward()
    expected = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    tie = parts.tie()
    parts.decoder(inputs_embeds=tie.embed(input_ids)).last_hidden_state.square().sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad.layout == torch.strided and torch.equal(grad, expected)


def test_tied_backward_returns_the_freed_heap_before_the_vocab_gradient(monkeypatch):
    """The lookup's backward hands malloc's freed pages (the activations) back to the OS
    once per backward, before it allocates the head's ``[V, H]`` gradient: on gemma-3-270m
    that takes DPO's peak RSS from 6.71 to 6.08 GiB (docs/benchmarks.md)."""
    import fpo.models.tied as tied

    events = []
    real_mm = torch.Tensor.mm
    monkeypatch.setattr(tied, "release_free_heap", lambda: events.append("trim"))
    monkeypatch.setattr(
        torch.Tensor, "mm", lambda self, other: events.append("mm") or real_mm(self, other)
    )
    torch.manual_seed(0)
    model = build_tiny_model().float()
    parts = split_causal_lm(model)
    loss = _tied_loss(parts, torch.randint(3, 40, (3, 9)), parts.tie())
    events.clear()
    loss.backward()
    assert events == ["trim", "mm", "mm"]  # then one mm per held head call
