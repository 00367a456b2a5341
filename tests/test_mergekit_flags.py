"""mergekit-yaml's command-line options on `mergesmith merge`: each works, is refused, or notes
what mergesmith does instead; none is an unrecognized argument."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergesmith._mergekit_flags import parse_kmb
from mergesmith.cli import _parser, main
from mergesmith.errors import ConfigError
from tests import tiny

Config = Callable[[str], Path]

# Every option of mergekit 0.1.5's mergekit-yaml (mergekit/options.py), as a user types it.
MERGEKIT_OPTIONS = [
    ["--allow-crimes"],
    ["--no-allow-crimes"],
    ["--unsafe-truncate-embeddings"],
    ["--no-unsafe-truncate-embeddings"],
    ["--transformers-cache", "/tmp/cache"],
    ["--lora-merge-cache", "/tmp/lora"],
    ["--lora-merge-dtype", "bfloat16"],
    ["--cuda"],
    ["--no-cuda"],
    ["--device", "auto"],
    ["--low-cpu-memory"],
    ["--no-low-cpu-memory"],
    ["--out-shard-size", "5B"],
    ["--copy-tokenizer"],
    ["--no-copy-tokenizer"],
    ["--clone-tensors"],
    ["--no-clone-tensors"],
    ["--trust-remote-code"],
    ["--no-trust-remote-code"],
    ["--random-seed", "7"],
    ["--lazy-unpickle"],
    ["--no-lazy-unpickle"],
    ["--write-model-card"],
    ["--no-write-model-card"],
    ["--safe-serialization"],
    ["--no-safe-serialization"],
    ["-v"],
    ["-vv"],
    ["--quiet"],
    ["--no-quiet"],
    ["--read-to-gpu"],
    ["--no-read-to-gpu"],
    ["--multi-gpu"],
    ["--no-multi-gpu"],
    ["--num-threads", "2"],
    ["-j", "2"],
    ["--gpu-rich"],
    ["--async-write"],
    ["--no-async-write"],
    ["--write-threads", "2"],
]

# The switches that change nothing here, with the note each one prints.
NOTED = {
    "--lazy-unpickle": "note: --lazy-unpickle has no effect: mergesmith always reads tensors lazily, one at a time",
    "--low-cpu-memory": "note: --low-cpu-memory has no effect: mergesmith holds one output tensor at a time; "
    "--device cuda computes on the GPU",
    "--clone-tensors": "note: --clone-tensors has no effect: mergesmith writes every output tensor on its own, "
    "so repeated layers need no cloning",
    "--read-to-gpu": "note: --read-to-gpu has no effect: mergesmith reads each tensor on the CPU and moves it "
    "to --device for the arithmetic",
    "--multi-gpu": "note: --multi-gpu has no effect: mergesmith computes on one device; choose it with --device",
    "--async-write": "note: --async-write has no effect: mergesmith writes each shard as soon as its tensors "
    "are merged",
    "--safe-serialization": "note: --safe-serialization has no effect: mergesmith always writes safetensors",
    "-vv": "note: -v has no effect: mergesmith has no log levels",
}
NOTED_VALUES = {
    "--transformers-cache": "note: --transformers-cache is ignored: mergesmith downloads through "
    "huggingface_hub's own cache; set HF_HUB_CACHE=PATH to move it",
    "--lora-merge-cache": "note: --lora-merge-cache is ignored: mergesmith applies a model+lora adapter in "
    "memory as each tensor is read; nothing is cached",
    "--lora-merge-dtype": "note: --lora-merge-dtype is ignored: mergesmith applies a model+lora adapter in "
    "memory at the merge's own precision",
    "--write-threads": "note: --write-threads is ignored: mergesmith writes each shard as soon as its tensors "
    "are merged",
}

REFUSED = {
    "--allow-crimes": "error: --allow-crimes: mergesmith does not merge models of different architectures: "
    "it compares the models' config.json and tensor shapes and refuses a mismatch rather than write a "
    "broken model; merge fine-tunes of one base model (validate shows which model differs)",
    "--trust-remote-code": "error: --trust-remote-code: mergesmith never runs a model's code: it reads "
    "config.json and the weight files only, so models with custom code merge without it; drop the flag",
    "--unsafe-truncate-embeddings": "error: --unsafe-truncate-embeddings: mergesmith does not drop embedding "
    "rows; set tokenizer_source (base, union or one model's name) in the config to match the rows by token",
}


def _task_arithmetic(zoo: dict[str, Path], write_config: Config, extra: str = "") -> Path:
    return write_config(
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\n"
        f"models:\n  - model: {zoo['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{weight: 0.5}}\n{extra}"
    )


def _merge(capsys: pytest.CaptureFixture[str], cfg: Path, out: Path, *flags: str) -> tuple[int, list[str]]:
    rc = main(["merge", str(cfg), str(out), "--no-progress", "--no-diagnose", *flags])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.splitlines()


@pytest.mark.parametrize("option", MERGEKIT_OPTIONS, ids=lambda o: " ".join(o))
def test_every_mergekit_yaml_option_is_recognized(option: list[str]) -> None:
    args = _parser().parse_args(["merge", "c.yml", "out", *option])
    assert args.command == "merge"


def test_kmb_sizes_are_read_as_mergekit_reads_them() -> None:
    assert parse_kmb("5B") == 5_000_000_000
    assert parse_kmb("5b") == 5_000_000_000
    assert parse_kmb("500M") == 500_000_000
    assert parse_kmb("20k") == 20_000
    assert parse_kmb("1234") == 1234
    assert parse_kmb("0") == 0
    for bad in ("5GB", "1.5B", "-1", "B", ""):
        with pytest.raises(ConfigError) as info:
            parse_kmb(bad)
        assert str(info.value) == (
            f"--out-shard-size {bad!r}: expected a whole number with an optional K, M or B "
            "(thousands, millions, billions) as mergekit writes it, e.g. 5B; "
            "for sizes such as 5GB or 2GiB use --max-shard-size"
        )


def _shards(out: Path) -> list[list[int]]:
    """The byte size of each tensor of each output shard, in the order the index lists them."""
    weight_map: dict[str, str] = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    sizes: dict[str, list[int]] = {}
    for key, name in weight_map.items():  # the index lists the tensors in the order they were written
        with safe_open(str(out / name), "pt") as f:
            sizes.setdefault(name, []).append(f.get_tensor(key).nbytes)
    return list(sizes.values())


def test_out_shard_size_counts_bytes_and_packs_greedily(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mergekit 0.1.5 compares --out-shard-size with the bytes of each shard (numel x element size)
    cfg = _task_arithmetic(zoo, write_config, "dtype: float16\n")
    rc, _ = _merge(capsys, cfg, tmp_path / "out", "--out-shard-size", "20K")
    assert rc == 0
    shards = _shards(tmp_path / "out")
    total = sum(map(sum, shards))
    state = tiny.load_state(zoo["base"])
    assert total == sum(v.numel() * 2 for v in state.values())  # float16: two bytes a weight
    assert len(shards) > 2
    for i, shard in enumerate(shards):
        assert sum(shard) <= 20_000 or len(shard) == 1
        if i + 1 < len(shards):  # the next shard's first tensor did not fit
            assert sum(shard) + shards[i + 1][0] > 20_000
    # counted in parameters, the same number would allow 40000 bytes a shard: fewer shards
    rc, _ = _merge(capsys, cfg, tmp_path / "params", "--max-shard-size", "40000")
    assert rc == 0
    assert len(_shards(tmp_path / "params")) < len(shards)


def test_out_shard_size_zero_writes_one_shard(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    rc, _ = _merge(capsys, cfg, tmp_path / "out", "--out-shard-size", "0")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


def test_out_shard_size_and_max_shard_size_together_are_refused(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    rc, err = _merge(capsys, cfg, tmp_path / "out", "--out-shard-size", "5B", "--max-shard-size", "1GB")
    assert rc == 1
    assert err == ["error: --out-shard-size and --max-shard-size both set the shard size; give one"]
    rc, err = _merge(capsys, cfg, tmp_path / "out", "--out-shard-size", "1.5B")
    assert rc == 1
    assert err[0].startswith("error: --out-shard-size '1.5B': expected a whole number")
    assert not (tmp_path / "out").exists()


def test_no_copy_tokenizer_leaves_the_tokenizer_files_out(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    assert _merge(capsys, cfg, tmp_path / "with")[0] == 0
    assert (tmp_path / "with" / "tokenizer.json").is_file()
    assert _merge(capsys, cfg, tmp_path / "without", "--no-copy-tokenizer")[0] == 0
    written = sorted(p.name for p in (tmp_path / "without").iterdir())
    assert not [n for n in written if n.startswith(("tokenizer", "special_tokens"))], written
    assert "README.md" in written and "config.json" in written
    assert tiny.load_state(tmp_path / "without").keys() == tiny.load_state(tmp_path / "with").keys()
    assert _merge(capsys, cfg, tmp_path / "explicit", "--copy-tokenizer")[0] == 0
    assert (tmp_path / "explicit" / "tokenizer.json").is_file()


def test_no_copy_tokenizer_keeps_a_tokenizer_the_config_asks_for(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as in mergekit, a tokenizer_source tokenizer is written whatever --copy-tokenizer says
    models = Path(__file__).resolve().parent.parent / "zoo" / "models"  # each has its tokenizer
    cfg = write_config(
        f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\n"
        f"models:\n  - model: {models / 'add'}\n    parameters: {{weight: 0.5}}\ntokenizer_source: base\n"
    )
    assert _merge(capsys, cfg, tmp_path / "out", "--no-copy-tokenizer")[0] == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        models / "base" / "tokenizer.json"
    ).read_bytes()


def test_no_write_model_card_writes_no_readme(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    out = tmp_path / "out"
    assert _merge(capsys, cfg, out, "--no-write-model-card")[0] == 0
    assert not (out / "README.md").exists()
    assert (out / "model.safetensors").is_file() and (out / "mergesmith_config.yml").is_file()
    # still known as mergesmith's output: --force may replace it
    assert _merge(capsys, cfg, out, "--force", "--write-model-card")[0] == 0
    assert (out / "README.md").read_text().startswith("---\n")


def test_random_seed_is_the_seed_of_random_methods(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        f"merge_method: dare_linear\nbase_model: {zoo['base']}\n"
        f"models:\n  - model: {zoo['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    runs = {"random7": ["--random-seed", "7"], "seed7": ["--seed", "7"], "random8": ["--random-seed", "8"]}
    for name, flags in runs.items():
        assert _merge(capsys, cfg, tmp_path / name, *flags)[0] == 0
    r7, s7, r8 = (tiny.load_state(tmp_path / n) for n in runs)
    base, a = tiny.load_state(zoo["base"]), tiny.load_state(zoo["a"])
    name = "model.layers.0.mlp.down_proj.weight"
    for k in r7:
        torch.testing.assert_close(r7[k], s7[k], rtol=0, atol=0)
    assert not torch.equal(r7[name], r8[name])
    # each entry of the task vector is dropped or kept; the kept ones keep the L1 norm (as mergekit)
    delta, kept = a[name] - base[name], r7[name] - base[name]
    mask = kept != 0
    assert 0.4 < mask.float().mean() < 0.6
    expected = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-6)
    rc, err = _merge(capsys, cfg, tmp_path / "both", "--seed", "1", "--random-seed", "2")
    assert rc == 1
    assert err == ["error: --seed 1 and --random-seed 2 disagree; give one"]


def test_cuda_is_device_cuda(
    zoo: dict[str, Path],
    write_config: Config,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _task_arithmetic(zoo, write_config)
    for flag in ("--cuda", "--gpu-rich"):
        rc, err = _merge(capsys, cfg, tmp_path / "out", flag)
        assert rc == 1
        assert err == [
            "error: device 'cuda': no CUDA device is available here (torch.cuda.is_available() is False); "
            "use --device cpu"
        ]
    rc, err = _merge(capsys, cfg, tmp_path / "out", "--cuda", "--device", "cpu")
    assert rc == 1
    assert err == ["error: --cuda asks for the GPU, --device cpu for another device; give one"]
    rc, err = _merge(capsys, cfg, tmp_path / "out", "--gpu-rich", "--device", "cpu")
    assert err == ["error: --gpu-rich asks for the GPU, --device cpu for another device; give one"]
    # mergekit's --device auto: the GPU when there is one, here none
    assert _merge(capsys, cfg, tmp_path / "out", "--device", "auto", "--no-cuda")[0] == 0


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_say_why(
    flag: str, zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    rc, err = _merge(capsys, cfg, tmp_path / "out", flag)
    assert rc == 1
    assert err == [REFUSED[flag]]
    assert not (tmp_path / "out").exists()
    # the negation is the default: accepted without a word
    assert _merge(capsys, cfg, tmp_path / "out", flag.replace("--", "--no-", 1)) == (0, [])


def test_no_op_flags_print_a_note_and_change_nothing(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    assert _merge(capsys, cfg, tmp_path / "plain") == (0, [])
    flags = [*NOTED]
    for flag in NOTED_VALUES:
        flags += [flag, "x"]
    rc, err = _merge(capsys, cfg, tmp_path / "noted", *flags)
    assert rc == 0
    assert sorted(err) == sorted([*NOTED.values(), *NOTED_VALUES.values()])
    plain, noted = tiny.load_state(tmp_path / "plain"), tiny.load_state(tmp_path / "noted")
    for k in plain:
        assert torch.equal(plain[k], noted[k]), k
    # their negations are mergesmith's behaviour already: nothing to say
    quiet = [f.replace("--", "--no-", 1) for f in NOTED if f.startswith("--") and f != "--safe-serialization"]
    assert _merge(capsys, cfg, tmp_path / "negated", *quiet) == (0, [])
    # but pickled output is not written: safetensors it is
    rc, err = _merge(capsys, cfg, tmp_path / "pickled", "--no-safe-serialization")
    assert (rc, err) == (
        0,
        [
            "note: --no-safe-serialization: mergesmith writes safetensors only, never pickled .bin files; "
            "writing safetensors"
        ],
    )
    assert sorted(p.name for p in (tmp_path / "pickled").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "pickled").glob("*.bin"))


def test_quiet_and_num_threads(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _task_arithmetic(zoo, write_config)
    threads = torch.get_num_threads()
    try:
        assert main(["merge", str(cfg), str(tmp_path / "loud"), "--no-progress", "-j", "3"]) == 0
        assert torch.get_num_threads() == 3
        assert "before merging" in capsys.readouterr().err
        assert main(["merge", str(cfg), str(tmp_path / "quiet"), "--quiet", "--num-threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert capsys.readouterr().err == ""
        rc = main(["merge", str(cfg), str(tmp_path / "x"), "--threads", "2", "-j", "3"])
        assert rc == 1
        assert capsys.readouterr().err == "error: --threads 2 and --num-threads 3 disagree; give one\n"
    finally:
        torch.set_num_threads(threads)


def test_merge_help_names_every_mergekit_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["merge", "--help"])
    assert info.value.code == 0
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # undo wrapping at hyphens
    for option in MERGEKIT_OPTIONS:
        flag = option[0].replace("--no-", "--")
        assert flag in text or flag in ("-vv", "--device"), flag


def test_python_api_leaves_out_tokenizer_and_card(
    zoo: dict[str, Path], write_config: Config, tmp_path: Path
) -> None:
    import mergesmith

    cfg = _task_arithmetic(zoo, write_config)
    mergesmith.merge(cfg, tmp_path / "out", progress=False, copy_tokenizer=False, write_model_card=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "mergesmith_config.yml",
        "model.safetensors",
    ]
