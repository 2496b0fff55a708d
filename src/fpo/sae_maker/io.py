"""Write a trained SAE in sae-lens's disk format, with a human-readable card beside it.

Folder layout (loadable with ``sae_lens.SAE.load_from_disk(folder)``):
``cfg.json`` + ``sae_weights.safetensors`` (sae-lens's own `save_model`) and ``SAE_CARD.md``.
With ``storage_dtype="float16"`` the weights file holds fp16 tensors while ``cfg.json``
keeps ``dtype: float32``: sae-lens's disk loader casts every tensor to the config dtype, so
the SAE loads back in fp32 (half the bytes on disk; relative weight error <= 2^-11).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from fpo.errors import UserError

WEIGHTS_FILE = "sae_weights.safetensors"
CARD_FILE = "SAE_CARD.md"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def render_card(card: dict[str, Any]) -> str:
    """Markdown card: a title, an optional description, a field table and the command.

    Recognised keys: ``title``, ``description``, ``command`` (rendered as a code block);
    every other key becomes a table row (floats with 4 significant digits).
    """
    special = {"title", "description", "command"}
    lines = [f"# {card.get('title', 'Sparse autoencoder')}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += ["| field | value |", "|---|---|"]
    for key, value in card.items():
        if key not in special:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    if card.get("command"):
        lines += ["", "Remake it with:", "", "```bash", str(card["command"]), "```"]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def round_to_storage(sae: SAE, storage_dtype: str) -> SAE:
    """Round `sae`'s parameters (in place) to what `save_sae` stores and the loader returns.

    ``p <- float32(storage_dtype(p))``: evaluating after this measures the shipped weights.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {sorted(STORAGE_DTYPES)}")
    for param in sae.parameters():
        param.copy_(param.to(STORAGE_DTYPES[storage_dtype]).to(param.dtype))
    return sae


def save_sae(
    sae: SAE, folder: str | Path, card: dict[str, Any], storage_dtype: str = "float32"
) -> Path:
    """Save `sae` to `folder` (created) in sae-lens format plus ``SAE_CARD.md``; returns it.

    The SAE's metadata must name its hook (``sae.cfg.metadata.hook_name``), since the
    policy hook is resolved from it.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {sorted(STORAGE_DTYPES)}")
    if not sae.cfg.metadata.hook_name:
        raise UserError("the SAE has no metadata.hook_name; pass it to train_sae(metadata=...)")
    folder = Path(folder)
    weights_path, _ = sae.save_model(folder)
    if STORAGE_DTYPES[storage_dtype] != torch.float32:
        dtype = STORAGE_DTYPES[storage_dtype]
        save_file({k: v.to(dtype) for k, v in load_file(weights_path).items()}, weights_path)
    (folder / CARD_FILE).write_text(render_card(card), encoding="utf-8")
    return folder


def folder_size_bytes(folder: str | Path) -> int:
    """Total size of the files directly in `folder`."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
