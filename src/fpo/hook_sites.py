"""The SAE hook sites of a decoder layer, by name: ``blocks.{L}.hook_{site}``.

``resid_post`` is the layer's output (the residual stream, before the final norm);
``mlp_out`` is what layer L's MLP adds to the residual stream. `fpo.sae` finds the module of
each; this module imports no model library, so ``fpo-make-sae --help`` can list them without torch.
"""

from fpo.errors import UserError

SAE_SITES = ("resid_post", "mlp_out")


def hook_name_for_layer(layer: int, site: str = "resid_post") -> str:
    """sae-lens hook name of decoder layer `layer` at `site`: ``blocks.{layer}.hook_{site}``."""
    if site not in SAE_SITES:
        raise UserError(f"unknown SAE hook site {site!r}; choose one of {SAE_SITES}")
    return f"blocks.{layer}.hook_{site}"
