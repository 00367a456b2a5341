"""Vocabularies that differ by added tokens: rows matched by token, the tokenizer to match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import CompatibilityError
from tests import tiny

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def with_tokens(
    directory: Path, base_dir: Path, state: dict[str, torch.Tensor], added: list[str], seed: int
) -> Path:
    """A fine-tune of the base whose tokenizer adds ``added`` tokens, with new embedding rows."""
    from transformers import AutoTokenizer

    gen = torch.Generator().manual_seed(seed)
    state = tiny.finetune(state, seed)
    for name in (EMBED, HEAD):
        extra = torch.randn(len(added), state[name].shape[1], generator=gen)
        state[name] = torch.cat([state[name], extra])
    config = json.loads((base_dir / "config.json").read_text())
    config["vocab_size"] = len(tiny.VOCAB) + len(added)
    tiny.save(directory, state, config)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(added, special_tokens=True)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base, cfg = tiny.llama_state(7)
    base_dir = tiny.save(root / "base", base, cfg, tokenizer=True)
    return {
        "base": base_dir,
        "code": with_tokens(root / "code", base_dir, base, ["<code>"], 1),
        "chat": with_tokens(root / "chat", base_dir, base, ["<chat>", "<tool>"], 2),
    }


def task_arithmetic(models: dict[str, Path], source: str) -> str:
    return (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 0.4}}\n"
        f"tokenizer_source: {source}\ndtype: float32\n"
    )


def test_different_vocabularies_without_tokenizer_source_are_refused(models: dict[str, Path]) -> None:
    text = task_arithmetic(models, "base").replace("tokenizer_source: base\n", "")
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(text)
    message = str(info.value)
    assert "vocab_size: " in message and "Set tokenizer_source" in message


def test_union_aligns_rows_by_token(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "union"
    mergesmith.merge(task_arithmetic(models, "union"), out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.get_vocab()
    states = {k: tiny.load_state(v) for k, v in models.items()}
    vocabs = {k: AutoTokenizer.from_pretrained(v).get_vocab() for k, v in models.items()}
    merged = tiny.load_state(out)
    n = len(tiny.VOCAB) + 3
    assert merged[EMBED].shape[0] == n == len(ids)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n
    assert sorted(ids.values()) == list(range(n))
    weights = {"code": 0.7, "chat": 0.4}
    for name in (EMBED, HEAD):
        base_rows = states["base"][name].numpy()
        for token, row in ids.items():
            if token not in vocabs["base"]:
                # only one model has it: every model takes that model's row (mergekit's rule)
                (holder,) = [m for m in weights if token in vocabs[m]]
                expected = states[holder][name].numpy()[vocabs[holder][token]]
                np.testing.assert_allclose(merged[name][row].numpy(), expected, rtol=1e-5, atol=1e-6)
                continue
            b = base_rows[vocabs["base"][token]]
            expected = b + sum(
                w * (states[m][name].numpy()[vocabs[m][token]] - b) for m, w in weights.items()
            )
            np.testing.assert_allclose(
                merged[name][row].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=token
            )
    # other tensors: plain task arithmetic
    q = "model.layers.1.self_attn.q_proj.weight"
    b = states["base"][q].numpy()
    expected_q = b + sum(w * (states[m][q].numpy() - b) for m, w in weights.items())
    np.testing.assert_allclose(merged[q].numpy(), expected_q, rtol=1e-5, atol=1e-6)
    assert tok.convert_ids_to_tokens(tok("a<tool>b")["input_ids"]) == ["a", "<tool>", "b"]
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[ids["<code>"], ids["<chat>"], ids["a"]]])).logits
    assert logits.shape == (1, 3, n)


def test_one_models_tokenizer_keeps_its_rows(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "code-vocab"
    mergesmith.merge(task_arithmetic(models, str(models["code"])), out)
    merged = tiny.load_state(out)
    states = {k: tiny.load_state(v) for k, v in models.items()}
    n = len(tiny.VOCAB) + 1
    assert merged[EMBED].shape[0] == n
    assert (out / "tokenizer.json").read_bytes() == (models["code"] / "tokenizer.json").read_bytes()
    # <code> (row n - 1): only the code model has it, so every model takes its row there
    expected = states["code"][EMBED].numpy()[n - 1]
    np.testing.assert_allclose(merged[EMBED][n - 1].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_base_tokenizer_drops_the_added_tokens(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "base-vocab"
    mergesmith.merge(task_arithmetic(models, "base"), out)
    merged = tiny.load_state(out)
    states = {k: tiny.load_state(v) for k, v in models.items()}
    assert merged[EMBED].shape[0] == len(tiny.VOCAB)
    b = states["base"][HEAD].numpy()
    expected = b + sum(
        w * (states[m][HEAD].numpy()[: len(tiny.VOCAB)] - b) for m, w in [("code", 0.7), ("chat", 0.4)]
    )
    np.testing.assert_allclose(merged[HEAD].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_linear_union_averages_each_token_over_the_models_that_have_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "linear"
    mergesmith.merge(
        f"merge_method: linear\nmodels:\n  - model: {models['code']}\n    parameters: {{weight: 3}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n",
        out,
    )
    ids = AutoTokenizer.from_pretrained(out).get_vocab()
    merged = tiny.load_state(out)
    code, chat = tiny.load_state(models["code"])[EMBED], tiny.load_state(models["chat"])[EMBED]
    code_ids = AutoTokenizer.from_pretrained(models["code"]).get_vocab()
    chat_ids = AutoTokenizer.from_pretrained(models["chat"]).get_vocab()
    torch.testing.assert_close(merged[EMBED][ids["a"]], (3 * code[code_ids["a"]] + chat[chat_ids["a"]]) / 4)
    torch.testing.assert_close(merged[EMBED][ids["<code>"]], code[code_ids["<code>"]])
    torch.testing.assert_close(merged[EMBED][ids["<tool>"]], chat[chat_ids["<tool>"]])


def test_same_size_but_different_token_ids_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(models["base"], moved)
    data = json.loads((moved / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (moved / "tokenizer.json").write_text(json.dumps(data))
    text = f"merge_method: linear\nmodels:\n  - model: {models['base']}\n  - model: {moved}\nparameters: {{weight: 1}}\n"
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(text)
    assert str(info.value).startswith(
        f"tokenizers differ: 'a' is token {vocab['b']} in {models['base']} ({models['base'] / 'tokenizer.json'}) "
        f"but {vocab['a']} in {moved} ({moved / 'tokenizer.json'}), and 1 more"
    )


def test_tied_embeddings_are_aligned_once(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = {}
    for name in ("base", "code", "chat"):
        state = tiny.load_state(models[name])
        del state[HEAD]
        config = json.loads((models[name] / "config.json").read_text())
        config["tie_word_embeddings"] = True
        tied[name] = tiny.save(tmp_path / name, state, config)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (models[name] / f).is_file():
                (tied[name] / f).write_bytes((models[name] / f).read_bytes())
    out = tmp_path / "out"
    mergesmith.merge(task_arithmetic(tied, "union"), out)
    merged = tiny.load_state(out)
    assert HEAD not in merged
    ids = AutoTokenizer.from_pretrained(out).get_vocab()
    code = tiny.load_state(tied["code"])[EMBED]
    code_ids = AutoTokenizer.from_pretrained(tied["code"]).get_vocab()
    torch.testing.assert_close(merged[EMBED][ids["<code>"]], code[code_ids["<code>"]])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.lm_head.weight.shape[0] == len(ids)


def test_diagnose_reports_added_tokens_and_the_rows_to_align_or_fill(models: dict[str, Path]) -> None:
    from mergesmith.diagnose import diagnose

    found = diagnose(task_arithmetic(models, "union"))
    n = len(tiny.VOCAB)
    base, code, chat = (str(models[k]) for k in ("base", "code", "chat"))
    # the union's rows: the base's n tokens, then <code>, <chat>, <tool> in order of appearance
    assert found.vocab_rows == n + 3
    assert found.vocabulary[base] == {"tokens": n, "aligned": 0, "filled": 3}
    assert found.vocabulary[code] == {
        "tokens": n + 1,
        "adds": 1,
        "added_examples": ["<code>"],
        "lacks": 0,
        "moved": 0,
        "aligned": 0,
        "filled": 2,
    }  # <code> keeps row n; it lacks <chat> and <tool>
    assert found.vocabulary[chat] == {
        "tokens": n + 2,
        "adds": 2,
        "added_examples": ["<chat>", "<tool>"],
        "lacks": 0,
        "moved": 0,
        "aligned": 2,  # <chat> and <tool> move from rows n, n+1 to n+1, n+2
        "filled": 1,  # it lacks <code>
    }
    lines = "\n".join(found.vocabulary_lines())
    assert f"{chat}: {n + 2} tokens, adds 2 the base lacks ('<chat>', '<tool>')" in lines
    assert (
        "2 of its rows move to their token's output row, 1 output rows it lacks come from the others" in lines
    )
