"""What an export reads, when the checkpoint (or the tower) is named by a Hugging Face repo id (convllava_edge/hub.py).

Only the files the export reads come down: the configs, the tokenizer, the weights (safetensors where the repo has
them, else the .bin shards) and the model card (its license). The checkpoint's config.json comes first, alone: a
repo that is not a checkpoint of a family this exports costs one small file. Without ``--vision-tower`` the tower is
the repo config.json's ``mm_vision_tower`` names (a repo id in the released configs, as the official code loads
it). A local checkpoint folder is read as it is and nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..hub import HubError, Resolved, download, fetch_file, is_repo_spec, parse_spec

CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.model", "README.md")  # configs, index, tokenizer, shards, card
TOWER_FILES = ("*.json", "*.safetensors")
BIN_SHARDS = ("*.bin",)  # only where the repo has no safetensors


@dataclass(frozen=True)
class Sources:
    checkpoint: Path
    vision_tower: Path | None
    name: str | None = None  # the bundle's name (a repo's name part); None: the checkpoint folder's
    hub: tuple[dict, ...] = field(default=())  # each repo resolved: role, repo, revision, commit (the manifest's)
    card_license: str | None = None  # the checkpoint's model card's license, when it states one

    @property
    def base_model(self) -> str | None:
        return next((h["repo"] for h in self.hub if h["role"] == "checkpoint"), None)


def resolve_sources(checkpoint: str | Path, vision_tower: str | Path | None) -> Sources:
    """The folders to export from: local ones as they are, repo ids through the hub cache."""
    records: list[dict] = []
    tower = _tower(vision_tower, records) if vision_tower is not None else None
    if not is_repo_spec(checkpoint):
        return Sources(Path(checkpoint), tower, hub=tuple(records))
    from .config import read_json
    from .families import export_family_for

    head = fetch_file(str(checkpoint), "config.json")
    try:
        export_family_for(head.path)
    except CheckpointError as e:
        raise HubError(f"{head.repo}: not a checkpoint this exports ({str(e).split(': ', 1)[-1]})") from None
    got = _weights(str(checkpoint), CHECKPOINT_FILES)
    records.insert(0, got.to_dict("checkpoint"))
    if tower is None:
        named = read_json(got.path / "config.json").get("mm_vision_tower")
        if isinstance(named, str) and parse_spec(named) is not None and not Path(named).exists():
            tower = _tower(named, records)
    return Sources(got.path, tower, got.name, tuple(records), _license(got.path))


def _tower(spec: str | Path, records: list[dict]) -> Path:
    if not is_repo_spec(spec):
        return Path(spec)
    got = _weights(str(spec), TOWER_FILES)
    records.append(got.to_dict("vision_tower"))
    return got.path


def _weights(spec: str, patterns: tuple[str, ...]) -> Resolved:
    """The repo's files matching ``patterns``; the .bin shards too where it has no safetensors."""
    got = download(spec, patterns)
    if not any(got.path.glob("*.safetensors")):
        got = download(spec, patterns + BIN_SHARDS)
    if not any(got.path.glob("*.safetensors")) and not any(got.path.glob("*.bin")):
        raise HubError(f"{got.repo}: no weights (*.safetensors or *.bin) in the repository")
    return got


def _license(folder: Path) -> str | None:
    """The license the checkpoint's model card states in its front matter, if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(card).data.license
    except (ValueError, OSError):  # a card without (valid) front matter states no license
        return None
    return value if isinstance(value, str) and value else None
