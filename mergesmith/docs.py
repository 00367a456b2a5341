"""Text generated from the code: the ``methods`` listing, the README's method table and the list of
supported model types."""

from __future__ import annotations

from mergesmith.architecture import architecture_rows
from mergesmith.methods import REGISTRY, Method
from mergesmith.parameters import ParamInfo
from mergesmith.stacks import CHECKED_TYPES, derivable_types

__all__ = [
    "generated_model_lists",
    "generated_tables",
    "method_text",
    "methods_index",
    "methods_table",
    "methods_text",
    "model_checked_table",
    "model_derived_list",
    "model_rows_table",
    "update_table",
]


def _param_line(info: ParamInfo, scope: str) -> str:
    default = (
        "required"
        if info.required
        else repr(info.default).lower()
        if isinstance(info.default, bool)
        else repr(list(info.default))
        if info.is_names
        else repr(info.default)
    )
    bounds = f" in {info.bounds_text()}" if info.bounds_text() else ""
    kind = "list" if info.is_names else info.type.__name__
    return f"    {info.key:<10} {scope:<9} {kind:<5} default {default}{bounds}: {info.doc}"


def method_text(method: Method[object, object]) -> str:
    lines = [f"{method.name}: {method.title}", f"  {method.summary}", f"  takes {method.models_text()}"]
    lines.append(f"  paper: {method.paper}")
    params = [(i, "merge") for i in method.param_infos] + [(i, "per-model") for i in method.model_param_infos]
    if params:
        lines.append("  parameters:")
        lines += [_param_line(i, scope) for i, scope in params]
    return "\n".join(lines)


def methods_text() -> str:
    return "\n\n".join(method_text(m) for m in REGISTRY.values())


def methods_table() -> str:
    """The README's method table, in Markdown."""
    rows = ["| method | what it does | parameters (per-model in italics) | paper |", "|---|---|---|---|"]
    for m in REGISTRY.values():
        params = [f"`{i.key}`" for i in m.param_infos] + [f"*`{i.key}`*" for i in m.model_param_infos]
        rows.append(
            f"| [`{m.name}`](docs/methods/{m.name}.md) | {m.summary} | {', '.join(params)} | [link]({m.paper}) |"
        )
    return "\n".join(rows)


def methods_index() -> str:
    """The table of docs/methods/README.md, in Markdown."""
    rows = ["| method | what it does | base model | models |", "|---|---|---|---|"]
    for m in REGISTRY.values():
        lo, hi = m.min_models, m.max_models
        count = f"exactly {lo}" if lo == hi else (f"{lo} or more" if hi is None else f"{lo} to {hi}")
        base = {"required": "required", "optional": "optional", "unused": "not used"}[m.base]
        others = " other" + ("s" if hi != 1 else "") if m.base != "unused" else ""
        rows.append(f"| [{m.name}]({m.name}.md) | {m.summary} | {base} | {count}{others} |")
    return "\n".join(rows)


def model_rows_table() -> str:
    """The model types with a row of their own in architectures.json, with mergekit's module names."""
    rows = ["| model types | architecture | modules (`modules:` names) |", "|---|---|---|"]
    for row in architecture_rows():
        modules = [m if isinstance(m, str) else m["name"] for m in row["modules"]]
        types = ", ".join(f"`{t}`" for t in row["model_types"])
        rows.append(f"| {types} | {row['name']} | {', '.join(modules)} |")
    count = sum(len(row["model_types"]) for row in architecture_rows())
    return f"{count} model types:\n\n" + "\n".join(rows)


def model_checked_table() -> str:
    """The model types the test suite merges stack by stack."""
    return f"{len(CHECKED_TYPES)} model types: " + ", ".join(f"`{t}`" for t in CHECKED_TYPES) + "."


def model_derived_list() -> str:
    """Every model type the installed transformers defines a model class for."""
    found = derivable_types()
    if found is None:
        return "transformers is not installed: install `mergesmith[eval]` and run `make readme`."
    version, types = found
    return f"transformers {version}: {len(types)} model types:\n\n" + ", ".join(f"`{t}`" for t in types) + "."


def update_table(path: str, table: str, marker: str = "methods-table") -> bool:
    """Rewrite the generated text between a marker's start and end comments in ``path``; True if it
    changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start_mark, end_mark = f"<!-- {marker}:start -->\n", f"\n<!-- {marker}:end -->"
    start = text.index(start_mark) + len(start_mark)
    end = text.index(end_mark, start)
    new = text[:start] + table + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def generated_tables(root: str = ".") -> dict[str, str]:
    """Each file with a generated method table, and the table it should hold."""
    return {f"{root}/README.md": methods_table(), f"{root}/docs/methods/README.md": methods_index()}


def generated_model_lists(root: str = ".") -> dict[str, str]:
    """docs/models.md's generated parts, by marker."""
    return {
        "model-rows": model_rows_table(),
        "model-checked": model_checked_table(),
        "model-derived": model_derived_list(),
    }


if __name__ == "__main__":
    import sys

    root = sys.argv[1] if len(sys.argv) > 1 else "."
    for path, table in generated_tables(root).items():
        print(f"{path}: {'updated' if update_table(path, table) else 'up to date'}")
    for marker, text in generated_model_lists(root).items():
        changed = update_table(f"{root}/docs/models.md", text, marker)
        print(f"{root}/docs/models.md ({marker}): {'updated' if changed else 'up to date'}")
