"""Every tiny transformers checkpoint saves and loads back with its Auto class, weight for weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_transformers import TYPES, make_tiny, quiet_transformers


@pytest.mark.parametrize("model_type", TYPES)
def test_tiny_checkpoint_loads_back(model_type: str, tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import load_file

    auto_class = make_tiny(model_type, tmp_path / "m", seed=0)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert sum(t.numel() * 4 for t in saved.values()) < 2_000_000

    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(tmp_path / "m")
        assert config.model_type == model_type
        model, info = getattr(transformers, auto_class).from_pretrained(
            tmp_path / "m", output_loading_info=True
        )
        assert not info["missing_keys"]
        assert not info["unexpected_keys"]
        assert not info["mismatched_keys"]
        # Saving the loaded model again writes the same tensors under the same names.
        model.save_pretrained(tmp_path / "again", safe_serialization=True)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
