"""How mergesmith takes mergekit's own configs: validate (and optionally merge) each one on the zoo.

    python bench/mergekit_configs.py CONFIG_DIR [--merge] [--timeout S] [--only SUBSTR] [--keep]
                                     [--all-base-when-no-base]

CONFIG_DIR is a folder of mergekit YAML configs, such as a mergekit checkout's ``examples/``; every
``*.yml`` and ``*.yaml`` under it is tried, in path order, one at a time:

1. every model reference is replaced by a model of this repository's zoo: ``base_model`` becomes
   ``zoo/models/base``, the other models ``zoo/models/{add,rev,sort,shift}`` in turn (the same name
   always getting the same zoo model), ``model+adapter`` becomes ``zoo/models/...+zoo/adapters/...``
   and ``lora:`` a zoo adapter. When a config names no base model, its first model becomes the zoo
   base (with ``--all-base-when-no-base``, every model does). Stage names of multi-document
   (mergekit-multi) configs are left alone, and layer ranges past the zoo's layer count are scaled
   into range. A file that is not YAML mappings is passed on as written;
2. ``python -m mergesmith.cli validate FILE`` runs on the mapped file (the current interpreter,
   ``PYTHONPATH`` this repository, ``OMP_NUM_THREADS=1``, ``--timeout`` seconds, default 120). A
   multi-document config that ``validate`` refuses is tried with ``multi FILE OUT --dry-run``.
   With ``--merge``, each validated config is also merged (``merge`` or ``multi``) into a
   temporary folder.

The result is a markdown table ``config | source | outcome`` on stdout. *config* is the file's path
under CONFIG_DIR without its suffix; *source* is the path under CONFIG_DIR, or what a first line
``# source: PATH`` names; *outcome* is one of ``validated`` / ``merged``, ``refused: `` and the
first line of the error (long lists of method names shortened to ``(list)``), ``crashed: `` and
the last line of a traceback, or ``timeout``. Below it: the count of each outcome, and notes on
how each config's models were mapped (what the tool saw differs from the original there).
Progress goes to stderr. The mapped configs are written to a temporary folder, removed at the
end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FINETUNES = ["add", "rev", "sort", "shift"]
NOT_MODELS = {"base", "union", "", "..."}  # tokenizer sources and placeholders that are not model names


class Mapper:
    """Replaces the model references in the documents of one config file by zoo paths."""

    def __init__(self, n_layers: int, docs: list[Any], all_base_when_no_base: bool):
        self.n_layers = n_layers
        self.docs = docs
        self.notes: list[str] = []
        self.stage_names = {d["name"] for d in docs if isinstance(d.get("name"), str)}
        self.base_path = str(ROOT / "zoo" / "models" / "base")
        self.map: dict[str, str] = {}
        self.n_ft = 0
        self.n_ad = 0
        self.base_names: set[str] = set()
        for d in docs:
            self._collect_bases(d)
        no_base = not self.base_names
        self.all_base = no_base and all_base_when_no_base
        self.first_is_base = no_base and not all_base_when_no_base

    def _collect_bases(self, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "base_model":
                    if isinstance(v, str):
                        self.base_names.add(v.split("+", 1)[0])
                    elif isinstance(v, dict) and isinstance(v.get("model"), str):
                        self.base_names.add(v["model"].split("+", 1)[0])
                self._collect_bases(v)
        elif isinstance(node, list):
            for x in node:
                self._collect_bases(x)

    def ref(self, name: Any, *, is_base: bool = False) -> Any:
        """The zoo path for the model reference ``name`` (anything else is returned as it is)."""
        if not isinstance(name, str) or name in self.stage_names or name.strip() in NOT_MODELS:
            return name
        if "+" in name:  # model+lora_adapter
            model, adapter = name.split("+", 1)
            out = f"{self.ref(model, is_base=is_base)}+{self.adapter(adapter)}"
            self.map.setdefault(name, out)
            return out
        if name in self.map:
            return self.map[name]
        if is_base or name in self.base_names or self.all_base:
            out = self.base_path
        elif self.first_is_base and not self.map:
            out = self.base_path
            self.notes.append(f"no base_model: first model {name!r} mapped to zoo base")
        else:
            out = str(ROOT / "zoo" / "models" / FINETUNES[self.n_ft % len(FINETUNES)])
            self.n_ft += 1
        self.map[name] = out
        return out

    def adapter(self, name: str) -> str:
        key = "adapter::" + name
        if key not in self.map:
            self.map[key] = str(ROOT / "zoo" / "adapters" / FINETUNES[self.n_ad % len(FINETUNES)])
            self.n_ad += 1
        return self.map[key]

    def tokenizer_source(self, v: Any) -> Any:
        if not isinstance(v, str) or v.strip() in NOT_MODELS:
            return v
        if v.startswith("model:"):
            return "model:" + self.ref(v[len("model:") :].strip())
        return self.ref(v)

    def walk(self, node: Any, parent_key: str | None = None) -> Any:
        if isinstance(node, list):
            if parent_key == "models":  # models: [str, ...] (evolve genome) or [{model: ...}]
                return [self.ref(x) if isinstance(x, str) else self.walk(x) for x in node]
            return [self.walk(x, parent_key) for x in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k == "base_model":
                if isinstance(v, str):
                    out[k] = self.ref(v, is_base=True)
                elif isinstance(v, dict):
                    v2 = dict(v)
                    if isinstance(v2.get("model"), str):
                        v2["model"] = self.ref(v2["model"], is_base=True)
                    out[k] = self.walk(v2)
                else:
                    out[k] = v
            elif k in ("model", "source_model") and isinstance(v, str):
                out[k] = self.ref(v)
            elif k == "model" and isinstance(v, dict):  # {model: {path: ..., lora: ...}}
                out[k] = self.walk(v, "model")
            elif k == "path" and isinstance(v, str) and parent_key == "model":
                out[k] = self.ref(v)
            elif k == "lora" and isinstance(v, str):
                out[k] = self.adapter(v)
                self.notes.append(f"`lora: {v}` mapped to a zoo adapter")
            elif k == "tokenizer_source":
                out[k] = self.tokenizer_source(v)
            elif k == "tokenizer" and isinstance(v, dict):
                t = self.walk(v, "tokenizer")
                if "source" in v:
                    t["source"] = self.tokenizer_source(v["source"])
                out[k] = t
            elif k == "tokens" and parent_key == "tokenizer" and isinstance(v, dict):
                toks = {}
                for tok, spec in v.items():
                    if isinstance(spec, dict):
                        spec2 = self.walk(spec)
                        if isinstance(spec.get("source"), str):
                            spec2["source"] = self.tokenizer_source(spec["source"])
                        toks[tok] = spec2
                    else:
                        toks[tok] = spec
                out[k] = toks
            elif k == "name":
                out[k] = v
            else:
                out[k] = self.walk(v, k)
        return out

    def replace_leftovers(self, node: Any) -> Any:
        """Strings elsewhere (such as cabs' ``pruning_order``) that name an already mapped model."""
        if isinstance(node, list):
            return [self.replace_leftovers(x) for x in node]
        if isinstance(node, dict):
            return {k: (v if k == "name" else self.replace_leftovers(v)) for k, v in node.items()}
        if isinstance(node, str) and node in self.map and node not in self.stage_names:
            self.notes.append(f"other reference {node!r} mapped too")
            return self.map[node]
        return node

    def scale_layers(self, doc: Any) -> None:
        holders: list[dict[str, Any]] = []

        def find(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "layer_range" and isinstance(v, list) and len(v) == 2:
                        if all(isinstance(x, int) for x in v):
                            holders.append(node)
                    else:
                        find(v)
            elif isinstance(node, list):
                for x in node:
                    find(x)

        find(doc)
        top = max((h["layer_range"][1] for h in holders), default=0)
        if top <= self.n_layers:
            return
        n = self.n_layers
        for h in holders:
            a, b = h["layer_range"]
            a2 = min(n - 1, max(0, round(a * n / top)))
            b2 = min(n, max(a2 + 1, round(b * n / top)))
            self.notes.append(f"layer_range [{a}, {b}] -> [{a2}, {b2}] (scaled x{n}/{top})")
            h["layer_range"] = [a2, b2]

    def run(self) -> list[Any]:
        docs = [self.replace_leftovers(self.walk(copy.deepcopy(d))) for d in self.docs]
        for d in docs:
            self.scale_layers(d)
        return docs


def first_line(text: str) -> str:
    """The first line of an error that is not a warning or a progress line, with its ``- `` items."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s and not s.startswith(("WARNING", "[")):
            if s.endswith(":"):  # "error: N problems in the config ...:" then "  - ..." lines
                items = [x.strip() for x in lines[i + 1 :] if x.strip().startswith("- ")]
                if items:
                    s = s + " " + " ".join(items)
            return s
    return next((x.strip() for x in lines if x.strip()), "(no output)")


def classify(rc: int | None, out: str, err: str, ok_word: str) -> tuple[str, str]:
    """(kind, text), kind one of ok_word, refused, crashed, timeout; rc None means a timeout."""
    if rc == 0:
        return ok_word, ok_word
    if rc is None:
        return "timeout", "timeout"
    both = err + "\n" + out
    if "Traceback (most recent call last)" in both:
        tb = both[both.rfind("Traceback (most recent call last)") :]
        lines = [x.strip() for x in tb.splitlines() if x.strip()]
        return "crashed", f"crashed: {lines[-1] if lines else '?'}"
    if rc < 0:
        return "crashed", f"crashed: killed by signal {-rc}"
    return "refused", f"refused: {first_line(err) if err.strip() else first_line(out)}"


def cli(timeout: int, *args: str) -> tuple[int | None, str, str]:
    """Runs ``python -m mergesmith.cli ARGS``; (returncode or None on timeout, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mergesmith.cli", *args]
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:

        def s(x: bytes | str | None) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        return None, s(e.stdout), s(e.stderr)
    return p.returncode, p.stdout, p.stderr


def md(s: str) -> str:
    s = re.sub(r"((?:one of|known methods): )([A-Za-z0-9_]+(?:, [A-Za-z0-9_]+){5,})", r"\1(list)", s)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 400 else s[:397] + "..."


def try_config(
    path: Path, mapped: Path, n_layers: int, args: argparse.Namespace, notes: list[str]
) -> tuple[str, str]:
    """Maps one config onto the zoo, writes it to ``mapped`` and runs the CLI on it: (kind, outcome)."""
    text = path.read_text()
    mapped.parent.mkdir(parents=True, exist_ok=True)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        if not docs or not all(isinstance(d, dict) for d in docs):
            raise ValueError("not a mapping")
        mapper = Mapper(n_layers, docs, args.all_base_when_no_base)
        new_docs = mapper.run()
        notes += mapper.notes
        if not mapper.map:
            notes.append("no model reference found (fragment?)")
        body = yaml.safe_dump_all(new_docs, sort_keys=False, allow_unicode=True, width=1000)
        mapped.write_text("# mapped onto the zoo\n" + body)
        multi = len(docs) > 1
    except Exception as e:  # not parseable or not a mapping: hand the tool the text as written
        notes.append(f"could not map ({type(e).__name__}: {first_line(str(e))}); run unmapped")
        mapped.write_text(text)
        multi = False

    t = args.timeout
    k, outcome = classify(*cli(t, "validate", str(mapped), "--quiet"), "validated")
    if multi and k != "validated":
        v_outcome = outcome
        stages = mapped.with_suffix(".stages")
        final = str(stages / "_final")
        k, outcome = classify(
            *cli(t, "multi", str(mapped), str(stages), "--out-path", final, "--dry-run"), "validated"
        )
        outcome = f"{outcome} (via `multi --dry-run`; `validate`: {v_outcome})"
        if args.merge and k == "validated":
            res = cli(t, "multi", str(mapped), str(stages), "--out-path", final, "--no-progress")
            k, m = classify(*res, "merged")
            outcome = f"{m} (via `multi`; `validate`: {v_outcome})"
        shutil.rmtree(stages, ignore_errors=True)
    elif args.merge and k == "validated":
        outdir = mapped.with_suffix(".out")
        k, outcome = classify(*cli(t, "merge", str(mapped), str(outdir), "--no-progress"), "merged")
        shutil.rmtree(outdir, ignore_errors=True)
    return k, outcome


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "config_dir", type=Path, help="folder of mergekit configs (*.yml, *.yaml, searched recursively)"
    )
    ap.add_argument("--merge", action="store_true", help="also merge every validated config")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per mergesmith command (default 120)")
    ap.add_argument("--only", help="run only the configs whose path under CONFIG_DIR contains this")
    ap.add_argument(
        "--keep", action="store_true", help="keep the folder of mapped configs and print its path"
    )
    ap.add_argument(
        "--all-base-when-no-base",
        action="store_true",
        help="when a config has no base_model, map every model to the zoo base "
        "(default: the first model becomes the zoo base, the others fine-tunes)",
    )
    args = ap.parse_args()

    config_dir = args.config_dir.resolve()
    if not config_dir.is_dir():
        ap.error(f"{config_dir} is not a folder")
    n_layers = int(
        json.loads((ROOT / "zoo" / "models" / "base" / "config.json").read_text())["num_hidden_layers"]
    )
    files = sorted(
        (p for p in config_dir.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file()),
        key=lambda p: p.relative_to(config_dir).as_posix(),
    )
    files = [p for p in files if not args.only or args.only in p.relative_to(config_dir).as_posix()]
    if not files:
        print(f"no *.yml or *.yaml files under {config_dir}", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="mergekit_configs_"))
    rows: list[tuple[str, str, str]] = []
    notes: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    try:
        for i, f in enumerate(files, 1):
            rel = f.relative_to(config_dir)
            name = rel.with_suffix("").as_posix()
            head = (f.read_text().splitlines() or [""])[0]
            m = re.match(r"#\s*source:\s*(\S+)", head)
            source = m.group(1) if m else rel.as_posix()
            print(f"[{i}/{len(files)}] {name} ...", file=sys.stderr, flush=True)
            fnotes: list[str] = []
            k, outcome = try_config(f, tmp / rel, n_layers, args, fnotes)
            counts[k] = counts.get(k, 0) + 1
            rows.append((name, source, outcome.replace(str(tmp) + os.sep, "")))
            if fnotes:
                notes[name] = list(dict.fromkeys(fnotes))
    finally:
        if args.keep:
            print(f"mapped configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"`{sys.executable} -m mergesmith.cli` against `{ROOT}` (zoo: {n_layers} layers)"
        f"{' with --merge' if args.merge else ''}\n"
    )
    print("| config | source | outcome |")
    print("|---|---|---|")
    for name, source, outcome in rows:
        print(f"| {md(name)} | {md(source)} | {md(outcome)} |")
    print()
    print(f"**{len(rows)} configs:** " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if notes:
        print("\nMapping notes:\n")
        for name, ns in notes.items():
            print(f"- {name}: " + "; ".join(ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
