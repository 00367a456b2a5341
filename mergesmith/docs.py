"""Text generated from the method registry: the ``methods`` listing and the README table."""

from __future__ import annotations

from mergesmith.methods import REGISTRY, Method
from mergesmith.parameters import ParamInfo


def _param_line(info: ParamInfo, scope: str) -> str:
    default = (
        "required"
        if info.required
        else repr(info.default).lower()
        if isinstance(info.default, bool)
        else repr(info.default)
    )
    bounds = f" in {info.bounds_text()}" if info.bounds_text() else ""
    return f"    {info.key:<10} {scope:<9} {info.type.__name__:<5} default {default}{bounds}: {info.doc}"


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


_START = "<!-- methods-table:start -->\n"
_END = "\n<!-- methods-table:end -->"


def update_table(path: str, table: str) -> bool:
    """Rewrite the generated table between its markers in ``path``; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(_START) + len(_START)
    end = text.index(_END, start)
    new = text[:start] + table + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def generated_tables(root: str = ".") -> dict[str, str]:
    """Each file with a generated method table, and the table it should hold."""
    return {f"{root}/README.md": methods_table(), f"{root}/docs/methods/README.md": methods_index()}


if __name__ == "__main__":
    import sys

    for path, table in generated_tables(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(f"{path}: {'updated' if update_table(path, table) else 'up to date'}")
