"""Finding and fetching the real Kandinsky 5 weights (diffusers format) with huggingface_hub.

Serving never downloads: it resolves a local folder or a repo already in the Hugging Face cache.
`k5serve weights download` is the one place that fetches, and it is a no-op once the repo is cached.
"""

from __future__ import annotations

from pathlib import Path

T2I_REPO = "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers"
I2I_REPO = "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers"
# The default content-safety classifier: ViT-base fine-tuned for normal/nsfw (Apache-2.0, ~340 MB).
SAFETY_REPO = "Falconsai/nsfw_image_detection"


class WeightsNotFound(Exception):
    pass


def resolve(model: str, cache_dir: str | Path | None = None, marker: str = "model_index.json") -> Path:
    """A local diffusers folder (or, with marker="config.json", a transformers model folder), or a repo id
    already in the Hugging Face cache, as a folder path."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            kind = "diffusers checkpoint" if marker == "model_index.json" else "model folder"
            raise WeightsNotFound(f"{path} is not a {kind} (no {marker})")
        return path
    from huggingface_hub import snapshot_download  # imported when needed: a front-end may never need it
    from huggingface_hub.errors import LocalEntryNotFoundError

    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise WeightsNotFound(f"no such model folder: {model}")
    try:
        return Path(snapshot_download(model, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise WeightsNotFound(
            f"weights for {model} are not downloaded; run `k5serve weights download --model {model}` first"
        ) from None


def download(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch a repo into the Hugging Face cache (with progress bars); offline it returns the cached copy."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir))


def same_component(a: Path, b: Path) -> bool:
    """Whether two checkpoint component folders (e.g. `text_encoder`) hold the same weights.

    In the Hugging Face cache every file is a link to a blob named by its content hash, so comparing
    link targets is exact and free; for plain folders, compare file names, sizes and the small files'
    bytes (a full hash of 16 GB would cost minutes at every start)."""
    if not a.is_dir() or not b.is_dir():
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    for rel in files_a:
        fa, fb = a / rel, b / rel
        if fa.is_symlink() and fb.is_symlink():
            if Path(fa.readlink()).name != Path(fb.readlink()).name:
                return False
        elif fa.stat().st_size != fb.stat().st_size:
            return False
        elif fa.stat().st_size < 1 << 20 and fa.read_bytes() != fb.read_bytes():
            return False
    return True
