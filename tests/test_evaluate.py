"""Evaluation: exact-match accuracy and answer loss, checked on models whose behaviour is known."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mergesmith import ConfigError
from mergesmith.cli import main
from mergesmith.evaluate import evaluate, load_task
from tests import tiny


def write_task(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    state, cfg = tiny.llama_state(8)
    silent = dict(state)
    silent["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])  # every logit 0
    return {
        "random": tiny.save(root / "random", state, cfg, tokenizer=True),
        "silent": tiny.save(root / "silent", silent, cfg, tokenizer=True),
    }


def test_uniform_model_scores_exactly(models: dict[str, Path], tmp_path: Path) -> None:
    # All logits are 0: greedy decoding picks token 0 (<pad>, special, decoded as nothing), so only
    # empty answers match; every answer token costs log(vocab size).
    rows = [("abc", ""), ("ab", "c"), ("b", ""), ("xyz", "ab"), ("a", "")]
    (score,) = evaluate(models["silent"], [load_task(write_task(tmp_path / "t.jsonl", rows))], batch_size=2)
    assert score.task == "t" and score.examples == 5
    assert score.accuracy == pytest.approx(3 / 5)
    assert score.loss == pytest.approx(math.log(len(tiny.VOCAB)), rel=1e-6)
    assert score.perplexity == pytest.approx(len(tiny.VOCAB), rel=1e-5)


def test_batched_loss_equals_one_example_at_a_time(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [("abc", "de"), ("a", "bcdef"), ("hello", "x"), ("ba", "ab")]
    task = load_task(write_task(tmp_path / "t.jsonl", rows))
    batched = evaluate(models["random"], [task], batch_size=3)[0]
    net = AutoModelForCausalLM.from_pretrained(models["random"])
    tok = AutoTokenizer.from_pretrained(models["random"])
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in rows:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(net(torch.tensor([p + a])).logits[0], -1)
            for j, t in enumerate(a):
                total -= float(logp[len(p) + j - 1, t])
                count += 1
    assert batched.loss == pytest.approx(total / count, rel=1e-5)


def test_batched_loss_of_a_model_with_absolute_positions_equals_one_at_a_time(tmp_path: Path) -> None:
    # GPT-2 adds a learned embedding per position: the left-padded batch must number each row's
    # tokens from 0, as generate does, or every logit changes.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny.VOCAB), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tiny.save_tokenizer(tmp_path / "gpt2")
    rows = [("abcdefgh", "ij"), ("a", "bcd"), ("hello", "x"), ("ba", "abcde")]
    task = load_task(write_task(tmp_path / "t.jsonl", rows))
    batched = evaluate(tmp_path / "gpt2", [task], batch_size=4)[0]
    net = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in rows:
            p = [tiny.VOCAB.index(c) for c in prompt]
            a = [tiny.VOCAB.index(c) for c in answer]
            logp = torch.log_softmax(net(torch.tensor([p + a])).logits[0], -1)
            total -= sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(a))
            count += len(a)
    assert batched.loss == pytest.approx(total / count, rel=1e-5)


def test_task_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: expected an object with string prompt and answer"):
        load_task(bad)
    with pytest.raises(ConfigError, match="no such task file"):
        load_task(tmp_path / "missing.jsonl")


def test_cli_eval_prints_and_writes_json(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task(tmp_path / "empty.jsonl", [("ab", ""), ("cd", "")])
    out = tmp_path / "scores.json"
    assert main(["eval", str(models["silent"]), "--tasks", str(task), "--json", str(out)]) == 0
    assert "empty" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["accuracy"] == 1.0


class FakeHarness:
    """Stands in for the ``lm_eval`` package: records the call, returns results in its format."""

    def __init__(self, results: dict[str, dict[str, object]]) -> None:
        self.results = results
        self.calls: list[dict[str, object]] = []

    def simple_evaluate(self, **kwargs: object) -> dict[str, object]:
        self.calls.append(kwargs)
        return {"results": self.results, "n-samples": {t: {"effective": 50} for t in self.results}}


def test_harness_scores_read_the_primary_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mergesmith.evaluate import evaluate_harness

    fake = FakeHarness(
        {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.61, "acc_norm,none": 0.57},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01},
        }
    )
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    scores = evaluate_harness("org/base@v1+org/adapter", ["arc_easy", "gsm8k"], batch_size=8, limit=50)
    assert [(s.task, s.accuracy, s.examples) for s in scores] == [("arc_easy", 0.57, 50), ("gsm8k", 0.25, 50)]
    assert math.isnan(scores[0].loss)
    (call,) = fake.calls
    assert call["model"] == "hf" and call["tasks"] == ["arc_easy", "gsm8k"] and call["limit"] == 50
    assert call["model_args"] == "pretrained=org/base,dtype=float32,revision=v1,peft=org/adapter"


def test_harness_without_a_usable_metric_or_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mergesmith.evaluate import evaluate_harness

    monkeypatch.setitem(sys.modules, "lm_eval", FakeHarness({"odd": {"bleu,none": 3.0}}))
    with pytest.raises(ConfigError, match=r"task 'odd': none of the metrics .* \(found \['bleu,none'\]\)"):
        evaluate_harness("m", ["odd"])
    with pytest.raises(ConfigError, match="no results for task 'other'"):
        evaluate_harness("m", ["other"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as when not installed
    with pytest.raises(ConfigError, match=r"pip install 'mergesmith\[lm-eval\]'"):
        evaluate_harness("m", ["odd"])


def test_one_forward_pass_judges_every_example_as_greedy_decoding_does() -> None:
    # The zoo's fine-tunes and base, and an even mix of two of them, on every zoo task; plus the
    # addition task with a space before each answer, which the teacher-forced pass cannot settle
    # (the model answers without the space, and the space could still come) and hands to generate.
    from mergesmith.evaluate import Example, _generate_flags, judge_batch, load_model

    root = Path(__file__).resolve().parent.parent / "zoo"
    tasks = [load_task(root / "tasks" / f"{t}.jsonl") for t in ("add", "rev", "sort", "shift")]
    spaced = [Example(e.prompt, " " + e.answer) for e in tasks[0].examples[:64]]
    add, tok = load_model(root / "models" / "add")
    rev, _ = load_model(root / "models" / "rev")
    base, _ = load_model(root / "models" / "base")
    mix, _ = load_model(root / "models" / "add")
    mix.load_state_dict({k: (v + rev.state_dict()[k]) / 2 for k, v in add.state_dict().items()})
    counts: dict[str, int] = {}
    right = 0
    with torch.no_grad():
        for net in (add, rev, base, mix):
            for batch in [*(t.examples[i : i + 50] for t in tasks for i in range(0, 200, 50)), spaced]:
                flags, _, _ = judge_batch(net, tok, batch, "cpu", counts=counts)
                prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
                budget = max(len(tok(e.answer, add_special_tokens=False)["input_ids"]) for e in batch) + 2
                assert flags == _generate_flags(net, tok, prompts, batch, "cpu", budget)
                right += sum(flags)
    assert counts["right"] > 300 and counts["wrong"] > 1000 and counts["generated"] >= 64
    assert counts["right"] + counts["wrong"] + counts["generated"] == 4 * (800 + 64)
    assert right > counts["right"]  # some of those generate settled were right


class _ChainModel:
    """A stand-in causal LM whose greedy next token depends on the last token alone (``table``):
    ``forward`` and ``generate`` follow the interface the evaluation calls."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        logits = torch.nn.functional.one_hot(self.table[input_ids], len(self.table)).float()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    __call__ = forward

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, pad_token_id: int, eos_token_id: int, **_: Any
    ) -> torch.Tensor:
        rows = []
        for row in input_ids.tolist():
            new: list[int] = []
            while len(new) < max_new_tokens and (not new or new[-1] != eos_token_id):
                new.append(int(self.table[(new or row)[-1]]))
            rows.append(row + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_one_pass_verdicts_equal_generate_with_a_byte_level_bpe_tokenizer() -> None:
    # Byte-level BPE splits characters across tokens and spells one text several ways; answers are
    # built from each prompt's own greedy continuation: as generated (right), re-spaced, cut short,
    # lengthened, or the same text in other tokens (which generate may still produce).
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mergesmith.evaluate import Example, _generate_flags, judge_batch

    corpus = [
        "the cat sat, isn't it?",
        "café crème brûlée",
        "数字 中文",
        "hello\nworld\n",
        "ab abc 🙂 12+34=46",
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>"], initial_alphabet=alphabet),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    size = len(tok)
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    rng = random.Random(0)
    table = torch.tensor([rng.randrange(2, size) for _ in range(size)])
    for t in rng.sample(range(2, size), size // 4):
        table[t] = tok.eos_token_id
    for t in rng.sample(range(2, size), size // 8):
        table[t] = newline
    # after "zz" the model spells "é" byte by byte, where the tokenizer has "é" as one token: the
    # one pass sees a half character and must leave the verdict to generate
    split = tok.convert_tokens_to_ids(["Ã", "©"])  # the bytes C3 A9 of "é"
    assert tok("é", add_special_tokens=False)["input_ids"] != split
    table[tok("zz", add_special_tokens=False)["input_ids"][-1]] = split[0]
    table[split[0]], table[split[1]] = split[1], tok.eos_token_id
    net = _ChainModel(table)
    texts = ["zz", "the ", "café", "数字", "ab", "12+", "isn't", "🙂", "crème b", "hello\n", "sat, "]
    examples = []
    for prompt in texts:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        (said,) = tok.batch_decode(net.generate(torch.tensor([ids]), 6, 0, tok.eos_token_id)[:, len(ids) :])
        said = said.replace("</s>", "").replace("<pad>", "").split("\n")[0]
        variants = [said, said.strip(), " " + said, said + " ", said[:-1], said + "x", said[1:], "q" + said]
        for answer in dict.fromkeys(variants):
            if answer.strip():
                examples.append(Example(prompt, answer))
    counts: dict[str, int] = {}
    right = 0
    with torch.no_grad():
        for start in range(0, len(examples), 7):
            batch = examples[start : start + 7]
            flags, _, _ = judge_batch(net, tok, batch, "cpu", counts=counts)
            prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
            budget = max(len(tok(e.answer, add_special_tokens=False)["input_ids"]) for e in batch) + 2
            assert flags == _generate_flags(net, tok, prompts, batch, "cpu", budget), batch
            right += sum(flags)
            if start == 0:
                assert batch[0] == Example("zz", "é") and flags[0]
    # every way of settling is taken, and generate finds right answers the one pass could not settle
    assert min(counts.values()) >= 4 and right > counts["right"], (counts, right)


def bos_model(directory: Path) -> Path:
    """A tiny Llama whose tokenizer puts <s> in front of every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    state, cfg = tiny.llama_state(3)
    tiny.save(directory, state, cfg)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tiny.VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(str(directory))
    return directory


def test_prompts_start_with_the_bos_token_the_tokenizer_adds_and_only_the_answer_is_scored(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from mergesmith.evaluate import Example, judge_batch, load_model

    model = bos_model(tmp_path / "bos")
    rows = [("abc", "de"), ("a", "bcdef"), ("hello", "x"), ("ba", "ab")]
    task = load_task(write_task(tmp_path / "t.jsonl", rows))
    net = AutoModelForCausalLM.from_pretrained(model).eval()

    def loss(bos: list[int]) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for prompt, answer in rows:
                p = bos + [tiny.VOCAB.index(c) for c in prompt]
                a = [tiny.VOCAB.index(c) for c in answer]
                logp = torch.log_softmax(net(torch.tensor([p + a])).logits[0], -1)
                total -= sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(a))
                count += len(a)
        return total / count

    with_bos, without = loss([1]), loss([])
    assert abs(with_bos - without) > 1e-3  # the test can tell the two apart
    assert evaluate(model, [task], batch_size=3)[0].loss == pytest.approx(with_bos, rel=1e-5)
    plain = evaluate(model, [task], batch_size=3, add_special_tokens=False)[0]
    assert plain.loss == pytest.approx(without, rel=1e-5)
    # every answer token is scored, and nothing else (not the BOS token, not an appended token)
    loaded, tok = load_model(model)
    examples = [Example(p, a) for p, a in rows]
    with torch.no_grad():
        _, _, tokens = judge_batch(loaded, tok, examples, "cpu", with_loss=True)
    assert tokens == sum(len(a) for _, a in rows)
    # the command line: on by default, --no-add-special-tokens turns it off
    for flag, want in (([], with_bos), (["--no-add-special-tokens"], without)):
        out = tmp_path / "scores.json"
        assert main(["eval", str(model), "--tasks", str(task.path), "--json", str(out), *flag]) == 0
        assert json.loads(out.read_text())[0]["loss"] == pytest.approx(want, rel=1e-5)
    # an empty prompt: the BOS token is all the model continues from; without it, nothing is
    empty = load_task(write_task(tmp_path / "empty.jsonl", [("ab", "c"), ("", "x")]))
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.tensor([[1, tiny.VOCAB.index("x")]])).logits[0], -1)
    got = evaluate(model, [load_task(write_task(tmp_path / "e.jsonl", [("", "x")]))])[0]
    assert got.loss == pytest.approx(-float(logp[0, tiny.VOCAB.index("x")]), rel=1e-5)
    with pytest.raises(
        ConfigError, match=r"empty\.jsonl:2: the prompt is empty and the tokenizer adds no token"
    ):
        evaluate(model, [empty], add_special_tokens=False)


def test_an_answer_holding_a_special_tokens_text_is_refused_with_its_file_and_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "</s>" in an answer is read as the end-of-sequence token, which decoding never prints: the
    # example could never be right, and its loss would look perfect
    task = write_task(tmp_path / "eos.jsonl", [("ab", "c"), ("ab", "cd</s>")])
    with pytest.raises(ConfigError) as info:
        evaluate(models["random"], [load_task(task)])
    message = str(info.value)
    assert f"{task}:2: the answer 'cd</s>' contains '</s>'" in message
    assert "remove it from the answer" in message
    assert main(["eval", str(models["random"]), "--tasks", str(task)]) == 1
    err = capsys.readouterr().err
    assert f"error: {task}:2: the answer 'cd</s>' contains '</s>'" in err and "Traceback" not in err


class _Boom:
    """Would run code when unpickled without weights_only."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("unpickled",))


def test_eval_reads_bin_weights_as_tensors_only_and_refuses_other_pickles(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, cfg = tiny.llama_state(8)
    good = tiny.save(tmp_path / "bin", state, cfg, fmt="bin", tokenizer=True)
    task = write_task(tmp_path / "t.jsonl", [("abc", "de"), ("a", "bcd")])
    loaded = load_task(task)
    assert evaluate(good, [loaded]) == evaluate(models["random"], [loaded])  # same weights, same scores
    bad = tiny.save(tmp_path / "pickle", state, cfg, tokenizer=True)
    (bad / "model.safetensors").unlink()
    torch.save({"model.norm.weight": _Boom()}, bad / "pytorch_model.bin")
    assert main(["eval", str(bad), "--tasks", str(task)]) == 1
    captured = capsys.readouterr()
    assert f"error: {bad / 'pytorch_model.bin'}: refused to load" in captured.err
    assert "convert the checkpoint to safetensors" in captured.err
    assert "Traceback" not in captured.err and "unpickled" not in captured.out


def test_eval_of_a_missing_path_or_an_uncached_hub_id_offline_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    task = write_task(tmp_path / "t.jsonl", [("abc", "de")])
    missing = tmp_path / "nowhere"
    assert main(["eval", str(missing), "--tasks", str(task)]) == 1
    err = capsys.readouterr().err
    assert f"error: {missing}: no such directory" in err and "check the path" in err
    assert "Traceback" not in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "nobody-here/no-such-model", "--tasks", str(task)]) == 1
    err = capsys.readouterr().err
    assert "error: nobody-here/no-such-model: not a local directory, and not in the Hugging Face cache" in err
    assert "download it first or give a local path" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["eval", "m", "--tasks", "t.jsonl", "--batch-size", "0"],
            "argument --batch-size: must be at least 1, got 0",
        ),
        (["eval", "m", "--lm-eval", "x", "--limit", "-1"], "argument --limit: must be at least 1, got -1"),
        (
            ["eval", "m", "--tasks", "t.jsonl", "--threads", "0"],
            "argument --threads: must be at least 1, got 0",
        ),
        (
            ["compare", "--tasks", "t", "--parents", "a", "--merged", "b", "--batch-size", "0"],
            "must be at least 1",
        ),
        (
            ["tune", "c.yml", "--tasks", "t", "--threads", "two"],
            "expected a whole number of at least 1, got 'two'",
        ),
        (["merge", "c.yml", "out", "--eval", "t", "--batch-size", "-3"], "must be at least 1, got -3"),
    ],
)
def test_counts_below_one_are_refused_by_the_command_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a", "answer": "b"}\n\n{"prompt": "a", "answer": \n', "t.jsonl:3: not valid JSON"),
        (
            b'{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n',
            "t.jsonl:2: expected an object with string prompt",
        ),
        (b'{"prompt": "a", "answer": 3}\n', "t.jsonl:1: expected an object with string prompt and answer"),
        (b'{"prompt": "\xff", "answer": "b"}\n', "t.jsonl:1: not UTF-8 text"),
        (b"[" * 100000 + b"]" * 100000 + b"\n", "t.jsonl:1: JSON nested too deeply"),
        (b'{"prompt": "a", "answer": "b", "n": ' + b"9" * 5000 + b"}\n", "t.jsonl:1: holds an integer"),
    ],
)
def test_task_file_errors_name_the_file_and_line(
    content: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "t.jsonl"
    task.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_task(task)
    assert main(["eval", str(tmp_path / "model"), "--tasks", str(task)]) == 1
    err = capsys.readouterr().err
    assert str(task) in err and "Traceback" not in err
    assert 'one {"prompt": "...", "answer": "..."} object per line' in err


def test_eval_says_which_model_and_task_it_is_on_and_transformers_stays_quiet(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    from mergesmith.evaluate import quiet_transformers

    first = write_task(tmp_path / "first.jsonl", [("ab", "")])
    second = write_task(tmp_path / "second.jsonl", [("ab", ""), ("cd", "e")])
    assert main(["eval", str(models["silent"]), "--tasks", str(first), str(second)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"model 1/1: {models['silent']}",
        "  task 1/2: first (1 examples)",
        "  task 2/2: second (2 examples)",
    ]
    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_transformers(True):
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == before and hf_logging.is_progress_bar_enabled() == bars


def test_eval_json_to_an_unwritable_path_is_one_clear_error(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task(tmp_path / "t.jsonl", [("ab", "")])
    target = tmp_path / "no-such-dir" / "scores.json"
    assert main(["eval", str(models["silent"]), "--tasks", str(task), "--json", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"error: {target}: cannot write: No such file or directory (errno 2 ENOENT)" in err
    assert "create it or choose another path" in err and "Traceback" not in err


def test_evaluation_reads_models_without_the_planner() -> None:
    import os
    import subprocess
    import sys

    import mergesmith

    root = str(Path(mergesmith.__file__).parents[1])  # this checkout's package, not an installed one
    env = {**os.environ, "PYTHONPATH": root}
    code = (
        "import sys, mergesmith.evaluate, mergesmith.models, mergesmith.lora; "
        "print('mergesmith.plan' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
