"""Evaluate a causal language model on prompt/answer tasks: exact-match accuracy and answer loss.

A task is a JSONL file, one ``{"prompt": ..., "answer": ...}`` object per line; the task's name is
the file's stem. For each example the model continues the prompt greedily; the continuation, cut
at the end-of-sequence token or the first newline and stripped, must equal the stripped answer.
The loss is the mean cross-entropy of the answer's tokens given the prompt (teacher forcing), and
the perplexity its exponential. Needs ``transformers`` (``pip install mergesmith[eval]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import ConfigError

__all__ = ["Example", "Task", "TaskScore", "evaluate", "evaluate_harness", "load_model", "load_task", "score"]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class TaskScore:
    task: str
    examples: int
    accuracy: float  # exact-match share in [0, 1]
    loss: float  # mean cross-entropy per answer token
    perplexity: float


def load_task(path: str | Path) -> Task:
    """Read a JSONL task file; every problem names the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such task file; a task is a JSONL file of {{prompt, answer}} objects")
    examples = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{file}:{number}: not valid JSON ({exc})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise ConfigError(
                f"{file}:{number}: expected an object with string prompt and answer, found {line[:80]!r}"
            )
        examples.append(Example(row["prompt"], row["answer"]))
    if not examples:
        raise ConfigError(f"{file}: no examples")
    return Task(file.stem, tuple(examples))


def load_model(model: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """A model directory, Hub id, or ``base+adapter`` (the adapter's update added to the base)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("evaluation needs transformers: pip install 'mergesmith[eval]'") from None
    from mergesmith.config import ModelRef

    ref = ModelRef.parse(str(model))
    if ref.lora is None:
        where: str | Path = model
        revision = None
    else:
        from mergesmith import _hub

        where = _hub.resolve(ref.path, ref.revision)
        revision = ref.revision
    tokenizer = AutoTokenizer.from_pretrained(where, revision=revision)
    net: Any = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=torch.float32)
    if ref.lora is not None:
        from mergesmith.plan import open_models

        adapted = open_models([ref])[0]
        state = {name: adapted.get(name).float() for name in adapted.keys()}  # noqa: SIM118
        _missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"{model}: tensors the model does not have: {unexpected[:5]}")
    net = net.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


def _continuation(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def evaluate(
    model: str | Path,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> list[TaskScore]:
    """Score ``model`` (a directory, Hub id or ``base+adapter``) on every task."""
    net, tokenizer = load_model(model, device)
    return score(
        net, tokenizer, tasks, batch_size=batch_size, device=device, progress=progress, label=str(model)
    )


def score(
    net: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    label: str = "model",
    with_loss: bool = True,
) -> list[TaskScore]:
    """Score a loaded model (see :func:`load_model`) on every task; without ``with_loss`` only
    accuracy is measured (loss and perplexity are NaN), which saves a forward pass per batch."""
    scores = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t.examples) for t in tasks), desc=f"evaluating {label}", unit="ex")
    with torch.no_grad():
        for task in tasks:
            correct = 0
            total_loss = 0.0
            total_tokens = 0
            for start in range(0, len(task.examples), batch_size):
                batch = task.examples[start : start + batch_size]
                got, loss, tokens = _score_batch(net, tokenizer, batch, device, with_loss)
                correct += got
                total_loss += loss
                total_tokens += tokens
                if bar is not None:
                    bar.update(len(batch))
            mean = total_loss / max(1, total_tokens) if with_loss else math.nan
            scores.append(
                TaskScore(task.name, len(task.examples), correct / len(task.examples), mean, math.exp(mean))
            )
    if bar is not None:
        bar.close()
    return scores


def _answer_loss(
    net: Any, prompts: list[list[int]], answers: list[list[int]], pad: int, device: str
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the answer tokens given the prompts, and their count."""
    # loss: prompt + answer, right-padded; only answer positions count
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        target[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    logits = net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1).to(device), reduction="sum"
    )
    tokens = int((target[:, 1:] != -100).sum())
    return shifted, tokens


def _score_batch(
    net: Any, tokenizer: Any, batch: Sequence[Example], device: str, with_loss: bool = True
) -> tuple[int, float, int]:
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
    answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] for e in batch]
    pad = tokenizer.pad_token_id
    shifted, tokens = torch.zeros(()), 0
    if with_loss:
        shifted, tokens = _answer_loss(net, prompts, answers, pad, device)
    # accuracy: greedy continuation of left-padded prompts
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    new = max(len(a) for a in answers) + 2
    out = net.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    correct = sum(_continuation(t) == e.answer.strip() for t, e in zip(texts, batch))
    return correct, float(shifted), tokens


# -- EleutherAI lm-evaluation-harness ---------------------------------------------------------------

# The metric read as a task's accuracy, first found first: normalized multiple-choice accuracy,
# accuracy, then exact match under the harness's usual filters.
HARNESS_METRICS = (
    "acc_norm,none",
    "acc,none",
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "exact_match,none",
)


def evaluate_harness(
    model: str | Path,
    tasks: Sequence[str],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    limit: int | None = None,
) -> list[TaskScore]:
    """Score ``model`` on lm-evaluation-harness tasks (``pip install 'mergesmith[lm-eval]'``).

    ``model`` is a directory, Hub id or ``base+adapter`` (handed to the harness as a PEFT adapter).
    The accuracy is the first metric of :data:`HARNESS_METRICS` the task reports; the harness
    reports no answer loss, so loss and perplexity are NaN.
    """
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            "lm-evaluation-harness is not installed: pip install 'mergesmith[lm-eval]'"
        ) from None
    from mergesmith.config import ModelRef

    ref = ModelRef.parse(str(model))
    args = f"pretrained={ref.path},dtype=float32"
    if ref.revision:
        args += f",revision={ref.revision}"
    if ref.lora:
        args += f",peft={ref.lora}"
    out = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=list(tasks), batch_size=batch_size, device=device, limit=limit
    )
    results: dict[str, dict[str, Any]] = (out or {}).get("results", {})
    samples: dict[str, dict[str, Any]] = (out or {}).get("n-samples", {})
    scores = []
    for task in tasks:
        metrics = results.get(task)
        if metrics is None:
            raise ConfigError(f"lm-evaluation-harness returned no results for task {task!r}")
        metric = next((m for m in HARNESS_METRICS if isinstance(metrics.get(m), (int, float))), None)
        if metric is None:
            found = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(
                f"task {task!r}: none of the metrics {list(HARNESS_METRICS)} in its results (found {found})"
            )
        examples = int(samples.get(task, {}).get("effective", 0))
        scores.append(TaskScore(task, examples, float(metrics[metric]), math.nan, math.nan))
    return scores
