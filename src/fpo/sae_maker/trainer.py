"""Train a TopK or JumpReLU SAE on a cached activation tensor with sae-lens's `SAETrainer`.

The activations are collected once (`fpo.sae_maker.activations`), so training can run
several epochs over them: the optimizer loop, TopK auxiliary loss (dead latents), decoder
norm handling and learning-rate schedule are all sae-lens's. What this module adds:

- ``b_dec`` starts at the mean activation (without it, on gemma-3-270m layer 17: variance
  explained 0.44 and 96% dead features);
- sae-lens's ``expected_average_only_in`` normalisation with the scaling factor computed
  once from the whole tensor, ``s = sqrt(d_in) / mean_n |x_n|`` (gemma-3's residual norms
  are ~3.5e4; scaled, biases and weights live on the scale Adam's step size suits); sae-lens
  folds ``s`` back into the weights at the end, so the saved SAE takes raw activations;
- a seeded, epoch-wise shuffled data provider over the tensor;
- the conversion of the trained SAE to its inference class with unit-norm decoder rows
  (decoder norms folded into the encoder, and a JumpReLU's thresholds, as
  `save_inference_model` / `fold_W_dec_norm` do), so both architectures' features are in
  the same units;
- JumpReLU (``architecture="jumprelu"``): sae-lens's Gemma Scope 2 recipe, the quadratic
  L0 penalty ``2 / k * (L0 - k)^2`` around a target ``L0 = k`` with learned per-latent
  thresholds (straight-through estimator, gradient to the thresholds only);
- `evaluate_sae`: variance explained, L0 and dead fraction on any activation sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_class
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from fpo.errors import UserError
from fpo.sae import reconstruction_report
from fpo.sae_maker import ARCHITECTURES

# JumpReLU: initial threshold in the normalised units training sees (|s * x| ~ sqrt(d_in)).
# sae-lens's 0.01 is far too low for gemma-3-270m layer 17 (L0 still ~1,400 of 2,048 after
# 78 steps at lr 1e-3), 0.5 is above the initial pre-activations (every latent dead at once).
JUMPRELU_INIT_THRESHOLD = 0.1


def epoch_batches(
    activations: torch.Tensor, batch_size: int, epochs: int, seed: int
) -> Iterator[torch.Tensor]:
    """`epochs` passes over `activations` ``[N, d]`` in seeded random order, full batches only.

    Each epoch is a fresh permutation; its last ``N mod batch_size`` rows are dropped (they
    differ from epoch to epoch), so every batch is ``[batch_size, d]``.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = activations.shape[0] // batch_size
    for _ in range(epochs):
        order = torch.randperm(activations.shape[0], generator=generator)
        for step in range(steps):
            yield activations[order[step * batch_size : (step + 1) * batch_size]]


def to_inference_sae(training_sae: TrainingSAE) -> SAE:
    """The inference SAE (`TopKSAE` / `JumpReLUSAE`) equivalent of a trained training SAE.

    Its decoder rows have unit norm, the norms folded into the encoder:
    ``W_enc[:, i] *= |W_dec[i]|``, ``b_enc[i] *= |W_dec[i]|``, ``W_dec[i] /= |W_dec[i]|``
    (TopK: sae-lens's `save_inference_model` processing; JumpReLU: `fold_W_dec_norm`, which
    scales ``threshold[i]`` by the same factor, so the same latents fire).
    """
    state_dict = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state_dict)
    sae_cls, cfg_cls = get_sae_class(training_sae.cfg.architecture())
    sae = sae_cls(cfg_cls.from_dict(training_sae.cfg.get_inference_sae_cfg_dict()))
    sae.load_state_dict(state_dict)
    if training_sae.cfg.architecture() == "jumprelu":
        sae.fold_W_dec_norm()
    return sae.eval()


def _training_sae(architecture: str, k: int, **common: Any) -> TrainingSAE:
    """A fresh sae-lens training SAE; `k` is TopK's k or JumpReLU's target L0."""
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if architecture == "jumprelu":
        cfg = JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=float(k),
            jumprelu_init_threshold=JUMPRELU_INIT_THRESHOLD,
            **common,
        )
        return JumpReLUTrainingSAE(cfg)
    raise UserError(f"--architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def train_sae(
    activations: torch.Tensor,
    d_sae: int,
    k: int,
    epochs: int = 1,
    lr: float = 3e-4,
    batch_size: int = 4096,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    dead_window_tokens: int = 100_000,
    decay_fraction: float = 0.2,
    normalize: bool = True,
    autocast: bool = False,
    architecture: str = "topk",
) -> SAE:
    """Train a TopK or JumpReLU SAE (``d_in = activations.shape[1]``) with `SAETrainer`.

    `k`: active latents per token (TopK) or the target mean L0 (JumpReLU, see the module
    docstring); the TopK auxiliary loss and the dead-latent window apply to TopK only.

    Schedule: constant `lr` then a linear decay to 0 over the last `decay_fraction` of the
    ``epochs * (N // batch_size)`` steps. A latent counts as dead (and gets the TopK
    auxiliary loss) after ``dead_window_tokens`` tokens without firing.
    `metadata` (hook name, model name, ...) goes into the SAE's sae-lens metadata.
    With `normalize`, training sees ``s * x`` (see the module docstring). `autocast` runs the
    SAE's matmuls in bfloat16 (sae-lens's ``autocast``; fast on CPUs with AMX / AVX512-BF16),
    the parameters and optimizer state stay float32.
    Returns the inference SAE, in eval mode, on the CPU.
    """
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise UserError(f"activations must be a non-empty [N, d] tensor, got {activations.shape}")
    if not 0 < k <= d_sae:
        raise UserError(f"--k must be in 1..d_sae={d_sae}, got {k}")
    activations = activations.float()
    batch_size = min(batch_size, activations.shape[0])
    steps = epochs * (activations.shape[0] // batch_size)
    if steps < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    training_sae = _training_sae(
        architecture,
        k,
        d_in=activations.shape[1],
        d_sae=d_sae,
        dtype="float32",
        device="cpu",
        normalize_activations="expected_average_only_in" if normalize else "none",
        metadata=SAEMetadata(**(metadata or {})),
    )
    scale = math.sqrt(activations.shape[1]) / activations.norm(dim=1).mean().item()
    with torch.no_grad():
        training_sae.b_dec.copy_(activations.mean(dim=0) * (scale if normalize else 1.0))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_decay_steps=int(decay_fraction * steps),
        device="cpu",
        autocast=autocast,
        dead_feature_window=max(1, math.ceil(dead_window_tokens / batch_size)),
        feature_sampling_window=max(1, math.ceil(dead_window_tokens / batch_size)),
    )
    data = epoch_batches(activations, batch_size, epochs, seed)
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=data)
    if normalize:  # set, so sae-lens does not estimate it from (and consume) training batches
        trainer.activation_scaler.scaling_factor = scale
    trained = trainer.fit()
    return to_inference_sae(trained)


def evaluate_sae(sae: SAE, activations: torch.Tensor) -> dict[str, float]:
    """Reconstruction quality of `sae` on `activations` ``[N, d]``: `fpo.sae.reconstruction_report`.

    ``variance_explained = 1 - sum_n |x_n - xhat_n|^2 / sum_n |x_n - mean(x)|^2`` over the
    whole sample (sae-lens's ``metrics/explained_variance``), ``l0`` (mean active latents per
    token), ``dead_fraction`` (latents that never fire on the sample), ``mse`` (per element),
    plus ``n_tokens = N``.
    """
    sae.eval()
    return {**reconstruction_report(sae, activations.float()), "n_tokens": float(len(activations))}
