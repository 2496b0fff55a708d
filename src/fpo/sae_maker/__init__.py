"""A tool for making SAEs: the command ``fpo-make-sae`` and the library it runs. It trains
the embedded task's SAEs (``assets/sae/``) with sae-lens's own trainer; training with FPO
only loads an SAE folder (`fpo.sae`) and never imports this package.

Pipeline, each step a function so tests can run it end to end on a tiny model:

- `collect_activations(model, tokenizer, texts, hook_layer, max_tokens, seq_len,
  exclude_bos=True) -> Tensor[N, d]`: layer output, forward stopped after that layer;
- `train_sae(activations, d_sae, k, epochs, lr, batch_size, seed, architecture) -> SAE`:
  sae-lens `SAETrainer` over the cached tensor (TopK, or JumpReLU with target L0 ``k``),
  ``b_dec`` initialised to the mean;
- `evaluate_sae(sae, activations) -> dict`: variance explained, L0, dead fraction;
- `save_sae(sae, folder, card)`: sae-lens disk format plus ``SAE_CARD.md``.

The command (`fpo.sae_maker.cli`, ``fpo-make-sae``) builds its offline English corpus from
the preference rows and text already on the machine (`fpo.sae_maker.corpus`), then runs the
pipeline; each shipped SAE's ``SAE_CARD.md`` records the command that made it.

Its names are imported on first use (PEP 562), so ``fpo-make-sae --help`` loads neither
torch nor sae-lens.
"""

from __future__ import annotations

from fpo.lazy import lazy_exports

#: the SAE kinds ``fpo-make-sae --architecture`` trains
ARCHITECTURES = ("topk", "jumprelu")
#: name -> the submodule that defines it
EXPORTS = {
    "collect_activations": "activations",
    "evaluate_sae": "trainer",
    "hook_name_for_layer": "activations",
    "render_card": "io",
    "save_sae": "io",
    "train_sae": "trainer",
}
__all__ = ["ARCHITECTURES", *sorted(EXPORTS)]

__getattr__ = lazy_exports(__name__, EXPORTS)
