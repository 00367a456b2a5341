"""A multimodal model's processor files (image, video and audio preprocessor configs, the processor
config, its chat template) are copied into the output from the tokenizer's model, with the checks
the tokenizer files get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mergesmith.api import merge
from mergesmith.cli import main
from mergesmith.errors import CheckpointError
from tests import tiny

PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
    "chat_template.json",
)


def save_processor(directory: Path, patch_size: int) -> None:
    """A LLaVA processor (CLIP image processor and the tiny tokenizer) and the other processor files."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(directory))
    side = 4 * patch_size
    images = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    images.save_pretrained(str(directory))  # preprocessor_config.json
    LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=patch_size, image_token="<s>"
    ).save_pretrained(str(directory))
    (directory / "video_preprocessor_config.json").write_text(
        json.dumps(
            {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": side, "width": side}}
        )
    )
    (directory / "audio_tokenizer_config.json").write_text(
        json.dumps({"audio_tokenizer_class": "X", "patch": patch_size})
    )
    (directory / "chat_template.json").write_text(
        json.dumps({"chat_template": f"{{{{ 'patch {patch_size}' }}}}"})
    )


def two_models(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg, tokenizer=True)
    ft = tiny.save(tmp_path / "ft", tiny.finetune(state, 1), cfg, tokenizer=True)
    save_processor(base, patch_size=4)
    save_processor(ft, patch_size=2)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
    }
    return base, ft, config


def test_processor_files_are_copied_byte_identical_from_the_base(tmp_path: Path) -> None:
    base, _, config = two_models(tmp_path)
    merge(config, tmp_path / "out")
    for name in PROCESSOR_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes(), name


def test_processor_files_come_from_the_tokenizer_source(tmp_path: Path) -> None:
    base, ft, config = two_models(tmp_path)
    merge({**config, "tokenizer_source": str(ft)}, tmp_path / "out")
    for name in PROCESSOR_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (ft / name).read_bytes(), name
        assert (tmp_path / "out" / name).read_bytes() != (base / name).read_bytes(), name


def test_the_output_loads_the_inputs_processor(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoProcessor

    base, _, config = two_models(tmp_path)
    for name in ("video_preprocessor_config.json", "audio_tokenizer_config.json"):  # not LLaVA's
        (base / name).unlink()
    out = tmp_path / "out"
    merge(config, out)
    want, got = AutoProcessor.from_pretrained(str(base)), AutoProcessor.from_pretrained(str(out))
    assert type(got).__name__ == "LlavaProcessor"
    assert got.patch_size == want.patch_size == 4
    assert got.image_processor.to_dict() == want.image_processor.to_dict()
    image_in, image_out = (
        AutoImageProcessor.from_pretrained(str(base)),
        AutoImageProcessor.from_pretrained(str(out)),
    )
    assert type(image_out).__name__.startswith("CLIPImageProcessor")
    assert image_out.to_dict() == image_in.to_dict()
    assert image_out.size == {"shortest_edge": 16}


@pytest.mark.parametrize("name", ["preprocessor_config.json", "processor_config.json", "chat_template.json"])
def test_processor_file_linking_outside_the_model_is_refused(tmp_path: Path, name: str) -> None:
    base, _, config = two_models(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (base / name).unlink()
    (base / name).symlink_to(secret)
    with pytest.raises(CheckpointError) as info:
        merge(config, tmp_path / "out")
    assert str(info.value).startswith(
        f"{base / name} is a symlink to {secret}, outside the model directory; refusing"
    )
    assert not (tmp_path / "out").exists()


def test_malformed_processor_file_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    base, _, config = two_models(tmp_path)
    (base / "preprocessor_config.json").write_text("{not json")
    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(yaml.safe_dump(config))
    assert main(["merge", str(cfg_file), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"{base / 'preprocessor_config.json'}: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); repair preprocessor_config.json or download the model again"
    ) in err
    assert not (tmp_path / "out").exists()


def test_a_configured_chat_template_replaces_the_processors(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from mergesmith.chat_templates import BUILTIN

    base, _, config = two_models(tmp_path)
    for name in ("video_preprocessor_config.json", "audio_tokenizer_config.json"):  # not LLaVA's
        (base / name).unlink()
    out = tmp_path / "out"
    merge({**config, "chat_template": "chatml"}, out)
    assert not (out / "chat_template.json").exists()
    assert (out / "chat_template.jinja").read_text() == BUILTIN["chatml"]
    assert AutoProcessor.from_pretrained(str(out)).chat_template == BUILTIN["chatml"]
    assert AutoProcessor.from_pretrained(str(base)).chat_template == "{{ 'patch 4' }}"
