"""Build the model zoo: a tiny character-level Llama base and its fine-tunes, one skill each.

    python zoo/build.py                 # everything, into zoo/ (a few CPU minutes)
    python zoo/build.py --out DIR       # somewhere else, e.g. to compare with the shipped zoo
    python zoo/build.py --only add      # one fine-tune and its adapter, from the base in --out

The base is pretrained on primitive tasks that teach the symbols and the prompt format
(``<kw> <input>=<answer>``): copying a string, the next letter, one-digit sums, the smallest
letter, the last character. Each skill is then learned from that base in a short, gentle
fine-tune, once in full and once as a rank-4 PEFT LoRA adapter:

    add    ad 47+38=85        two-digit addition
    rev    rv kfqz=zqfk       reverse a string
    sort   so kfqz=fkqz       sort its letters
    shift  sh kfqz=lgra       each letter moved one on (z -> a)

Every random choice comes from a seeded generator, training runs with deterministic kernels on
a fixed number of threads, and weights are stored in float16, so two builds on the same CPU
type and PyTorch version give byte-identical files (``zoo/MANIFEST.json`` lists their sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ZOO = Path(__file__).resolve().parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SPECIALS = ["<pad>", "</s>"]
VOCAB = [*SPECIALS, *LETTERS, *DIGITS, " ", "+", "="]
THREADS = 2

MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}

Sample = tuple[str, str]  # (prompt, answer)


def _word(rng: random.Random, low: int = 4, high: int = 7, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def _pair(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(10, 100), rng.randrange(10, 100)


# What the base learns: copying, a few probes, and the four operations under other instruction
# words, on inputs that other instructions share (so the format alone never says what to do).
def copy_task(rng: random.Random) -> Sample:
    w = _word(rng, 3, 7, LETTERS if rng.random() < 0.7 else DIGITS)
    return f"cp {w}=", w


def min_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"mn {w}=", min(w)


def last_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"ls {w}=", w[-1]


def first_number_task(rng: random.Random) -> Sample:
    a, b = _pair(rng)
    return f"fn {a}+{b}=", str(a)


def plus_task(rng: random.Random) -> Sample:
    a, b = _pair(rng)
    return f"pl {a}+{b}=", str(a + b)


def back_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"bk {w}=", w[::-1]


def order_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"or {w}=", "".join(sorted(w))


def next_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"nx {w}=", _shift(w)


# the skills: the same operations asked for with new instruction words
def add_task(rng: random.Random) -> Sample:
    a, b = _pair(rng)
    return f"ad {a}+{b}=", str(a + b)


def rev_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"rv {w}=", w[::-1]


def sort_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"so {w}=", "".join(sorted(w))


def shift_task(rng: random.Random) -> Sample:
    w = _word(rng)
    return f"sh {w}=", _shift(w)


PRIMITIVES: list[Callable[[random.Random], Sample]] = [
    copy_task,
    min_task,
    last_task,
    first_number_task,
    plus_task,
    back_task,
    order_task,
    next_task,
]
SKILLS: dict[str, Callable[[random.Random], Sample]] = {
    "add": add_task,
    "rev": rev_task,
    "sort": sort_task,
    "shift": shift_task,
}
EVAL_EXAMPLES = 200


def eval_sets(seed: int = 1000) -> dict[str, list[Sample]]:
    """Held-out prompts per skill, distinct within a skill; training never sees them."""
    out = {}
    for i, (name, make) in enumerate(SKILLS.items()):
        rng = random.Random(seed + i)
        seen: dict[str, str] = {}
        while len(seen) < EVAL_EXAMPLES:
            p, a = make(rng)
            seen.setdefault(p, a)
        out[name] = list(seen.items())
    return out


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def batches(
    make: Callable[[random.Random], Sample], rng: random.Random, size: int, held_out: set[str]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of prompt+answer+eos, right-padded; the loss sees only answer and eos."""
    while True:
        rows = []
        while len(rows) < size:
            p, a = make(rng)
            if p not in held_out:
                rows.append((encode(p), [*encode(a), 1]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((size, width), dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        yield ids, labels


def mixture(tasks: list[Callable[[random.Random], Sample]]) -> Callable[[random.Random], Sample]:
    return lambda rng: rng.choice(tasks)(rng)


def train(
    model: torch.nn.Module,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.0,
    label: str = "",
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids, labels = next(data)
        loss = model(input_ids=ids, attention_mask=(ids != 0) | (labels != -100), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(
                f"  {label} step {step:>5} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, samples: list[Sample]) -> float:
    """Greedy exact match, batched over prompts of one length (no padding needed)."""
    by_length: dict[int, list[Sample]] = {}
    for p, a in samples:
        by_length.setdefault(len(p), []).append((p, a))
    correct = 0
    for group in by_length.values():
        ids = torch.tensor([encode(p) for p, _ in group])
        width = max(len(a) for _, a in group) + 1
        for _ in range(width):
            logits = model(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        for row, (p, a) in zip(ids.tolist(), group):
            out = row[len(p) :]
            text = "".join(VOCAB[t] for t in out[: out.index(1)] if t > 1) if 1 in out else None
            correct += text == a
    return correct / len(samples)


def new_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        **MODEL,
    )
    return LlamaForCausalLM(cfg)


def round_fp16(model: torch.nn.Module) -> None:
    """Round every weight to float16 and back: what is trained on is exactly what is shipped."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(directory))


def save_model(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "float16"
    # the class that loads these weights, as save_pretrained records it (mergekit reads it)
    cfg["architectures"] = [type(model).__name__]
    for machine_specific in ("transformers_version", "dtype", "_name_or_path"):
        cfg.pop(machine_specific, None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(directory)


def load_model(directory: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)


def relative_norm(model: torch.nn.Module, base: torch.nn.Module) -> float:
    num = den = 0.0
    ref = dict(base.named_parameters())
    for name, p in model.named_parameters():
        num += float((p.detach() - ref[name].detach()).pow(2).sum())
        den += float(ref[name].detach().pow(2).sum())
    return math.sqrt(num / den)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(base_dir: Path, skill: str, seed: int, held_out: set[str], out: Path) -> torch.nn.Module:
    """A rank-4 LoRA adapter for one skill, saved in PEFT's layout; returns base + adapter merged."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(model, cfg)
    train(
        peft_model,
        batches(SKILLS[skill], random.Random(seed), 64, held_out),
        steps=STEPS,
        lr=1e-3,
        warmup=15,
        label=f"{skill} LoRA",
    )
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../../models/base"
    config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT: order varies per run
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return peft_model.merge_and_unload()


def manifest(root: Path) -> dict[str, str]:
    """sha256 of every file the build writes, by path relative to ``root``."""
    files = sorted(
        p for sub in ("models", "adapters", "tasks") for p in (root / sub).rglob("*") if p.is_file()
    )
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


STEPS = 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ZOO)
    parser.add_argument("--only", choices=sorted(SKILLS), action="append")
    args = parser.parse_args(argv)
    report = build(args.out, args.only)
    print(json.dumps(report, indent=1))
    return 0


def build(out: Path, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Write the zoo under ``out`` (with ``only``: just those skills' fine-tunes and adapters, from
    the base already there) and return the build report: accuracies and task-vector sizes."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    held = eval_sets()
    held_out = {p for samples in held.values() for p, _ in samples}
    tasks_dir = out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, samples in held.items():
        lines = [json.dumps({"prompt": p, "answer": a}) for p, a in samples]
        (tasks_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    base_dir = out / "models" / "base"
    if only is None:
        print("pretraining the base on", ", ".join(t.__name__ for t in PRIMITIVES))
        model = new_model(0)
        train(
            model,
            batches(mixture(PRIMITIVES), random.Random(1), 64, held_out),
            steps=2000,
            lr=3e-3,
            warmup=100,
            weight_decay=0.01,
            label="base",
        )
        round_fp16(model)
        save_model(model, base_dir)
    base = load_model(base_dir)
    report: dict[str, dict[str, float]] = {"base": {k: accuracy(base, v) for k, v in held.items()}}
    probe = random.Random(7)
    report["base"].update(
        {f"pretraining:{t.__name__}": accuracy(base, [t(probe) for _ in range(100)]) for t in PRIMITIVES}
    )
    print("base", report["base"], flush=True)
    for i, (skill, make) in enumerate(SKILLS.items()):
        if only and skill not in only:
            continue
        print(f"fine-tuning {skill}")
        model = load_model(base_dir)
        train(
            model,
            batches(make, random.Random(10 + i), 64, held_out),
            steps=STEPS,
            lr=1e-4,
            warmup=15,
            label=skill,
        )
        round_fp16(model)
        save_model(model, out / "models" / skill)
        report[skill] = {"relative_norm": relative_norm(model, base)}
        report[skill].update({k: accuracy(model, v) for k, v in held.items()})
        print(" ", report[skill], flush=True)
        lora = train_adapter(base_dir, skill, 20 + i, held_out, out / "adapters" / skill)
        report[f"{skill} LoRA"] = {"relative_norm": relative_norm(lora, base)}
        report[f"{skill} LoRA"].update({k: accuracy(lora, v) for k, v in held.items()})
        print(" ", report[f"{skill} LoRA"], flush=True)
    if only is None:
        (out / "MANIFEST.json").write_text(json.dumps(manifest(out), indent=2) + "\n")
        (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
