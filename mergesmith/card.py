"""The model card written beside a merged model, and digests of the input files."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergesmith._hub import HUB_ID
from mergesmith._version import __version__

if TYPE_CHECKING:
    from mergesmith.config import ModelRef
    from mergesmith.plan import Plan

__all__ = ["file_digest", "front_matter", "hub_ids", "hub_parents", "metadata", "model_card"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


_QUICK_SPAN = 1 << 20


def file_digest(path: Path, *, full: bool = False) -> str:
    """A digest recording which file was read, labelled with how it was made.

    Hub cache blobs are named by their sha256, which is used as is (``sha256:``). Other files get
    the sha256 of their whole content with ``full`` (``sha256:``), else a quick digest of their
    size and first and last MiB (``quick:``), which costs no full read of the inputs.
    """
    target = path.resolve()
    if _SHA256.match(target.name) and target.parent.name == "blobs":
        return f"sha256:{target.name}"
    h = hashlib.sha256()
    with open(target, "rb") as f:
        if full:
            while chunk := f.read(1 << 24):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        size = f.seek(0, 2)
        h.update(str(size).encode())
        f.seek(0)
        h.update(f.read(_QUICK_SPAN))
        f.seek(max(0, size - _QUICK_SPAN))
        h.update(f.read(_QUICK_SPAN))
    return f"quick:{h.hexdigest()}"


def hub_parents(plan: Plan) -> list[str]:
    """The inputs that are Hub repositories (base first), as the Hub's ``base_model`` lists them;
    local directories are no Hub metadata and are left out."""
    return hub_ids(sorted(plan.refs, key=lambda r: r != plan.config.base_model))


def hub_ids(refs: Sequence[ModelRef]) -> list[str]:
    """The models among ``refs`` that are Hub repositories, in order, each once."""
    found = [r.path for r in refs if HUB_ID.match(r.path) and not r.path.startswith((".", "/", "~"))]
    return list(dict.fromkeys(p for p in found if not _local(p)))


def _local(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def front_matter(plan: Plan, tags: Sequence[str] = ("merge", "mergesmith")) -> str:
    """The card's YAML metadata, written (and escaped) by huggingface_hub as the Hub reads it."""
    return metadata(hub_parents(plan), tags)


def metadata(parents: Sequence[str], tags: Sequence[str]) -> str:
    """YAML front matter naming the Hub models an output was made from (``base_model``)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=list(parents) or None,
        base_model_relation="merge" if parents else None,
        library_name="transformers",
        tags=list(tags),
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(plan: Plan, digests: Mapping[Path, str], warnings: Sequence[str] = ()) -> str:
    cfg = plan.config
    lines = [front_matter(plan)]
    lines.append("# Merged model")
    lines.append("")
    lines.append(
        f"Made with mergesmith {__version__} using the **{plan.method.title}** method "
        f"([paper]({plan.method.paper}))."
    )
    lines += ["", "## Inputs", "", "| model | role | files (digest) |", "|---|---|---|"]
    for ref, ckpt in zip(plan.refs, plan.models):
        role = "base" if cfg.base_model == ref else "merged"
        files = "<br>".join(f"`{p.name}` `{digests.get(p, '?')}`" for p in ckpt.weight_files)
        lines.append(f"| {ref} | {role} | {files} |")
    if any(d.startswith("quick:") for d in digests.values()):
        lines += [
            "",
            "`quick:` digests hash a file's size and its first and last MiB; `sha256:` digests hash "
            "the whole file (`mergesmith merge --full-digests`).",
        ]
    if warnings:
        lines += [
            "",
            "## Warnings",
            "",
            "Merged with `--on-nonfinite warn`; these tensors were written as they came out:",
            "",
        ]
        lines += [f"- {w}" for w in warnings]
    lines += ["", "## Configuration", "", "```yaml", cfg.text.strip(), "```", ""]
    lines += [
        f"Output: {len(plan.jobs)} tensors in {len(plan.shards)} shard(s), {plan.write_bytes / 1e6:.1f} MB.",
        "",
    ]
    return "\n".join(lines)
