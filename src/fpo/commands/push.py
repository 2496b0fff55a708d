"""``fpo-push``: publish a run's final policy folder to the Hugging Face hub.

::

    fpo-push logs/smoke/runs/<time> --repo-id me/fpo-smoke [--private] [--revision BRANCH]
             [--commit-message TEXT] [--dry-run]

Uploads ``<run>/policy/`` (weights, tokenizer, model card ``README.md``) with
``huggingface_hub``'s own calls: ``HfApi.create_repo(exist_ok=True)``, ``create_branch`` for
``--revision``, then ``upload_folder``. The card's evaluation block is first brought up to
date with ``<run>/evaluation/summary.json`` (a later ``fpo-eval run_dir=`` may have rewritten
it). ``--dry-run`` prints what would be uploaded and touches no network (no token needed).
Refusals (exit 2): no saved policy in the folder, no token configured, a bad repo id, the
hub refusing the upload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fpo.commands.common import user_errors
from fpo.errors import UserError
from fpo.model_card import CARD_FILE, refresh_card_evaluation

#: One of these marks a folder as a saved policy (``save_pretrained``: whole weights,
#: sharded weights, or PEFT adapters).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
NO_TOKEN = (
    "no Hugging Face token is configured, and uploading needs one with write access: set "
    "HF_TOKEN=<token> in the environment, or log in once with `hf auth login` "
    "(`huggingface-cli login` in older huggingface_hub versions); tokens are made at "
    "https://huggingface.co/settings/tokens."
)


def policy_folder(run_dir: str | Path) -> Path:
    """``<run>/policy/``, or ``run_dir`` itself when it is a policy folder; refused when
    neither holds saved weights."""
    from fpo.policy_io import POLICY_DIR  # imports Lightning: not for --help

    run_dir = Path(run_dir)
    for folder in (run_dir / POLICY_DIR, run_dir):
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            return folder
    raise UserError(
        f"{run_dir}: no saved policy (no {POLICY_DIR}/ folder with {' or '.join(WEIGHT_FILES)}). "
        "Give the folder of an fpo-train run that saved its final policy (save_policy=true, "
        "or auto with an evaluation block)."
    )


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """``(path relative to folder, size in bytes)`` of every file, sorted."""
    return sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in folder.rglob("*")
        if path.is_file()
    )


def describe(folder: Path, args: argparse.Namespace) -> str:
    """The upload plan: destination and files."""
    visibility = "private" if args.private else "public"
    lines = [
        f"upload {folder} to model repository {args.repo_id} ({visibility}, branch "
        f"{args.revision or 'main'}): https://huggingface.co/{args.repo_id}"
    ]
    lines += [f"  {name}  ({size:,} bytes)" for name, size in folder_files(folder)]
    return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    """Refuse what the hub would refuse as a model repository id (checked locally)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = "/" in repo_id
    except HFValidationError:
        valid = False
    if not valid:
        raise UserError(
            f"--repo-id {repo_id!r} is not a hub repository id: give it as <user or "
            "organisation>/<name> (letters, digits, '-', '_' and '.')."
        )


def hub_token() -> str:
    """The token huggingface_hub would use (``HF_TOKEN``, then the stored login)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(NO_TOKEN)
    return token


def upload(folder: Path, args: argparse.Namespace, token: str) -> str:
    """Create the repo (and branch), upload ``folder``; returns the commit URL. Hub errors
    are mapped to one-paragraph `UserError`s."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
        if args.revision:
            api.create_branch(args.repo_id, branch=args.revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except LocalTokenNotFoundError:
        raise UserError(NO_TOKEN) from None
    except OfflineModeIsEnabled:
        raise UserError(
            "HF_HUB_OFFLINE is set, so huggingface_hub makes no requests: unset it to upload."
        ) from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise UserError(
                f"the hub refused the token for {args.repo_id} (HTTP {status}): it is invalid "
                "or has no write access to that namespace. Set HF_TOKEN to a write token, or "
                "log in again with `hf auth login`."
            ) from None
        raise UserError(f"the hub refused the upload to {args.repo_id}: {error}") from None
    return str(getattr(commit, "commit_url", commit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fpo-push",
        description="Upload a run's final policy folder (weights, tokenizer, model card) "
        "to the Hugging Face hub.",
    )
    parser.add_argument("run_dir", help="an fpo-train run folder (or its policy/ folder)")
    parser.add_argument("--repo-id", required=True, help="<user or organisation>/<name>")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to upload to (created when missing)")
    parser.add_argument("--commit-message", default="Upload policy trained with fpo-template")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be uploaded, upload nothing"
    )
    return parser.parse_args(argv)


def push(args: argparse.Namespace) -> str | None:
    """The command; returns the commit URL (``None`` for a dry run)."""
    folder = policy_folder(args.run_dir)
    check_repo_id(args.repo_id)
    if args.dry_run:
        print(describe(folder, args))
        print("dry run: nothing uploaded.", flush=True)
        return None
    token = hub_token()
    refresh_card_evaluation(folder)
    if not (folder / CARD_FILE).is_file():
        print(f"note: {folder} has no model card ({CARD_FILE}); uploading without one.")
    print(describe(folder, args), flush=True)
    url = upload(folder, args, token)
    print(f"uploaded: {url}")
    return url


def main(argv: list[str] | None = None) -> None:
    """``fpo-push``: user errors as one paragraph, exit status 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        push(args)


if __name__ == "__main__":
    main()
