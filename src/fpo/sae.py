"""Sparse autoencoders (sae-lens) and the policy activation they read.

FPO compares the policy's and the reference's sparse features at one layer. This module
loads the SAE through sae-lens (any architecture: JumpReLU, TopK, standard), freezes it,
finds the policy module whose output the SAE was trained on, captures that output during the
policy forward (keeping the autograd graph, so the FPO penalty trains the policy), checks the
SAE fits the model, and reports how well the SAE reconstructs the captured activations.

Hook points (sae-lens / TransformerLens names, see :data:`SAE_SITES`):

- ``blocks.{L}.hook_resid_post``: the residual stream after decoder layer L, *before* the
  final norm. In a Hugging Face CausalLM that is the output of ``model.model.layers[L]``
  (``hidden_states[L + 1]`` for L < last; the model's ``hidden_states[-1]`` is after the final
  norm and is *not* the SAE's input).
- ``blocks.{L}.hook_mlp_out``: what layer L's MLP adds to the residual stream. For Gemma 2/3
  (sandwich norms) that is the output of ``layers[L].post_feedforward_layernorm``, i.e.
  ``post_ff_norm(mlp(pre_ff_norm(resid_mid)))``, as TransformerLens's ``ln2_post`` then
  ``hook_mlp_out``; for a model without a post-MLP norm (Llama-style) it is ``layers[L].mlp``.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fpo.errors import UserError
from fpo.hook_sites import SAE_SITES  # blocks.{L}.hook_{site}

if TYPE_CHECKING:  # sae-lens (and TransformerLens, ~80 MB) load only where an SAE is built
    from sae_lens import SAE

__all__ = [
    "RANDOM_SAE_ARCHITECTURES",
    "SAE_SITES",
    "ActivationCapture",
    "build_random_sae",
    "check_sae_fits_model",
    "describe_sae",
    "load_sae",
    "match_sae_dtype",
    "model_hidden_size",
    "reconstruction_report",
    "resolve_hook_module",
    "sae_hook_name",
]

RANDOM_SAE_ARCHITECTURES = ("topk", "standard", "jumprelu")
# Threshold of randomly built JumpReLU SAEs: a random encoder's pre-activations have a std of
# about sqrt(2) * |x| / sqrt(d_in), so a small positive threshold keeps many features active
# while still exercising the jump.
_RANDOM_JUMPRELU_THRESHOLD = 0.05

_SITE_HOOK = re.compile(rf"^blocks\.(\d+)\.hook_({'|'.join(SAE_SITES)})$")
# The norm Gemma 2/3 apply to the MLP output before adding it to the residual stream.
_POST_MLP_NORM = "post_feedforward_layernorm"
_TRANSFORMER_LENS_NAME = re.compile(r"^(blocks\.|hook_)")
_HF_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)$")
_SUPPORTED_HOOKS = (
    "supported: 'blocks.{L}.hook_resid_post' (the output of decoder layer L, before the final "
    "norm), 'blocks.{L}.hook_mlp_out' (what layer L's MLP adds to the residual stream) or a "
    "Hugging Face module name such as 'model.layers.{L}'"
)
_SOURCE_ATTR = "_fpo_source"


# ----------------------------------------------------------------------------- loading


def _freeze(sae: SAE, source: str) -> SAE:
    """Eval mode, no parameter trains; gradients still flow through `encode` to its input."""
    sae.eval()
    for parameter in sae.parameters():
        parameter.requires_grad_(False)
    setattr(sae, _SOURCE_ATTR, source)
    return sae


def load_sae(
    release: str | None = None,
    sae_id: str | None = None,
    path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    hook_name: str | None = None,
) -> SAE:
    """Load a frozen sae-lens SAE from the hub (`release` + `sae_id`) or a local folder (`path`).

    Hub example (Gemma Scope, the paper's setting): ``release="gemma-scope-2b-pt-res"``,
    ``sae_id="layer_25/width_16k/average_l0_55"``. A local folder is one written by sae-lens's
    ``SAE.save_model`` (``cfg.json`` + ``sae_weights.safetensors``). ``hook_name`` (config key
    ``sae.loader.hook_name``) replaces the hook in the SAE's metadata, for an SAE whose metadata
    lacks it or names it differently; :func:`sae_hook_name` then reads it like any other.

    Raises:
        UserError: not exactly one source given, missing folder, or unknown release/id.
    """
    keys = "sae.loader: release + sae_id (a sae-lens hub release) or path (a local folder)"
    hub = release is not None or sae_id is not None
    if hub and path is not None:
        raise UserError(
            f"SAE source is ambiguous: give either {keys}, not both "
            f"(got release={release!r}, sae_id={sae_id!r}, path={path!r})."
        )
    if not hub and path is None:
        raise UserError(f"No SAE source given: set {keys}.")
    if path is not None:
        return _with_hook(
            _freeze(_load_from_folder(path, device, dtype), f"path={path}"), hook_name
        )
    if release is None or sae_id is None:
        raise UserError(
            f"A hub SAE needs both sae.loader.release and sae.loader.sae_id "
            f"(got sae.loader.release={release!r}, sae.loader.sae_id={sae_id!r})."
        )
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except ValueError as error:  # sae-lens: unknown release or id (checked before any download)
        raise UserError(
            f"Cannot load SAE sae.loader.release={release!r}, sae.loader.sae_id={sae_id!r}: {error}"
        ) from error
    return _with_hook(_freeze(sae, f"release={release}, sae_id={sae_id}"), hook_name)


def _with_hook(sae: SAE, hook_name: str | None) -> SAE:
    if hook_name:
        sae.cfg.metadata.hook_name = hook_name
    return sae


def _load_from_folder(path: str, device: str, dtype: str) -> SAE:
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"SAE folder not found: sae.loader.path={path!r} does not exist.")
    if not (folder / SAE_CFG_FILENAME).is_file():
        raise UserError(
            f"sae.loader.path={path!r} is not a sae-lens SAE folder: it has no {SAE_CFG_FILENAME} "
            f"(write one with SAE.save_model)."
        )
    try:
        return SAE.load_from_disk(folder, device=device, dtype=dtype)
    except Exception as err:  # truncated or unreadable weights, a bad cfg.json
        raise UserError(
            f"sae.loader.path={path!r}: could not load the SAE ({type(err).__name__}: {err}); its "
            "files are truncated, unreadable or not written by sae-lens's SAE.save_model."
        ) from err


def build_random_sae(
    d_in: int | None = None,
    d_sae: int = 128,
    architecture: str = "topk",
    k: int = 8,
    hook_name: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    model: nn.Module | None = None,
) -> SAE:
    """A seeded, randomly initialised, frozen sae-lens SAE (for tests and smoke runs).

    Uses sae-lens's own initialisation (decoder Kaiming-uniform, encoder = decoder^T, zero
    biases); `k` applies to ``topk`` only; a ``jumprelu`` SAE gets a small positive threshold
    so that its encoding of a random input has both active and inactive features.
    Given ``model``, ``d_in`` defaults to its hidden size and ``hook_name`` to the output of its
    last decoder layer (``blocks.{L-1}.hook_resid_post``); without it, to layer 0.
    """
    if model is not None:
        d_in = d_in or model_hidden_size(model)
        hook_name = hook_name or f"blocks.{len(_decoder_layers(model)) - 1}.hook_resid_post"
    if d_in is None:
        raise UserError("build_random_sae needs d_in, or the model to read it from.")
    hook_name = hook_name or "blocks.0.hook_resid_post"
    if architecture not in RANDOM_SAE_ARCHITECTURES:
        raise UserError(
            f"Unknown SAE architecture {architecture!r}; choose one of {RANDOM_SAE_ARCHITECTURES}."
        )
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_class(architecture)
    extra: dict[str, Any] = {"k": k} if architecture == "topk" else {}
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        device="cpu",
        metadata=SAEMetadata(hook_name=hook_name, model_name="random"),
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = sae_cls(cfg)
    if architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(_RANDOM_JUMPRELU_THRESHOLD)
    return _freeze(sae, f"random {architecture} (d_in={d_in}, d_sae={d_sae}, seed={seed})")


def match_sae_dtype(sae: SAE) -> SAE:
    """Make ``sae.dtype`` (the dtype sae-lens casts every input to) that of its parameters.

    Only sae-lens's own ``SAE.to`` updates it; a strategy that casts the module in place
    (DeepSpeed's bf16 mode calls ``module.bfloat16()``, the SAE included) leaves it stale, and
    ``encode`` then multiplies float32 inputs with bfloat16 weights.
    """
    sae.dtype = next(sae.parameters()).dtype
    return sae


def describe_sae(sae: SAE) -> str:
    """Where the SAE came from (hub release/id, folder, or random), for messages."""
    return getattr(sae, _SOURCE_ATTR, None) or f"{sae.cfg.architecture()} SAE"


def sae_hook_name(sae: SAE) -> str:
    """The hook the SAE was trained on: `cfg.metadata.hook_name` (sae-lens 6 metadata)."""
    hook_name = sae.cfg.metadata.hook_name
    if not hook_name:
        raise UserError(
            f"The SAE ({describe_sae(sae)}) has no metadata.hook_name in its config; "
            f"name the hook explicitly ({_SUPPORTED_HOOKS})."
        )
    return str(hook_name)


# ----------------------------------------------------------------------------- hook point


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list (``model.model.layers`` for Gemma/Llama CausalLMs; the language
    model's layers for Gemma3ForConditionalGeneration), found through ``get_decoder()``."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(
            f"Cannot find the decoder layers of {type(model).__name__}; "
            f"give the hook as a module name that model.get_submodule accepts."
        )
    return layers


def _layer(model: nn.Module, hook_name: str, index: int) -> nn.Module:
    layers = _decoder_layers(model)
    if index >= len(layers):
        raise UserError(
            f"SAE hook {hook_name!r} needs decoder layer {index}, but "
            f"{type(model).__name__} has {len(layers)} layers (0..{len(layers) - 1})."
        )
    return layers[index]


def _mlp_out_module(layer: nn.Module, hook_name: str) -> nn.Module:
    """The module whose output is the MLP's contribution to the residual stream."""
    post_norm = getattr(layer, _POST_MLP_NORM, None)
    if isinstance(post_norm, nn.Module):
        return post_norm
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise UserError(
            f"SAE hook {hook_name!r}: decoder layer {type(layer).__name__} has neither "
            f"{_POST_MLP_NORM} nor mlp; give the hook as a Hugging Face module name."
        )
    return mlp


def resolve_hook_module(model: nn.Module, hook_name: str) -> nn.Module:
    """The module whose forward output is the SAE's input activation.

    ``blocks.{L}.hook_resid_post`` -> decoder layer L; ``blocks.{L}.hook_mlp_out`` -> layer L's
    ``post_feedforward_layernorm`` (Gemma 2/3) or ``mlp`` (no post-MLP norm); an HF module
    name (``model.layers.17``,
    or anything ``model.get_submodule`` accepts) -> that module; ``model.layers.{L}`` /
    ``layers.{L}`` also resolve on wrappers whose layers live elsewhere (multimodal Gemma 3).

    Raises:
        UserError: unsupported TransformerLens hook (e.g. ``hook_resid_pre``, attention hooks),
            layer out of range, or unknown module name.
    """
    site_hook = _SITE_HOOK.match(hook_name)
    if site_hook:
        layer = _layer(model, hook_name, int(site_hook.group(1)))
        return layer if site_hook.group(2) == "resid_post" else _mlp_out_module(layer, hook_name)
    if not hook_name or _TRANSFORMER_LENS_NAME.match(hook_name):
        raise UserError(f"Unsupported SAE hook {hook_name!r}; {_SUPPORTED_HOOKS}.")
    try:
        return model.get_submodule(hook_name)
    except AttributeError as error:
        hf_layer = _HF_LAYER.match(hook_name)
        if hf_layer:
            return _layer(model, hook_name, int(hf_layer.group(1)))
        raise UserError(
            f"SAE hook {hook_name!r} is not a module of {type(model).__name__}; {_SUPPORTED_HOOKS}."
        ) from error


class ActivationCapture:
    """Records a module's forward output, keeping the autograd graph.

    ``activation`` is the module's output ``[N, T, H]`` (element 0 where the module returns a
    tuple), *not* detached, so a loss on it trains the policy. Use as a context manager (or
    ``attach()`` / ``remove()``); leaving it drops the hook and the stored tensor::

        with ActivationCapture(resolve_hook_module(model, sae_hook_name(sae))) as capture:
            out = model(input_ids, attention_mask=mask)
            hidden = capture.activation
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.activation: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _record(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.activation = output[0] if isinstance(output, tuple) else output

    def attach(self) -> ActivationCapture:
        """Register the forward hook (once) and clear any previous activation."""
        if self._handle is not None:
            raise RuntimeError("ActivationCapture is already attached.")
        self.activation = None
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def remove(self) -> None:
        """Remove the hook and drop the stored activation."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.activation = None

    def __enter__(self) -> ActivationCapture:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


# ----------------------------------------------------------------------------- checks


def model_hidden_size(model: nn.Module) -> int:
    """``config.hidden_size`` of the model's text config (the language model of a VLM)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def check_sae_fits_model(sae: SAE, model: nn.Module) -> None:
    """Raise UserError unless the SAE's ``d_in`` equals the model's hidden size."""
    d_in, hidden = int(sae.cfg.d_in), model_hidden_size(model)
    if d_in != hidden:
        hook = sae.cfg.metadata.hook_name or "no hook in metadata"
        raise UserError(
            f"The SAE ({describe_sae(sae)}, hook {hook}) reads activations of size d_in={d_in}, "
            f"but the model {type(model).__name__} has hidden size {hidden}; "
            f"choose an SAE trained on this model."
        )


@torch.no_grad()
def reconstruction_report(sae: SAE, activations: Tensor) -> dict[str, float]:
    """How well the SAE reconstructs `activations` ``[M, d_in]`` (no grad).

    With ``c = encode(x)``, ``x_hat = decode(c)``, sums over all M positions and d_in dims
    and ``mean(x)`` the per-dimension mean over positions:

    - ``variance_explained = 1 - sum((x - x_hat)^2) / sum((x - mean(x))^2)`` (NaN if x is constant)
    - ``l0`` = mean over positions of the number of non-zero features
    - ``dead_fraction`` = fraction of the d_sae features that are zero at every position
    - ``mse = mean((x - x_hat)^2)`` over positions and dims
    """
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise ValueError(f"expected activations [M>0, d_in], got {tuple(activations.shape)}")
    features = sae.encode(activations)
    recon = sae.decode(features).double()
    x = activations.double()
    sse = (x - recon).pow(2).sum()
    sst = (x - x.mean(dim=0)).pow(2).sum()
    active = features != 0
    return {
        "variance_explained": float(1.0 - sse / sst) if sst > 0 else float("nan"),
        "l0": float(active.sum(dim=-1).double().mean()),
        "dead_fraction": float((~active.any(dim=0)).double().mean()),
        "mse": float(sse / x.numel()),
    }
