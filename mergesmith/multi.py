"""Multi-stage merges: mergekit-multi's configs, several merges where later ones use earlier ones.

The config is a YAML file of several documents (separated by ``---``), or one document that is a
list, each a merge config. A stage with a ``name`` is written to ``OUT_DIR/<name>``, and any model
reference in another stage equal to that name (``model: <name>``, ``base_model: <name>``,
``<name>+adapter``, ``tokenizer_source: <name>``) means that directory. At most one stage goes
unnamed: the final merge, written to ``out_path`` (mergekit's ``--out-path``).

Everything that can be checked is checked before the first weight is read: the YAML, every stage's
schema, the names (unique, usable as a directory name), the references (a stage, an existing local
directory or a Hub id), the graph (no cycle), the output directories; then every stage whose inputs
all exist (its models are local or on the Hub, or the stages it uses are already finished) is
planned from its inputs' headers as ``validate`` would. A stage that uses a stage still to be merged
can only be planned once that stage is written: until then its schema is checked and its other
inputs are opened. The stages then run one after another with :func:`mergesmith.api.merge`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith import _hub, _output, _yaml
from mergesmith._text import printable
from mergesmith.config import MergeConfig, ModelRef, _Validator, load_config
from mergesmith.errors import CheckpointError, CompatibilityError, ConfigError, MergesmithError, OutputError

__all__ = ["MultiPlan", "Stage", "check", "finished", "interrupted", "load_multi", "multi", "stages_dir"]

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
"""What a stage name may be: one directory name, without the characters a model reference gives a
meaning to (``/``, ``@``, ``+``)."""
FINAL = "final merge"
written: list[Path] = []
"""The stage outputs the current :func:`multi` run has written, for an interrupted command to say."""


@dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage config."""

    name: str | None  # None: the unnamed final merge
    config: MergeConfig  # stage references replaced by the stages' directories
    out_dir: Path
    needs: tuple[str, ...]  # the stages whose output it reads, in file order
    line: int

    @property
    def label(self) -> str:
        return self.name if self.name is not None else FINAL


@dataclass(frozen=True)
class MultiPlan:
    """The stages of a multi-stage config in the order they run (each after the stages it needs)."""

    stages: tuple[Stage, ...]
    out_dir: Path
    source: str

    def describe(self) -> str:
        lines = [f"{len(self.stages)} stage(s) from {self.source}:"]
        for i, stage in enumerate(self.stages, 1):
            needs = f" (uses {', '.join(stage.needs)})" if stage.needs else ""
            lines.append(
                f"  stage {i}/{len(self.stages)}: {stage.label}: {stage.config.method}{needs} -> {stage.out_dir}"
            )
        return printable("\n".join(lines))


def load_multi(
    source: str | Path, out_dir: str | Path, *, out_path: str | Path | None = None, text: str | None = None
) -> MultiPlan:
    """Read and check a multi-stage config without opening any model: YAML, names, schema of every
    stage, references, cycles. ``text`` is the config's text when it is not read from ``source``."""
    where = str(source)
    if text is None:
        text = _yaml.read_file(Path(source))
    docs = [d for d in _yaml.load_all(text, where=where) if d is not None]
    items: list[Any] = docs
    lines: list[int] = [getattr(d, "line", 0) for d in docs]
    if len(docs) == 1 and isinstance(docs[0], list):
        items, lines = list(docs[0]), list(getattr(docs[0], "lines", [0] * len(docs[0])))
    if not items:
        raise ConfigError(
            f"{printable(where)}: no merge configs; write one YAML document per stage, separated by ---"
        )
    problems: list[str] = []
    names: dict[str | None, int] = {}  # name -> line
    stages: list[tuple[str | None, Any, int]] = []
    for item, line in zip(items, lines):
        if not isinstance(item, Mapping):
            problems.append(
                f"line {line}: expected a merge config (merge_method, models, ...), found {_yaml.shown(item)}"
            )
            continue
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
            problems.append(
                f"line {_yaml.line_of(item, 'name') or line}: name {_yaml.shown(name)} cannot name a stage; "
                "use letters, digits, '.', '_' and '-' (it becomes the stage's directory name)"
            )
            continue
        if name in names:
            problems.append(
                f"line {_yaml.line_of(item, 'name') or line}: the name {name!r} is given to two stages, on "
                f"line {names[name]} and here; give each stage its own name"
                if name is not None
                else f"line {line}: a second stage without a name (the first is on line {names[None]}); "
                "only the final merge may go unnamed: name this one"
            )
            continue
        names[name] = _yaml.line_of(item, "name") or line
        stages.append((name, item, line))
    if problems:
        raise ConfigError(problems, where)
    named = {n for n in names if n is not None}
    out = Path(out_dir)
    dirs = {n: (out / n).absolute() for n in named}
    if None in names and out_path is None:
        problems.append(
            f"line {names[None]}: this stage has no name, so it is the final merge, which is written to "
            "--out-path: give --out-path DIR (out_path=...), or name the stage to write it to OUT_DIR/<name>"
        )
    if None in names and out_path is not None:
        final = Path(out_path).absolute()
        for n, d in dirs.items():
            if final == d or d in final.parents or final in d.parents:
                problems.append(
                    f"--out-path {final} is, holds or sits inside {d}, the output of stage {n}; the final "
                    "merge needs a directory of its own: choose another --out-path"
                )
                break
    built: dict[str | None, Stage] = {}
    for name, item, line in stages:
        label = name if name is not None else FINAL
        try:
            _Validator(where, text).run(item)  # the schema, with the file's line numbers
        except ConfigError as exc:
            problems += [f"stage {label}: {p}" for p in exc.problems]
            continue
        needs: list[str] = []
        unknown: list[tuple[str, str]] = []
        plain = _patched(item, dirs, needs, unknown)
        plain.pop("name", None)
        problems += [_unknown(label, at, ref, named - {label}) for at, ref in unknown]
        if problems:
            continue
        config = load_config(plain, name=f"{where} (stage {label})")
        stage_out = dirs[name] if name is not None else Path(out_path or ".").absolute()
        order = [n for n, _, _ in stages if n in needs]
        built[name] = Stage(name, config, stage_out, tuple(order), line)
    if problems:
        raise ConfigError(problems, where)
    return MultiPlan(tuple(_ordered(built, where)), out, where)


def _ordered(stages: Mapping[str | None, Stage], where: str) -> list[Stage]:
    """The stages in an order where each comes after those it needs, otherwise in file order;
    a cycle is a ConfigError naming it."""
    done: list[Stage] = []
    placed: set[str | None] = set()
    visiting: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in placed:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            shown = " -> ".join(str(n) for n in cycle)
            at = ", ".join(str(stages[n].line) for n in cycle[:-1])
            raise ConfigError(
                f"the stages {shown} use each other in a cycle (lines {at}); a stage can use only "
                "stages that do not use it: break the cycle",
                where,
            )
        visiting.append(name)
        for need in stages[name].needs:
            visit(need)
        visiting.pop()
        placed.add(name)
        done.append(stages[name])

    for name in stages:
        visit(name)
    return done


_REF_KEYS = ("base_model", "tokenizer_source")


def _patched(
    doc: Mapping[str, Any], dirs: Mapping[str, Path], needs: list[str], unknown: list[tuple[str, str]]
) -> dict[str, Any]:
    """``doc`` as plain data with every model reference to a stage replaced by the stage's
    directory; the stages used are appended to ``needs``, and to ``unknown`` (where, reference) each
    reference that is neither a stage, an existing path nor a Hub id."""

    def ref(value: Any, at: str, check: bool = True) -> Any:
        if isinstance(value, Mapping):
            value = _plain(value)
            inner = value.get("model")
            if isinstance(inner, dict) and isinstance(inner.get("path"), str):
                inner["path"] = ref(inner["path"], at, check)
            elif isinstance(inner, str):
                value["model"] = ref(inner, at, check)
            return value
        if not isinstance(value, str) or not value.strip():
            return value
        parsed = ModelRef.parse(value.strip())
        if parsed.path in dirs:
            if parsed.path not in needs:
                needs.append(parsed.path)
            return str(ModelRef(str(dirs[parsed.path]), parsed.revision, parsed.lora))
        hub_id = _hub.HUB_ID.match(parsed.path) and not parsed.path.startswith((".", "/", "~"))
        if check and not hub_id and not _exists(parsed.path):
            unknown.append((at, parsed.path))
        return value

    out: dict[str, Any] = _plain(doc)
    for key in _REF_KEYS:
        if isinstance(out.get(key), (str, Mapping)):
            out[key] = ref(out[key], f"{key} (line {_yaml.line_of(doc, key)})", key != "tokenizer_source")
    tokenizer = out.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("source"), str):
        tokenizer["source"] = ref(tokenizer["source"], "tokenizer.source", False)
    for i, item in enumerate(out.get("models") or []):
        at = f"models[{i}] (line {_yaml.line_of(doc['models'], i)})"
        if isinstance(item, dict):
            item["model"] = ref(item.get("model"), at)
        else:
            out["models"][i] = ref(item, at)
    for i, sl in enumerate(out.get("slices") or []):
        if not isinstance(sl, dict):
            continue
        if sl.get("base_model") is not None:
            sl["base_model"] = ref(sl["base_model"], f"slices[{i}].base_model")
        for j, src in enumerate(sl.get("sources") or []):
            if isinstance(src, dict):
                src["model"] = ref(src.get("model"), f"slices[{i}].sources[{j}]")
    return out


def _plain(value: Any) -> Any:
    """A copy of parsed YAML as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _unknown(label: str, at: str, ref: str, named: set[str]) -> str:
    close = difflib.get_close_matches(ref, sorted(named), n=1, cutoff=0.6)
    hint = f" (did you mean the stage {close[0]!r}?)" if close else ""
    stages = ", ".join(sorted(named)) or "none"
    return (
        f"stage {label}: {at}: {_yaml.shown(ref)} is not a stage of this file (stages: {stages}), an "
        f"existing directory, nor a Hub id (org/name){hint}; fix the name"
    )


def finished(stage: Stage) -> bool:
    """Whether ``stage.out_dir`` is a complete mergesmith output of this very stage config: it holds
    the output marker and its recorded config is the stage's."""
    from mergesmith._json import parse_json

    marker = stage.out_dir / _output.MARKER
    recorded = stage.out_dir / "mergesmith_config.yml"
    try:
        if not marker.is_file() or marker.stat().st_size > 1 << 16 or not recorded.is_file():
            return False
        data = parse_json(marker.read_bytes(), str(marker), error=OutputError)
        if (
            not isinstance(data, dict)
            or data.get("written_by") != "mergesmith"
            or data.get("kind") != "merge"
        ):
            return False
        if recorded.stat().st_size > _yaml.MAX_BYTES:
            return False
        return recorded.read_text(encoding="utf-8") == stage.config.text
    except (OSError, UnicodeDecodeError, OutputError):
        return False


def check(plan: MultiPlan, *, lazy: bool) -> set[str | None]:
    """Check the outputs and plan every stage whose inputs exist, from headers alone; raise every
    problem found. Returns the names of the stages a lazy run skips (finished, and so are the
    stages they use)."""
    from mergesmith.api import validate
    from mergesmith.plan import open_models

    skip: set[str | None] = set()
    if lazy:
        for stage in plan.stages:
            if all(n in skip for n in stage.needs) and finished(stage):
                skip.add(stage.name)
    stage_dirs = {s.out_dir for s in plan.stages}
    errors: list[tuple[Stage, MergesmithError]] = []
    for stage in plan.stages:
        if stage.name in skip:
            continue
        try:
            outside = [r for r in stage.config.referenced_models() if Path(r.path) not in stage_dirs]
            inputs = [d for m in open_models(outside) for d in m.dirs]
            _output.check_output(
                stage.out_dir,
                [*inputs, *(s.out_dir for s in plan.stages if s.name in stage.needs)],
                True,
                replacer="mergesmith multi",
            )
            if all(n in skip for n in stage.needs):
                validate(stage.config)
        except MergesmithError as exc:
            errors.append((stage, exc))
    if errors:
        first = errors[0][1]
        same = [(s, e) for s, e in errors if type(e) is type(first)]
        if isinstance(first, (ConfigError, CheckpointError, CompatibilityError)):
            problems = [
                f"stage {s.label}: {p}" for s, e in same if isinstance(e, type(first)) for p in e.problems
            ]
            raise type(first)(problems, plan.source)
        if isinstance(first, OutputError):
            raise OutputError(f"stage {errors[0][0].label}: {first}") from None
        raise first
    return skip


def multi(
    config: str | Path,
    out_dir: str | Path,
    *,
    out_path: str | Path | None = None,
    lazy: bool = True,
    say: Callable[[str], None] | None = None,
    **options: Any,
) -> list[Stage]:
    """Run a multi-stage config: intermediate stages into ``out_dir/<name>``, the unnamed final
    merge into ``out_path``. Every stage is checked before the first is merged (:func:`load_multi`,
    :func:`check`). With ``lazy`` a stage already finished (:func:`finished`), and whose stages are
    all finished too, is skipped. ``options`` are passed to :func:`mergesmith.api.merge` for each
    stage; with ``resume=True``, a stage an earlier run was interrupted in
    (:func:`mergesmith._output.resumable`) goes on from its finished shards. Returns the stages
    merged, in order."""
    from mergesmith import _output
    from mergesmith.api import merge

    resume = bool(options.pop("resume", False))

    plan = load_multi(config, out_dir, out_path=out_path)
    skip = check(plan, lazy=lazy)
    written.clear()
    merged: list[Stage] = []
    total = len(plan.stages)
    for i, stage in enumerate(plan.stages, 1):
        if stage.name in skip:
            _tell(say, f"stage {i}/{total}: {stage.label} (finished earlier in {stage.out_dir}; skipped)")
            continue
        _tell(say, f"stage {i}/{total}: {stage.label} -> {stage.out_dir}")
        again = resume and _output.resumable(Path(stage.out_dir))
        merge(stage.config, stage.out_dir, force=True, resume=again, **options)
        merged.append(stage)
        written.append(stage.out_dir)
    return merged


def _tell(say: Callable[[str], None] | None, line: str) -> None:
    if say is not None:
        say(printable(line))


def stages_dir(given: str | None, intermediate: str | None) -> str:
    """OUT_DIR from the command line: the argument, or mergekit-multi's ``-I``/``--intermediate-dir``."""
    if given is not None and intermediate is not None and Path(given) != Path(intermediate):
        raise ConfigError(
            f"multi: OUT_DIR {_yaml.excerpt(given, 200)} and --intermediate-dir "
            f"{_yaml.excerpt(intermediate, 200)} differ; they are the same thing: give one of them"
        )
    out = given if given is not None else intermediate
    if out is None:
        raise ConfigError(
            "multi: give OUT_DIR, the directory of the named stages' outputs (or -I DIR as for mergekit-multi)"
        )
    return out


def interrupted() -> str:
    """What an interrupted ``multi`` leaves, for the command line."""
    from mergesmith import _output

    done = ", ".join(str(p) for p in written)
    said = (
        f"the stages written to {done} are complete" if done else "no stage was written in this run"
    ) + "; the stage being merged was not written (its previous output, if any, was left as it was)"
    for stage, finished, shards in _output.kept:
        said += f", {finished} of its {shards} shards were kept in {stage}"
    resume = " with --resume" if _output.kept else ""
    return said + f": run the same command again{resume} to go on, finished stages are skipped"
