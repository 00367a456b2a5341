"""The tokenizer: section (source, tokens, pad_to_multiple_of) and chat templates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError
from tests import tiny
from tests.test_vocab import EMBED, HEAD, with_tokens

V = len(tiny.VOCAB)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toksec")
    base, cfg = tiny.llama_state(11)
    base_dir = tiny.save(root / "base", base, cfg, tokenizer=True)
    return {
        "base": base_dir,
        "code": with_tokens(root / "code", base_dir, base, ["<code>"], 1),
        "code2": with_tokens(root / "code2", base_dir, base, ["<code>"], 3),
        "chat": with_tokens(root / "chat", base_dir, base, ["<chat>", "<tool>"], 2),
    }


def rows(directory: Path, name: str) -> np.ndarray:
    return tiny.load_state(directory)[name].numpy().astype(np.float64)


def test_tokens_sources_force_and_padding_follow_mergekit(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forced, donor = tiny.VOCAB[5], tiny.VOCAB[6]
    text = (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 0.4}}\n"
        "dtype: float32\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        "    <tool>:\n      source: {kind: zero}\n"
        f"    {forced}:\n      source: {{kind: model_token, model: {models['base']}, token: {donor}}}\n"
        "      force: true\n"
        f"    <new>:\n      source: {{kind: model_token, model: {models['chat']}, token: <chat>}}\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    n = V + 4  # the base's tokens, <code>, <chat>, <tool>, then <new>
    padded = 40
    assert json.loads((out / "config.json").read_text())["vocab_size"] == padded
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.get_vocab()
    assert [ids[t] for t in ("<code>", "<chat>", "<tool>", "<new>")] == [V, V + 1, V + 2, V + 3]
    assert tok("a<new>b")["input_ids"] == [ids["a"], V + 3, ids["b"]]
    assert tok.convert_ids_to_tokens(tok("<tool><code>")["input_ids"]) == ["<tool>", "<code>"]
    for name in (EMBED, HEAD):
        b, c, h = (rows(models[k], name) for k in ("base", "code", "chat"))
        merged = tiny.load_state(out)[name].numpy()
        assert merged.shape == (padded, 32)
        expected = np.empty((n, 32))
        # tokens every model has: task arithmetic row by row
        expected[:V] = b + 0.7 * (c[:V] - b) + 0.4 * (h[:V] - b)
        # forced: every model takes the base's row for another token, so the task vectors vanish
        expected[5] = b[6]
        # <code>, <chat>: one model has it, so every model takes that model's row
        expected[V] = c[V]
        expected[V + 1] = h[V]
        # <tool>: a zero row where it is missing (base, code); chat keeps its own row
        expected[V + 2] = 0.4 * h[V + 1]
        # <new>: no model has it; every model takes chat's row for <chat>
        expected[V + 3] = h[V]
        np.testing.assert_allclose(merged[:n], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        # padding: each model's rows past the tokens are the mean of its token rows
        np.testing.assert_allclose(
            merged[n:], np.broadcast_to(expected.mean(0), (padded - n, 32)), rtol=1e-5, atol=1e-6
        )
    net = AutoModelForCausalLM.from_pretrained(out)
    assert net(torch.tensor([[V + 3, ids["a"]]])).logits.shape == (1, 2, padded)


def test_one_models_vocabulary_with_a_new_token_and_a_forced_one(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    mergesmith.merge(
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 0.4}}\n"
        f"dtype: float32\ntokenizer:\n  source: {models['chat']}\n  tokens:\n"
        f"    <new>: {{source: {{kind: model_token, model: {models['code']}, token: <code>}}}}\n"
        f"    b: {{source: {models['chat']}, force: true}}\n",
        out,
    )
    ids = AutoTokenizer.from_pretrained(out).get_vocab()
    # chat's vocabulary (the code model's <code> is not in it), then <new>
    assert len(ids) == V + 3 and "<code>" not in ids
    assert [ids[t] for t in ("<chat>", "<tool>", "<new>")] == [V, V + 1, V + 2]
    b, c, h = (rows(models[k], EMBED) for k in ("base", "code", "chat"))
    expected = np.concatenate([b + 0.7 * (c[:V] - b) + 0.4 * (h[:V] - b), h[V:], c[V:]])
    expected[ids["b"]] = h[ids["b"]]  # every model takes chat's row for b
    np.testing.assert_allclose(tiny.load_state(out)[EMBED].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_token_held_by_several_models_without_base_is_their_mean(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    mergesmith.merge(
        f"merge_method: linear\nmodels:\n  - model: {models['code']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['code2']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 2}}\n"
        "dtype: float32\ntokenizer: {source: union}\n",
        out,
    )
    c, c2, h = (rows(models[k], EMBED) for k in ("code", "code2", "chat"))
    merged = tiny.load_state(out)[EMBED].numpy()
    assert merged.shape == (V + 3, 32)
    # chat lacks <code>: its row is the mean of code's and code2's
    mean = (c[V] + c2[V]) / 2
    np.testing.assert_allclose(merged[V], (c[V] + c2[V] + 2 * mean) / 4, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[V + 1], h[V], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[:V], (c[:V] + c2[:V] + 2 * h[:V]) / 4, rtol=1e-5, atol=1e-6)


def test_same_vocabulary_padded_to_a_multiple(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    mergesmith.merge(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['code']}\n    parameters: {{weight: 3}}\n"
        "dtype: float32\ntokenizer:\n  source: base\n  pad_to_multiple_of: 64\n",
        out,
    )
    b, c = rows(models["base"], HEAD), rows(models["code"], HEAD)
    merged = tiny.load_state(out)[HEAD].numpy()
    assert merged.shape == (64, 32)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    expected = (b + 3 * c[:V]) / 4
    np.testing.assert_allclose(merged[:V], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        merged[V:], np.broadcast_to(expected.mean(0), (64 - V, 32)), rtol=1e-5, atol=1e-6
    )


def config_problem(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    return str(info.value)


def test_tokenizer_source_with_tokenizer_section_is_refused(models: dict[str, Path]) -> None:
    message = config_problem(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
        "tokenizer_source: base\ntokenizer:\n  source: union\n"
    )
    assert (
        "line 5: tokenizer_source: give either tokenizer_source or a tokenizer: section, not both; "
        "move the value to tokenizer.source"
    ) in message


def test_bad_tokenizer_sections_are_refused_with_the_key() -> None:
    head = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\ntokenizer:\n"
    assert "line 6: tokenizer.pad_to_multiple_of: expected a whole number >= 1, found 0" in config_problem(
        head + "  pad_to_multiple_of: 0\n"
    )
    assert "line 7: tokenizer.tokens.<x>.source.kind: expected model_token or zero, found 'copy'" in (
        config_problem(head + "  tokens:\n    <x>: {source: {kind: copy}}\n")
    )
    assert "give exactly one of token (a token's text) and token_id (a row number)" in config_problem(
        head + "  tokens:\n    <x>: {source: {kind: model_token, model: a}}\n"
    )
    assert (
        "line 6: tokenizer.pad_to_multiple_of: 65537 is past 65536; vocabularies are padded"
        in config_problem(head + "  pad_to_multiple_of: 65537\n")
    )
    assert config_problem(head + "  source: [a]\n") == (
        "<config>: line 6: tokenizer.source: expected base, union or a model, found ['a']"
    )
    assert "line 6: tokenizer.colour: unknown key; use source, tokens or pad_to_multiple_of" in (
        config_problem(head + "  colour: red\n")
    )


def test_token_source_outside_the_merge_is_refused(models: dict[str, Path]) -> None:
    message = config_problem(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 1}}\n"
        "tokenizer:\n  tokens:\n    <chat>: {source: {kind: model_token, model: elsewhere, token: a}}\n"
    )
    assert "tokenizer.tokens.<chat>.source: 'elsewhere' is not one of the input models" in message
    message = config_problem(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 1}}\n"
        f"tokenizer:\n  tokens:\n    <chat>: {{source: {{kind: model_token, model: {models['base']}, token: <zz>}}}}\n"
    )
    assert f"tokenizer.tokens.<chat>.source.token: {models['base']} has no token '<zz>'" in message


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi there "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

# each built-in template's rendering of CONVERSATION with a generation prompt (bos <s>, eos </s>),
# worked out from the template of that name mergekit ships
RENDERED = {
    # the last system message first; turns apart by a blank line, except after the last one
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nBye### Response:\n",
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi there <|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    # the template's indentation and line breaks are part of its output
    "exaone": (
        "    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|] Hi there \n        \n\n"
        "    [|assistant|]Hello!\n        [|endofturn|]\n\n    [|user|]Bye\n        \n\n    [|assistant|]\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # no generation prompt of its own: the text ends after the last [/INST]
    "mistral": "<s> [INST] Be brief.\n\n Hi there  [/INST] Hello!</s> [INST] Bye [/INST]",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_builtin_chat_template_renders_as_mergekits(name: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    from mergesmith.chat_templates import BUILTIN

    assert sorted(BUILTIN) == sorted(RENDERED)
    text, _ = render_jinja_template(
        conversations=[CONVERSATION],
        chat_template=BUILTIN[name],
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert text[0] == RENDERED[name]


def test_mistral_template_refuses_roles_out_of_turn() -> None:
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    from mergesmith.chat_templates import BUILTIN

    with pytest.raises(TemplateError, match="conversation roles must alternate user/assistant"):
        render_jinja_template(
            conversations=[[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]],
            chat_template=BUILTIN["mistral"],
            bos_token="<s>",
            eos_token="</s>",
        )


def linear_of(models: dict[str, Path], names: list[str], extra: str) -> str:
    lines = ["merge_method: linear", "models:"]
    for n in names:
        lines += [f"  - model: {models[n]}", "    parameters: {weight: 1}"]
    return "\n".join(lines) + "\ndtype: float32\n" + extra


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four models of one vocabulary: two share a template (one with trailing white space), one
    has another, one has none."""
    root = tmp_path_factory.mktemp("templated")
    base, cfg = tiny.llama_state(5)
    out = {}
    templates = {
        "x": "{{ 'X:' + messages[0]['content'] }}",
        "y1": "{{ 'Y:' + messages[0]['content'] }}",
        "y2": "{{ 'Y:' + messages[0]['content'] }}\n\n",
        "none": None,
    }
    for i, (name, template) in enumerate(templates.items()):
        d = tiny.save(root / name, tiny.finetune(base, i), cfg, tokenizer=True)
        if template is not None:
            tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
            tok_cfg["chat_template"] = template
            (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        out[name] = d
    return out


def test_auto_chat_template_is_the_most_common_among_the_inputs(
    templated: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    mergesmith.merge(linear_of(templated, ["x", "none", "y1", "y2"], "chat_template: auto\n"), out)
    # y1 and y2 are one template once surrounding white space is stripped; x is found once
    assert (out / "chat_template.jinja").read_text() == "{{ 'Y:' + messages[0]['content'] }}"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "Y:hi"


def test_auto_chat_template_reads_a_processors_chat_template_json(
    templated: dict[str, Path], tmp_path: Path
) -> None:
    """A multimodal model keeps its template in chat_template.json (its processor's); it counts
    like one in tokenizer_config.json."""
    import shutil

    models = {}
    for name in ("a", "b"):
        models[name] = tmp_path / name
        shutil.copytree(templated["none"], models[name])
        (models[name] / "chat_template.json").write_text(
            json.dumps({"chat_template": "{{ 'P:' + messages[0]['content'] }}"})
        )
    models["x"] = templated["x"]
    out = tmp_path / "out"
    mergesmith.merge(linear_of(models, ["x", "a", "b"], "chat_template: auto\n"), out)
    assert (out / "chat_template.jinja").read_text() == "{{ 'P:' + messages[0]['content'] }}"
    assert not (out / "chat_template.json").exists()


def test_inline_chat_template_is_written_verbatim(templated: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = tmp_path / "out"
    mergesmith.merge(linear_of(templated, ["x", "y1"], f"chat_template: {json.dumps(inline)}\n"), out)
    assert (out / "chat_template.jinja").read_text() == inline
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert text == "[system] Be brief.\n[user]  Hi there \n"
    # mergekit's rule: a text with a { counts as a template from 20 characters on
    shortest = "{{ messages[0].x }}!"
    assert len(shortest) == 20
    mergesmith.validate(linear_of(templated, ["x", "y1"], f"chat_template: {json.dumps(shortest)}\n"))
    with pytest.raises(ConfigError, match="chat_template: expected auto, alpaca"):
        mergesmith.validate(
            linear_of(templated, ["x", "y1"], f"chat_template: {json.dumps(shortest[:-1])}\n")
        )


def test_named_chat_template_reaches_the_output_tokenizer(templated: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    mergesmith.merge(linear_of(templated, ["x", "y1"], "chat_template: llama3\n"), out)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED["llama3"]


def test_unknown_or_short_chat_template_is_refused_naming_the_choices(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.cli import main

    head = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
    for value in ("vicuna", "'{{ messages }}'"):
        cfg = write_config(head + f"chat_template: {value}\n")
        assert main(["validate", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert (
            "line 5: chat_template: expected auto, alpaca, chatml, exaone, llama3, mistral or a Jinja "
            "template text (with a { and 20 characters or more), found"
        ) in err
        assert "Traceback" not in err


def test_token_id_source_takes_that_row(models: dict[str, Path], tmp_path: Path) -> None:
    def config(row: int) -> str:
        return (
            f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {models['code']}\n    parameters: {{weight: 3}}\ndtype: float32\n"
            "tokenizer:\n  source: base\n  tokens:\n"
            f"    a: {{source: {{kind: model_token, model: {models['code']}, token_id: {row}}}, force: true}}\n"
        )

    out = tmp_path / "out"
    mergesmith.merge(config(V), out)
    b, c = rows(models["base"], EMBED), rows(models["code"], EMBED)
    expected = (b + 3 * c[:V]) / 4
    expected[tiny.VOCAB.index("a")] = c[V]  # both models take code's row V (its <code>)
    np.testing.assert_allclose(tiny.load_state(out)[EMBED].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (
        f"tokenizer.tokens.a.source.token_id: {V + 1} is past the {V + 1} embedding rows of {models['code']}; "
        f"give a row number below {V + 1}"
    ) in config_problem(config(V + 1))


def test_base_models_row_is_the_default_also_for_a_method_without_a_base(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    mergesmith.merge(
        f"merge_method: linear\nbase_model: {models['code2']}\nmodels:\n"
        f"  - model: {models['code2']}\n    parameters: {{weight: 0.2}}\n"
        f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 0.4}}\n"
        "dtype: float32\ntokenizer: {source: union}\n",
        out,
    )
    c2, c = rows(models["code2"], EMBED), rows(models["code"], EMBED)
    # chat lacks <code>, which code2 (the base) and code have: chat takes code2's row, not the mean
    expected = (0.2 * c2[V] + 0.7 * c[V] + 0.4 * c2[V]) / 1.3
    np.testing.assert_allclose(tiny.load_state(out)[EMBED].numpy()[V], expected, rtol=1e-5, atol=1e-6)


def test_cli_refuses_a_token_source_outside_the_merge_without_a_traceback(
    models: dict[str, Path], write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.cli import main

    cfg = write_config(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['chat']}\n    parameters: {{weight: 1}}\n"
        "tokenizer:\n  tokens:\n    <chat>: {source: elsewhere, force: true}\n"
    )
    assert main(["validate", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.tokens.<chat>.source: 'elsewhere' is not one of the input models" in err
    assert "Traceback" not in err
