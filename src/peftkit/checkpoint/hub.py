"""Uploading an adapter folder to the Hugging Face hub (`PeftModel.push_to_hub`).

The folder is what `save_pretrained` writes (config, weights, model card), written to a temporary
directory and uploaded in one commit with `huggingface_hub.HfApi`. A model card already in the repo
keeps its text; peft's metadata and the given `tags` are set on it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, Optional, Union

from ..utils.commits import AREA
from .model_card import README_NAME, _as_list


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def push_adapter_folder(
    save: Callable[[str], None],
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
) -> Any:
    """`save(folder)` into a temporary folder, then upload it to `repo_id` (created if missing); the commit info."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import OfflineModeIsEnabled

    from .. import __version__

    if _offline():
        raise OfflineModeIsEnabled(
            f"push_to_hub({repo_id!r}) needs the network, but HF_HUB_OFFLINE is set; unset it to upload, "
            "or save locally with save_pretrained(folder)."
        )
    api = HfApi(library_name="peftkit", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        remote_card = _remote_card(api, repo_id, token=token, revision=revision)
        if remote_card is not None and not os.path.exists(os.path.join(folder, README_NAME)):
            with open(os.path.join(folder, README_NAME), "w", encoding="utf-8") as handle:
                handle.write(remote_card)  # save_pretrained updates it: remote text kept, metadata set
        save(folder)
        path = os.path.join(folder, README_NAME)
        if tags and os.path.isfile(path):
            card = ModelCard.load(path)
            card.data["tags"] = sorted(set(_as_list(card.data.get("tags"))) | set(tags))
            card.save(path)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=[f"{AREA}/*", f"*/{AREA}/*"],  # peftkit's lock/journal areas: not adapter files
        )


def _remote_card(api: Any, repo_id: str, token: Any, revision: Optional[str]) -> Optional[str]:
    """The repo's `README.md` text, or None when it has none (a new repo)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, README_NAME, token=token, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):  # no card yet (a new repo)
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()
