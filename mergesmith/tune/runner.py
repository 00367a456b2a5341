"""A trial runner: the parents' tensors, the study's plan and one model held in memory; each trial
merges one set of values into the model and scores it on the tasks."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergesmith import defaults
from mergesmith.errors import ConfigError
from mergesmith.evaluate import Encoded, quiet_transformers
from mergesmith.tune.objective import Objective, optimistic
from mergesmith.tune.space import midpoint, search_space, trial_config

_LINE = re.compile(r"^line \d+: ")

if TYPE_CHECKING:
    from mergesmith.plan import Plan

__all__ = ["KEEP_UNKNOWN", "TrialRunner", "TrialScores"]

KEEP_UNKNOWN = 4 << 30  # bytes trials may keep between them where the free memory is unknown


@dataclass(frozen=True)
class TrialScores:
    """What a trial measured. ``stopped``: scoring ended early because even with every example
    left answered right the objective would stay below the best trial's; ``accuracy`` is then
    that optimistic accuracy."""

    accuracy: dict[str, float]
    scored: int  # examples scored
    stopped: bool = False


class TrialRunner:
    """Holds the parents' tensors and one model in memory; merges and scores one set of values."""

    def __init__(
        self,
        doc: Mapping[str, Any],
        task_files: Sequence[str],
        *,
        device: str = "cpu",
        batch_size: int = defaults.TUNE_BATCH_SIZE,
        threads: int | None = None,
        objective: Objective | None = None,
        add_special_tokens: bool = True,
        plan: Plan | None = None,
        tune_memory: bool = False,
    ) -> None:
        """``plan``: the study's plan at any values of ``doc``'s search (default: built here, at
        the starting values); each trial resolves its own values' parameters against it.
        ``tune_memory`` tunes this process's C allocator as a merge command does (``_memory.tune``)."""
        from mergesmith import _memory, _safetensors
        from mergesmith.evaluate import check_examples, load_task
        from mergesmith.plan import build_plan

        if threads:
            torch.set_num_threads(threads)
        if tune_memory:
            _memory.tune()  # the allocator settings the merge command runs with
        self.doc = dict(doc)
        self.space = search_space(doc)
        self.tasks = [load_task(t) for t in task_files]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.objective = objective
        if plan is None:
            plan = build_plan(trial_config(doc, self.space, midpoint(self.space)))
        self.plan = plan
        # the parents' tensors: views of their safetensors files mapped copy-on-write where they
        # can be (the page cache holds them once for every worker), else read into memory
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.maps: dict[Path, Any] = {}
        for job in plan.jobs:
            for ref in job.all_inputs():
                key = (str(plan.refs[ref.model]), ref.name)
                if key not in self.cache:
                    source = plan.models[ref.model]
                    entry = source.entry(ref.name)
                    self.cache[key] = (
                        _safetensors.map_tensor(entry, self.maps)
                        if entry is not None
                        else source.get(ref.name)
                    )
        self.net, self.tokenizer = _model_from(plan)
        check_examples(self.tokenizer, self.tasks, add_special_tokens)
        self.encoded: Encoded = {}  # token ids of the prompts and answers
        # per output tensor and input model: what methods keep between trials (see MergeInputs.reuse),
        # at most a float32 copy of each input; kept only when that fits in half the free memory
        self.reuse: dict[str, list[dict[str, Any]]] = {}
        most = sum(
            4 * self.cache[(str(plan.refs[r.model]), r.name)].numel() for job in plan.jobs for r in job.inputs
        )
        free = _memory.available()
        self.keeps = most <= (free // 2 if free is not None else KEEP_UNKNOWN)

    def merged_state(self, values: Mapping[str, float]) -> dict[str, torch.Tensor]:
        from mergesmith.execute import merge_job, whole_model_thresholds

        try:
            config = trial_config(self.doc, self.space, values)
            plan = self.plan.with_parameters(config)
        except ConfigError as exc:  # the lines are those of the rendered trial config: left out
            shown = ", ".join(f"{k}={v:g}" for k, v in values.items())
            raise ConfigError([f"trial values {shown}: {_LINE.sub('', p)}" for p in exc.problems]) from None
        thresholds = whole_model_thresholds(plan, self.device)
        state = {}
        for job in plan.jobs:
            tensors = [self.cache[(str(plan.refs[r.model]), r.name)].clone() for r in job.all_inputs()]
            reuse = self.reuse.setdefault(job.name, [{} for _ in job.inputs]) if self.keeps else None
            state[job.name] = merge_job(plan, job, tensors, self.device, thresholds, reuse=reuse)
        return state

    def run(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per-task accuracy of the merge with ``values``."""
        return self.trial(values).accuracy

    def trial(self, values: Mapping[str, float], beat: float | None = None) -> TrialScores:
        """Merge with ``values`` and score the merge on every task, a batch of each task in turn.
        With ``beat`` (the best objective so far) scoring stops as soon as the runner's objective
        could no longer exceed it even if every example left were answered right."""
        from mergesmith.evaluate import judge_batch

        state = self.merged_state(values)
        with torch.no_grad():
            _missing, unexpected = self.net.load_state_dict(state, strict=False)
        # a parameter the merge does not give (tied ones are listed once, under the name it gives)
        unset = [name for name, _ in self.net.named_parameters() if name not in state]
        del state
        if unexpected or unset:
            raise ConfigError(
                f"the merge's tensors do not match the {type(self.net).__name__} built from its config: "
                f"not in the model {unexpected[:5]}, not merged {unset[:5]}"
            )
        total = {t.name: len(t.examples) for t in self.tasks}
        right = dict.fromkeys(total, 0)
        seen = dict.fromkeys(total, 0)
        judge = self.objective if self.objective is not None and self.objective.rises_with_accuracy else None
        rounds = max(math.ceil(n / self.batch_size) for n in total.values())
        with torch.no_grad():
            for r in range(rounds):
                for task in self.tasks:
                    batch = task.examples[r * self.batch_size : (r + 1) * self.batch_size]
                    if not batch:
                        continue
                    flags, _, _ = judge_batch(
                        self.net,
                        self.tokenizer,
                        batch,
                        str(self.device),
                        encoded=self.encoded,
                        add_special_tokens=self.add_special_tokens,
                    )
                    right[task.name] += sum(flags)
                    seen[task.name] += len(batch)
                    scored = sum(seen.values())
                    if (
                        judge is not None
                        and beat is not None
                        and scored < sum(total.values())  # some left to score
                        and judge.bound(right, seen, total) < beat
                    ):
                        return TrialScores(optimistic(right, seen, total), scored, True)
        return TrialScores({t: right[t] / total[t] for t in total}, sum(seen.values()))


def _without_initial_values() -> Any:
    """A context in which models are built without drawing initial values: every parameter comes
    from the merge, so they would be thrown away."""
    import importlib
    from contextlib import nullcontext

    for where in ("transformers.initialization", "transformers.modeling_utils"):  # 5.x, 4.x
        try:
            found = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found()
    return nullcontext()


def _model_from(plan: Plan) -> tuple[Any, Any]:
    """An in-memory model of the merge's output architecture, and the output's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(plan.out_config)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with _without_initial_values(), quiet_transformers():
        net: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    net.tie_weights()
    net = net.eval()
    source = plan.models[plan.tokenizer_model if plan.tokenizer_model is not None else plan.reference]
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source.dirs[0])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer
