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
