"""Lightning strategies for the sharded trainer configs (``trainer=fsdp``,
``trainer=deepspeed_zero2``, ``trainer=deepspeed_zero3``).

Both keep fp32 master weights under ``precision: bf16-mixed`` (FSDP: MixedPrecision over
fp32 sharded parameters; DeepSpeed: fp32 partitions in its bf16 optimizer). Activation
checkpointing is the model's own (``model.gradient_checkpointing``), so it is the same
under every strategy.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

from torch import nn

from fpo.errors import UserError


def is_decoder_layer(module: nn.Module) -> bool:
    """A transformer block of any Hugging Face decoder (``Gemma2DecoderLayer``, ...)."""
    return type(module).__name__.endswith("DecoderLayer")


def fsdp(
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    **kwargs,
):
    """``FSDPStrategy`` wrapping each decoder layer in its own FSDP unit.

    ``use_orig_params`` because one unit can mix trainable and frozen parameters (frozen
    embeddings, the frozen SAE and reference in the root unit).
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return FSDPStrategy(
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=is_decoder_layer),
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        **kwargs,
    )


def deepspeed(stage: int = 2, **kwargs):
    """Lightning's ``DeepSpeedStrategy`` at ZeRO ``stage``; a clear error without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"trainer=deepspeed_zero{stage} needs DeepSpeed: `pip install deepspeed` on a machine"
            " with CUDA (or use trainer=fsdp, which needs nothing more)."
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, **kwargs)


def gathered_parameters(module: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which `module`'s parameters are whole.

    DeepSpeed ZeRO-3 partitions every parameter of the model it wraps and gathers one only
    inside a forward; code that reads parameters outside one (the SAE's ``encode`` in the
    start-up report) must gather them first. A no-op for parameters ZeRO-3 does not manage.
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)
