"""Train the embedded default's SAE with sae-lens's own trainer (DESIGN section 8).

Pipeline, each step a function so tests can run it end to end on a tiny model:

- `collect_activations(model, tokenizer, texts, hook_layer, max_tokens, seq_len,
  exclude_bos=True) -> Tensor[N, d]`: layer output, forward stopped after that layer;
- `train_sae(activations, d_sae, k, epochs, lr, batch_size, seed, architecture) -> SAE`:
  sae-lens `SAETrainer` over the cached tensor (TopK, or JumpReLU with target L0 ``k``),
  ``b_dec`` initialised to the mean;
- `evaluate_sae(sae, activations) -> dict`: variance explained, L0, dead fraction;
- `save_sae(sae, folder, card)`: sae-lens disk format plus ``SAE_CARD.md``.

The command that builds the shipped SAE (and its offline corpus) is an asset-building
script, ``scripts/train_sae.py`` (with ``scripts/sae_corpus.py``), not part of the package.
"""

from fpo.sae_training.activations import collect_activations, hook_name_for_layer
from fpo.sae_training.io import render_card, save_sae
from fpo.sae_training.trainer import evaluate_sae, train_sae

__all__ = [
    "collect_activations",
    "evaluate_sae",
    "hook_name_for_layer",
    "render_card",
    "save_sae",
    "train_sae",
]
