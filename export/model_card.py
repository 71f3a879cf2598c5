"""A bundle's README.md: a Hugging Face model card, so that ``hf upload ORG/NAME bundle/`` publishes it as it is.

huggingface_hub's ModelCard and ModelCardData write the YAML front matter the Hub reads (library_name, base_model,
tags, license, pipeline_tag); the text says what the bundle is, its files, the accuracy the export measured, and
how to run it. The card is not in the manifest's file list: the manifest verifies what runs, the card describes it.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest

CARD_NAME = "README.md"
CARD_MARK = "library_name: convllava-edge"  # in the front matter: the card is ours, not a README the user wrote
MAX_CARD_PEEK = 4096  # the front matter comes first; reading further decides nothing


def is_our_card(path: Path) -> bool:
    """Whether ``path`` is a card this tool wrote: a regular file whose YAML front matter names our library.
    --force replaces a bundle with such a card; a README.md the user wrote in the folder makes it not ours."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with open(path, "rb") as f:
            head = f.read(MAX_CARD_PEEK).decode("utf-8", errors="replace")
    except OSError:
        return False
    if not head.startswith("---\n"):
        return False
    front = head[4:].split("\n---", 1)[0]
    return CARD_MARK in front.splitlines()


def _accuracy_lines(manifest: Manifest) -> list[str]:
    lines = []
    for entry in manifest.vision:
        a = entry.accuracy or {}
        if "cosine_mean" in a:
            lines.append(f"- vision {entry.variant} against fp32: cosine mean {a['cosine_mean']:.4f}, "
                         f"min {a['cosine_min']:.4f} ({a.get('n_tokens', '?')} image tokens of the probe images)")
    fp32 = manifest.accuracy.get("vision_fp32_vs_pytorch")
    if isinstance(fp32, dict) and fp32:
        lines.append(f"- vision fp32 against PyTorch: relative error at most {max(fp32.values()):.2e}")
    llm = manifest.accuracy.get("llm_vs_unquantized")
    if isinstance(llm, dict) and "top1" in llm:
        lines.append(f"- LLM {manifest.llm.type if manifest.llm else ''} against the unquantized LLM: next-token "
                     f"agreement {llm['top1']:.1%}, KL mean {llm['kl_mean']:.4f} ({llm.get('measured_on', '')})")
    return lines or ["- (nothing measured at export)"]


def card_text(manifest: Manifest, repo_hint: str, base_model: str | None, license: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="convllava-edge", base_model=base_model, license=license,
                         pipeline_tag="image-text-to-text",
                         tags=["convllava-edge", manifest.family, "onnx", "gguf", "multimodal"])
    files = "\n".join(f"| `{f.path}` | {f.size:,} | `{f.sha256[:16]}...` |" for f in manifest.files)
    llm = manifest.llm.type if manifest.llm else "Hugging Face folder (vLLM)"
    body = f"""
# {manifest.name} (convllava-edge bundle)

A convllava-edge bundle of {f"[{base_model}](https://huggingface.co/{base_model})" if base_model else manifest.name}
({manifest.family}): the vision side as ONNX graphs ({", ".join(e.variant for e in manifest.vision)}; the first is
the default), the LLM as GGUF {llm}, and `manifest.json`, which lists every file with its SHA-256 (checked before
first use). Made with {manifest.created_with}.

## Accuracy measured at export

{chr(10).join(_accuracy_lines(manifest))}

## Files

| file | bytes | SHA-256 |
|---|---|---|
{files}

## Run it

`{repo_hint}` stands for the repository this folder is uploaded to (`hf upload {repo_hint} BUNDLE/`).

```bash
pip install convllava-edge
convllava-edge pull {repo_hint}                 # into the Hugging Face cache, every file verified
convllava-edge ask photo.jpg "What is in the picture?" --model {repo_hint}
convllava-edge serve --model {repo_hint}        # OpenAI and Ollama APIs on 127.0.0.1:8765
```
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def write_card(folder: Path, manifest: Manifest, base_model: str | None = None, license: str | None = None) -> Path:
    """README.md in the (staging) bundle folder; the repo it is published as is the user's choice: ORG/NAME."""
    path = folder / CARD_NAME
    path.write_text(card_text(manifest, f"ORG/{manifest.name}", base_model, license), encoding="utf-8")
    return path
