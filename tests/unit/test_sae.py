"""fpo.sae: SAE loading, hook resolution and capture, d_in check, quality report."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

from fpo.errors import UserError
from fpo.logprobs import segment_mean
from fpo.sae import (
    ActivationCapture,
    build_random_sae,
    check_sae_fits_model,
    load_sae,
    reconstruction_report,
    resolve_hook_module,
    sae_hook_name,
)

HIDDEN = 32  # tiny_model's hidden size
ARCHITECTURES = ["topk", "standard", "jumprelu"]


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 261, (2, 7), generator=generator)


def _identity_sae(decoder_scale: float = 1.0):
    """A standard SAE with d_in 4, d_sae 8: c = [relu(x), relu(-x)], x_hat = scale * x."""
    sae = build_random_sae(4, 8, architecture="standard")
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(decoder_scale * torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------------- hook resolution


def test_resid_post_of_layer0_is_hidden_states_1(tiny_model, input_ids):
    tiny_model.eval()
    module = resolve_hook_module(tiny_model, "blocks.0.hook_resid_post")
    assert module is tiny_model.model.layers[0]
    with ActivationCapture(module) as capture:
        out = tiny_model(input_ids, output_hidden_states=True)
        captured = capture.activation
    assert captured.shape == (2, 7, HIDDEN)
    assert torch.equal(captured, out.hidden_states[1])


def test_resid_post_of_last_layer_is_before_final_norm(tiny_model, input_ids):
    tiny_model.eval()
    last = tiny_model.model.layers[1]
    layer_out = {}
    handle = last.register_forward_hook(lambda _m, _i, o: layer_out.setdefault("h", o))
    with ActivationCapture(resolve_hook_module(tiny_model, "blocks.1.hook_resid_post")) as cap:
        out = tiny_model(input_ids, output_hidden_states=True)
        captured = cap.activation
    handle.remove()
    assert torch.equal(captured, layer_out["h"])
    # transformers 5: hidden_states[-1] is the final-normed last_hidden_state, not the SAE input
    assert len(out.hidden_states) == 3
    assert not torch.allclose(captured, out.hidden_states[-1])
    assert torch.allclose(out.hidden_states[-1], tiny_model.model.norm(captured))


def test_hf_module_names_resolve(tiny_model):
    layer = tiny_model.model.layers[1]
    assert resolve_hook_module(tiny_model, "model.layers.1") is layer
    assert resolve_hook_module(tiny_model, "blocks.1.hook_resid_post") is layer
    assert resolve_hook_module(tiny_model, "model.norm") is tiny_model.model.norm


def test_multimodal_gemma3_resolves_language_model_layers(tiny_model):
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=tiny_model.config.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config)
    layer = model.model.language_model.layers[1]
    assert resolve_hook_module(model, "blocks.1.hook_resid_post") is layer
    assert resolve_hook_module(model, "model.layers.1") is layer
    check_sae_fits_model(build_random_sae(HIDDEN, 16), model)
    with pytest.raises(UserError, match="16"):
        check_sae_fits_model(build_random_sae(16, 16), model)


@pytest.mark.parametrize(
    ("hook_name", "expected"),
    [
        ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"),
        ("blocks.0.attn.hook_z", "blocks.0.attn.hook_z"),
        ("hook_embed", "hook_embed"),
        ("blocks.2.hook_resid_post", "has 2 layers"),
        ("model.layers.7", "has 2 layers"),
        ("model.no_such_module", "model.no_such_module"),
        ("", "Unsupported SAE hook"),
    ],
)
def test_bad_hook_names_raise(tiny_model, hook_name, expected):
    with pytest.raises(UserError, match=expected) as info:
        resolve_hook_module(tiny_model, hook_name)
    assert repr(hook_name) in str(info.value)


# ------------------------------------------------------------------------- capture


def test_capture_unwraps_tuple_output_and_releases_references():
    tensor = torch.ones(1, 2, 3, requires_grad=True)

    class TupleModule(torch.nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    module = TupleModule()
    capture = ActivationCapture(module).attach()
    module(tensor)
    assert torch.equal(capture.activation, torch.full((1, 2, 3), 2.0))
    assert capture.activation.requires_grad
    capture.remove()
    assert capture.activation is None
    assert len(module._forward_hooks) == 0
    module(tensor)
    assert capture.activation is None
    with ActivationCapture(module) as capture2, pytest.raises(RuntimeError):
        capture2.attach()
    assert len(module._forward_hooks) == 0


def test_gradients_flow_through_frozen_sae_to_policy(tiny_model, input_ids):
    sae = build_random_sae(HIDDEN, 64, architecture="topk", k=4)
    module = resolve_hook_module(tiny_model, sae_hook_name(sae))
    with ActivationCapture(module) as capture:
        tiny_model(input_ids)
        hidden = capture.activation
    rows = torch.tensor([0, 0, 1, 1, 1])
    cols = torch.tensor([3, 4, 2, 5, 6])
    pooled = segment_mean(sae.encode(hidden[rows, cols]), rows, num_rows=2)  # as fpo.forward
    assert pooled.shape == (2, 64)
    pooled.pow(2).sum().backward()
    assert all(p.grad is None for p in sae.parameters())
    assert not any(p.requires_grad for p in sae.parameters())
    layer0_grads = [p.grad for p in tiny_model.model.layers[0].parameters()]
    assert all(g is not None for g in layer0_grads)
    assert sum(g.abs().sum() for g in layer0_grads) > 0
    assert tiny_model.model.embed_tokens.weight.grad.abs().sum() > 0
    # layer 1 comes after the hook, so it gets no gradient from the SAE features
    assert all(p.grad is None for p in tiny_model.model.layers[1].parameters())


# ------------------------------------------------------------------------- building/loading


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_random_sae_is_seeded_frozen_and_active(architecture):
    sae = build_random_sae(HIDDEN, 64, architecture=architecture, k=5, seed=3)
    same = build_random_sae(HIDDEN, 64, architecture=architecture, k=5, seed=3)
    other = build_random_sae(HIDDEN, 64, architecture=architecture, k=5, seed=4)
    assert torch.equal(sae.W_enc, same.W_enc)
    assert not torch.equal(sae.W_enc, other.W_enc)
    assert not sae.training
    assert not any(p.requires_grad for p in sae.parameters())
    assert sae_hook_name(sae) == "blocks.0.hook_resid_post"
    features = sae.encode(torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(0)))
    active = (features != 0).sum(dim=-1)
    assert (active > 0).all()
    assert (active < 64).all()
    if architecture == "topk":
        assert (active == 5).all()


def test_unknown_random_architecture_raises():
    with pytest.raises(UserError, match="gated"):
        build_random_sae(HIDDEN, 64, architecture="gated")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_sae_loads_with_identical_encodings(tmp_path, architecture):
    sae = build_random_sae(HIDDEN, 48, architecture=architecture, k=6, hook_name="model.layers.1")
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(path=str(tmp_path / "sae"))
    assert type(loaded) is type(sae)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert sae_hook_name(loaded) == "model.layers.1"
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_load_sae_missing_folder_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        load_sae(path=missing)
    with pytest.raises(UserError, match=r"cfg\.json"):
        load_sae(path=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"release": "gemma-scope-2b-pt-res", "sae_id": "x", "path": "/tmp/sae"},
        {"sae_id": "layer_25/width_16k/average_l0_55", "path": "/tmp/sae"},
    ],
)
def test_load_sae_needs_exactly_one_source(kwargs):
    with pytest.raises(UserError, match=r"sae\.loader: release.*path"):
        load_sae(**kwargs)


def test_load_sae_hub_errors_before_any_download():
    with pytest.raises(UserError, match=r"sae\.loader\.sae_id"):
        load_sae(release="gemma-scope-2b-pt-res")
    with pytest.raises(UserError, match="no-such-release"):
        load_sae(release="no-such-release", sae_id="x")
    with pytest.raises(UserError, match="not_an_id"):
        load_sae(release="gemma-scope-2b-pt-res", sae_id="not_an_id")


# ------------------------------------------------------------------------- checks and report


def test_check_sae_fits_model(tiny_model):
    check_sae_fits_model(build_random_sae(HIDDEN, 16), tiny_model)
    with pytest.raises(UserError) as info:
        sae = build_random_sae(24, 16, hook_name="blocks.1.hook_resid_post")
        check_sae_fits_model(sae, tiny_model)
    message = str(info.value)
    assert "d_in=24" in message
    assert "hidden size 32" in message
    assert "blocks.1.hook_resid_post" in message
    assert "random topk (d_in=24, d_sae=16, seed=0)" in message


X = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def test_reconstruction_report_exact_decoder():
    report = reconstruction_report(_identity_sae(), X)
    assert report["variance_explained"] == pytest.approx(1.0)
    assert report["mse"] == pytest.approx(0.0)
    # active features: row 0 -> relu(x) at 0, 3 and relu(-x) at 1 (feature 5); row 1 -> 3
    assert report["l0"] == pytest.approx(2.0)
    assert report["dead_fraction"] == pytest.approx(5 / 8)


def test_reconstruction_report_half_decoder():
    # x_hat = x / 2: SSE = sum(x^2) / 4 = 15 / 4; per-dim means [0.5, -1, 0, 2] give SST = 4.5
    report = reconstruction_report(_identity_sae(decoder_scale=0.5), X)
    assert report["mse"] == pytest.approx(3.75 / 8)
    assert report["variance_explained"] == pytest.approx(1 - 3.75 / 4.5)
    assert report["l0"] == pytest.approx(2.0)


def test_reconstruction_report_constant_input_is_nan():
    report = reconstruction_report(_identity_sae(), torch.ones(3, 4))
    assert math.isnan(report["variance_explained"])
    assert report["l0"] == pytest.approx(4.0)
