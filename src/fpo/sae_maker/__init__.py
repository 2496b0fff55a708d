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
"""

from fpo.sae_maker.activations import collect_activations, hook_name_for_layer
from fpo.sae_maker.io import render_card, save_sae
from fpo.sae_maker.trainer import evaluate_sae, train_sae

__all__ = [
    "collect_activations",
    "evaluate_sae",
    "hook_name_for_layer",
    "render_card",
    "save_sae",
    "train_sae",
]
