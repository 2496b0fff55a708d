"""Seeds reach the SAE trainer behind ``fpo-make-sae --seed``: same seed, same SAE."""

from __future__ import annotations

import torch

from fpo.sae_maker import train_sae


def test_sae_training_is_seeded():
    acts = torch.randn(600, 16, generator=torch.Generator().manual_seed(0))
    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}

    def weights(seed: int, noise: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(noise)  # the global RNG must not matter
        kwargs = {"d_sae": 32, "k": 4, "epochs": 2, "lr": 3e-3, "batch_size": 64}
        return train_sae(acts, seed=seed, metadata=meta, **kwargs).state_dict()

    first, again, other = weights(0, 1), weights(0, 2), weights(1, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
