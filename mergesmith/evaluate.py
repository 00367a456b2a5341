"""Evaluate a causal language model on prompt/answer tasks: exact-match accuracy and answer loss.

A task is a JSONL file, one ``{"prompt": ..., "answer": ...}`` object per line; the task's name is
the file's stem. For each example the model continues the prompt greedily; the continuation, cut
at the end-of-sequence token or the first newline and stripped, must equal the stripped answer.
One teacher-forced pass settles almost every example (see :func:`judge_batch`); the rest are
decoded with ``generate``.
The loss is the mean cross-entropy of the answer's tokens given the prompt (teacher forcing), and
the perplexity its exponential. Needs ``transformers`` (``pip install mergesmith[eval]``).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith import defaults
from mergesmith._json import parse_json
from mergesmith._text import printable
from mergesmith.errors import CheckpointError, ConfigError, MergesmithError

__all__ = [
    "Example",
    "Task",
    "TaskScore",
    "check_examples",
    "evaluate",
    "evaluate_harness",
    "judge_batch",
    "load_model",
    "load_task",
    "quiet_transformers",
    "score",
]

# A prompt is tokenized as the model's tokenizer does by default (a BOS token in front where the
# tokenizer adds one); an answer never has special tokens added.
Encoded = dict[tuple[str, bool], list[int]]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    line: int = field(default=0, compare=False)  # where it is in its task file (0: not from a file)


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    path: str = field(default="", compare=False)  # the task file


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
    where = printable(str(file))
    if not file.is_file():
        raise ConfigError(
            f"{where}: no such task file; a task is a JSONL file of {{prompt, answer}} objects, one a line"
        )
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the task file: {exc.strerror}") from None
    examples = []
    fix = 'write one {"prompt": "...", "answer": "..."} object per line'
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        row = parse_json(raw, f"{where}:{number}", error=ConfigError, fix=fix)
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("answer"), str)
        ):
            found = printable(raw[:80].decode("utf-8", "replace"))
            raise ConfigError(
                f"{where}:{number}: expected an object with string prompt and answer, found {found!r}; {fix}"
            )
        examples.append(Example(row["prompt"], row["answer"], number))
    if not examples:
        raise ConfigError(f"{where}: no examples; {fix}")
    return Task(file.stem, tuple(examples), str(file))


@contextmanager
def quiet_transformers(quiet: bool | None = None) -> Iterator[None]:
    """transformers' own progress bars and warnings held back (``quiet`` None: when stderr is not a
    terminal), restored afterwards."""
    if quiet is None:
        quiet = not sys.stderr.isatty()
    if not quiet:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_model(model: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """A model directory, Hub id, or ``base+adapter`` (the adapter's update added to the base).

    Safetensors weights are read by transformers; PyTorch ``.bin`` weights by mergesmith's own
    reader, which loads tensors only (``weights_only``). Any problem is a CheckpointError."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("evaluation needs transformers: pip install 'mergesmith[eval]'") from None
    from mergesmith import _hub
    from mergesmith.config import ModelRef

    ref = ModelRef.parse(str(model))
    where = _hub.resolve(ref.path, ref.revision)
    name = printable(str(model))
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(where)
            if any(where.glob("*.safetensors")) or not any(where.glob("*.bin")):
                net: Any = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
            else:
                net = _from_bin(where, AutoConfig, AutoModelForCausalLM)
    except MergesmithError:
        raise
    except Exception as exc:  # transformers fails in many ways on a broken or foreign directory
        first = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise CheckpointError(
            f"{name}: cannot load it as a causal language model with its tokenizer "
            f"({type(exc).__name__}: {first[:300]}); check that {where} holds config.json, the weights "
            "and the tokenizer files"
        ) from None
    if ref.lora is not None:
        from mergesmith.lora import AdaptedCheckpoint
        from mergesmith.models import open_models

        adapted = open_models([ref])[0]
        assert isinstance(adapted, AdaptedCheckpoint)
        # the base is loaded already: read only the tensors the adapter changes or replaces
        changed = dict.fromkeys([*adapted.adapter.modules, *adapted.adapter.replaced])
        state = {name: adapted.get(name).float() for name in changed}
        _missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"{model}: tensors the model does not have: {unexpected[:5]}")
    net = net.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


def _from_bin(directory: Path, auto_config: Any, auto_model: Any) -> Any:
    """The model of ``directory`` with its ``.bin`` weights read as tensors only."""
    from mergesmith.sources import Checkpoint

    source = Checkpoint(directory)
    names = source.keys()
    state = {k: source.get(k).float() for k in names}
    config = auto_config.from_pretrained(directory)
    net = auto_model.from_config(config, dtype=torch.float32)
    _missing, unexpected = net.load_state_dict(state, strict=False)
    net.tie_weights()
    given = set(state)
    absent = [n for n, _ in net.named_parameters() if n not in given]
    if unexpected or absent:
        raise CheckpointError(
            f"{printable(str(directory))}: its weights do not fit its config.json: not in the model "
            f"{unexpected[:5]}, missing {absent[:5]}; check that the weights and config.json belong together"
        )
    return net


def _continuation(text: str) -> str:
    return text.split("\n", 1)[0].strip()


Say = Callable[[str], None]


def evaluate(
    model: str | Path,
    tasks: Sequence[Task],
    *,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = defaults.DEVICE,
    progress: bool = False,
    add_special_tokens: bool = True,
    say: Say | None = None,
) -> list[TaskScore]:
    """Score ``model`` (a directory, Hub id or ``base+adapter``) on every task. ``say`` receives a
    line as each task starts."""
    net, tokenizer = load_model(model, device)
    return score(
        net,
        tokenizer,
        tasks,
        batch_size=batch_size,
        device=device,
        progress=progress,
        label=str(model),
        add_special_tokens=add_special_tokens,
        say=say,
    )


def check_examples(tokenizer: Any, tasks: Sequence[Task], add_special_tokens: bool = True) -> None:
    """Refuse an answer holding the text of one of the tokenizer's special tokens (``</s>``...):
    the text is read as that token, which greedy decoding never prints, so the example could never
    be right however well the model answers. Refuse an empty prompt the tokenizer puts no token
    in front of: the model has nothing to continue."""
    specials = sorted(
        {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        | {
            t.content
            for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
            if getattr(t, "special", False) and t.content
        },
        key=len,
        reverse=True,
    )
    memo: Encoded = {}
    for task in tasks:
        for e in task.examples:
            where = f"{printable(task.path or task.name)}:{e.line}" if e.line else printable(task.name)
            if not e.prompt and not _encode(tokenizer, e.prompt, memo, add_special_tokens):
                raise ConfigError(
                    f"{where}: the prompt is empty and the tokenizer adds no token in front of it, so "
                    "the model has nothing to continue; give the example a prompt"
                )
            hit = next((t for t in specials if t in e.answer), None)
            if hit is not None:
                raise ConfigError(
                    f"{where}: the answer {printable(e.answer[:80])!r} contains {printable(hit)!r}, the text "
                    "of one of the tokenizer's special tokens, which the evaluation never counts as "
                    "generated text; remove it from the answer (the answer ends where the model's "
                    "end-of-sequence token or a newline comes)"
                )


def score(
    net: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = defaults.DEVICE,
    progress: bool = False,
    label: str = "model",
    with_loss: bool = True,
    encoded: Encoded | None = None,
    add_special_tokens: bool = True,
    say: Say | None = None,
) -> list[TaskScore]:
    """Score a loaded model (see :func:`load_model`) on every task; without ``with_loss`` only
    accuracy is measured (loss and perplexity are NaN). ``encoded`` keeps the token ids of each
    prompt and answer between calls that score the same tasks again. ``add_special_tokens``: the
    prompts are tokenized with the special tokens the tokenizer adds (such as BOS), as the model
    saw text in training."""
    check_examples(tokenizer, tasks, add_special_tokens)
    scores = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t.examples) for t in tasks), desc=f"evaluating {label}", unit="ex")
    with torch.no_grad():
        for number, task in enumerate(tasks, start=1):
            if say is not None:
                say(f"  task {number}/{len(tasks)}: {printable(task.name)} ({len(task.examples)} examples)")
            correct = 0
            total_loss = 0.0
            total_tokens = 0
            for start in range(0, len(task.examples), batch_size):
                batch = task.examples[start : start + batch_size]
                flags, loss, tokens = judge_batch(
                    net,
                    tokenizer,
                    batch,
                    device,
                    with_loss=with_loss,
                    encoded=encoded,
                    add_special_tokens=add_special_tokens,
                )
                correct += sum(flags)
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


def judge_batch(
    net: Any,
    tokenizer: Any,
    batch: Sequence[Example],
    device: str,
    *,
    with_loss: bool = False,
    counts: dict[str, int] | None = None,
    encoded: Encoded | None = None,
    add_special_tokens: bool = True,
) -> tuple[list[bool], float, int]:
    """Whether the greedy continuation of each prompt is its answer; the summed answer loss and the
    number of answer tokens (0 and 0 without ``with_loss``).

    One forward pass over prompt + answer (teacher forcing) gives the greedy token at every answer
    position. Where the predictions follow the answer and then end it (end of sequence or a
    newline), greedy decoding would produce exactly the answer; where they leave it for text that
    no continuation can turn into the answer, it would not. Only the examples neither settles (a
    prediction that could still lead to the answer along other tokens, such as a trailing space)
    are decoded with ``generate``, under the same token budget as the whole batch. ``counts``
    receives how many examples each way settled: ``right``, ``wrong`` and ``generated``;
    ``encoded`` caches token ids by text. The prompts are tokenized with the special tokens the
    tokenizer adds in front (``add_special_tokens``; any it appends are left off, since the answer
    follows), the answers without any.
    """
    memo: Encoded = {} if encoded is None else encoded
    prompts = [_encode(tokenizer, e.prompt, memo, add_special_tokens) for e in batch]
    answers = [_encode(tokenizer, e.answer, memo, False) for e in batch]
    # prompt + answer, left-padded as generate pads prompts, with the same position ids; only the
    # last `keep` positions need logits: they predict every answer token and the one after it
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    keep = max(len(a) for a in answers) + 1
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    extra: dict[str, Any] = {}
    accepts = inspect.signature(net.forward).parameters
    if "position_ids" in accepts:  # as generate numbers left-padded prompts
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
    if "logits_to_keep" in accepts:
        extra["logits_to_keep"] = keep
    out = net(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)
    logits = out.logits[:, -keep:]
    shifted, tokens = 0.0, 0
    if with_loss:
        target = torch.full((len(rows), keep), -100, dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            # logits index keep - len(a) - 1 + j predicts a[j]; a[0] of an empty prompt has no predictor
            skip = 0 if p else 1
            if len(a) > skip:
                target[i, keep - len(a) - 1 + skip : keep - 1] = torch.tensor(a[skip:], dtype=torch.long)
        shifted = float(
            torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).to(device), reduction="sum"
            )
        )
        tokens = int((target != -100).sum())
    picks = logits.argmax(-1).cpu()
    del out, logits
    flags: list[bool | None] = []
    for i, (p, a, example) in enumerate(zip(prompts, answers, batch)):
        if not p:  # nothing to predict the first token from
            flags.append(None)
            continue
        predicted = picks[i, keep - len(a) - 1 :].tolist()
        flags.append(_settle(tokenizer, a, predicted, example.answer.strip()))
    budget = max(len(a) for a in answers) + 2
    open_ = [i for i, f in enumerate(flags) if f is None]
    if counts is not None:
        counts["right"] = counts.get("right", 0) + flags.count(True)
        counts["wrong"] = counts.get("wrong", 0) + flags.count(False)
        counts["generated"] = counts.get("generated", 0) + len(open_)
    if open_:
        generated = _generate_flags(
            net, tokenizer, [prompts[i] for i in open_], [batch[i] for i in open_], device, budget
        )
        for i, flag in zip(open_, generated):
            flags[i] = flag
    return [bool(f) for f in flags], shifted, tokens


def _encode(tokenizer: Any, text: str, memo: Encoded, special: bool = False) -> list[int]:
    ids = memo.get((text, special))
    if ids is None:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = plain
        if special:
            full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            # what the tokenizer puts in front of the text, without what it appends after it
            at = next(
                (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None
            )
            if plain and at is not None:
                ids = full[: at + len(plain)]
            else:
                eos = tokenizer.eos_token_id
                ids = full[:-1] if full and full[-1] == eos and plain[-1:] != [eos] else full
        memo[(text, special)] = ids
    return ids


def _settle(tokenizer: Any, answer: list[int], predicted: list[int], want: str) -> bool | None:
    """Right, wrong, or None when undecided, from the greedy token at each answer position and the
    one after it (``len(answer) + 1`` predictions)."""
    j = next((k for k, (got, tok) in enumerate(zip(predicted, answer)) if got != tok), len(answer))
    token = predicted[j]
    if token == tokenizer.eos_token_id:  # decoding stops here
        return _continuation(tokenizer.decode(answer[:j], skip_special_tokens=True)) == want
    text = tokenizer.decode([*answer[:j], token], skip_special_tokens=True)
    if "\n" in text:  # the continuation is cut here whatever follows
        return _continuation(text) == want
    if "\ufffd" not in text and not want.startswith(text.strip()):
        return False  # what follows can only lengthen the text, which already differs
    return None


def _generate_flags(
    net: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    batch: Sequence[Example],
    device: str,
    budget: int,
) -> list[bool]:
    """Greedy decoding of left-padded prompts for at most ``budget`` tokens, checked against the answers."""
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    out = net.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=budget,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [_continuation(t) == e.answer.strip() for t, e in zip(texts, batch)]


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
    batch_size: int = defaults.BATCH_SIZE,
    device: str = defaults.DEVICE,
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
