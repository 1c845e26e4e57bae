"""Hugging Face <-> Megatron checkpoint conversion: exact round trips, parity with transformers, the torch_dist
layout megatron itself writes, and a clear error (with nothing left behind) for each kind of bad input."""

import contextlib
import json
import os
import runpy
import shutil
from pathlib import Path

import pytest
import torch

from megatron_qwen35.checkpoint import CONFIG, CheckpointFileError, load_checkpoint, save_checkpoint
from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.megatron_keys import MegatronLayout
from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
from megatron_qwen35.convert.model_state import load_hf_state_dict, megatron_named_tensors
from megatron_qwen35.convert.safetensors_files import INDEX_NAME, SafetensorsCheckpoint, write_safetensors
from megatron_qwen35.convert.table import MULTIMODAL_PREFIX, TEXT_ONLY_PREFIX, HFLayout, hf_shapes
from megatron_qwen35.convert.torch_dist import TorchDistReader, TorchDistWriter
from megatron_qwen35.hf_reference import modeling, reference_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-4  # fp32 through 4 layers; the two implementations differ only in summation order
KL_TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _mtp_tensors(cfg, *, hf_prefix, layout, seed=5):
    """Random `mtp.*` tensors with the names and shapes the table gives for cfg's MTP layer."""
    cfg = cfg.replace(mtp_num_layers=1)
    rules = [r for r in HFLayout(hf_prefix, layout, layout).rules(cfg) if r.megatron[0].startswith("mtp.")]
    shapes = hf_shapes(rules, MegatronLayout(cfg).shape, cfg)
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.1 + (1.0 if n.endswith("linear_attn.norm.weight") else 0.0)
            for n, s in shapes.items()}


def make_hf_checkpoint(path: Path, preset: str, *, how="save_pretrained", dtype=torch.float32, mtp_layout=None,
                       seed=0) -> Path:
    """A tiny Qwen3.5 checkpoint as users bring them: Qwen3_5(Moe)ForCausalLM, or for a preset with a vision tower
    the VL wrapper (`model.language_model.*`, `model.visual.*`, a nested config.json).

    how: "save_pretrained" (transformers' own files, per-expert MoE, sharded with an index) or "packed" (the
    module's packed experts written directly). mtp_layout: add MTP tensors, experts in that layout.
    """
    cfg = qwen35_preset(preset)
    hf = reference_model(cfg, seed).to(dtype)
    if how == "save_pretrained":
        hf.save_pretrained(path, max_shard_size="200KB")
    else:
        path.mkdir(parents=True)
        state = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        write_safetensors(path / "model.safetensors", state)
        (path / "config.json").write_text(hf.config.to_json_string())
    if mtp_layout is not None:
        prefix = MULTIMODAL_PREFIX if cfg.vision is not None else TEXT_ONLY_PREFIX
        mtp = {k: v.to(dtype) for k, v in _mtp_tensors(cfg, hf_prefix=prefix, layout=mtp_layout).items()}
        write_safetensors(path / "mtp.safetensors", mtp)
        index = path / INDEX_NAME
        if index.is_file():
            d = json.loads(index.read_text())
            d["weight_map"].update({k: "mtp.safetensors" for k in mtp})
            index.write_text(json.dumps(d))
    return path


def assert_same_hf_checkpoint(want: Path, got: Path):
    """Every tensor name, dtype, shape and byte, and config.json / generation_config.json byte for byte."""
    a, b = SafetensorsCheckpoint(want), SafetensorsCheckpoint(got)
    assert set(a) == set(b), f"names differ: {sorted(set(a) ^ set(b))[:5]}"
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"bytes of {name}"
    for f in ("config.json", "generation_config.json"):
        if (want / f).is_file():
            assert (want / f).read_bytes() == (got / f).read_bytes(), f


def assert_export_copies_equal_memory(megatron_dir: Path, root: Path) -> int:
    """Export `megatron_dir` as users do (bytes that only move copied file to file) and with every tensor read into
    memory and written from it (the path casts and arithmetic take): the same files. Returns how many tensors were
    copied file to file, so that a caller can tell the copies ran."""
    from unittest import mock

    from megatron_qwen35.convert import safetensors_files
    from megatron_qwen35.convert.transforms import Transform

    with mock.patch.object(safetensors_files, "copy_ranges", wraps=safetensors_files.copy_ranges) as copies:
        qwen35_megatron_to_hf(megatron_dir, root / "exported", progress=False)
    with mock.patch.object(Transform, "moved_vectors", lambda *args: None):
        qwen35_megatron_to_hf(megatron_dir, root / "exported-through-memory", progress=False)
    assert_same_hf_checkpoint(root / "exported-through-memory", root / "exported")
    return copies.call_count


CASES = {  # name: (preset, make_hf_checkpoint options)
    "dense_tied": ("tiny", dict()),
    "moe_per_expert": ("tiny-moe", dict()),
    "moe_packed": ("tiny-moe", dict(how="packed")),
    "dense_mtp_bf16": ("tiny", dict(dtype=torch.bfloat16, mtp_layout="packed")),
    "moe_mtp_mixed_layouts": ("tiny-moe", dict(how="packed", mtp_layout="per_expert")),
    "dense_multimodal": ("tiny-vl", dict()),
    "moe_multimodal_bf16": ("tiny-vl-moe", dict(how="packed", dtype=torch.bfloat16, mtp_layout="packed")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bitwise_identical(case, tmp_path):
    """HF -> Megatron -> HF reproduces every tensor (name, dtype, bytes) and the config files exactly."""
    preset, options = CASES[case]
    src = make_hf_checkpoint(tmp_path / "hf", preset, **options)
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, max_shard_size=64 * 1024)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1  # really sharded, with an index
    assert_same_hf_checkpoint(src, tmp_path / "out")
    _, meta = json.loads((tmp_path / "mg" / CONFIG).read_text()).values()
    assert meta["source_dtype"] == str(options.get("dtype", torch.float32)).removeprefix("torch.")
    if qwen35_preset(preset).vision is not None:  # the tower is converted, not carried
        assert any(k.startswith("vision_model.") for k in TorchDistReader(tmp_path / "mg" / "release").tensors)


def test_bf16_source_keeps_the_models_fp32_parameters_in_fp32(tmp_path):
    """An all-bf16 source: A_log and the GDN output norm are stored fp32, as the model keeps them under bf16 (and
    (w - 1) of the norm keeps its low bits only in fp32); every other tensor stays bf16; the export gives bf16 back."""
    src = make_hf_checkpoint(tmp_path / "hf", "tiny", dtype=torch.bfloat16)
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    reader = TorchDistReader(tmp_path / "mg" / "release")
    dtypes = {k: reader.dtype(k) for k in reader.tensors}
    fp32 = {k for k in dtypes if k.endswith(("self_attention.A_log", "self_attention.out_norm.weight"))}
    assert len(fp32) == 2 * sum(t == "linear_attention" for t in qwen35_preset("tiny").layer_types)
    assert {k for k, d in dtypes.items() if d == torch.float32} == fp32
    assert all(d == torch.bfloat16 for k, d in dtypes.items() if k not in fp32)
    qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    assert_same_hf_checkpoint(src, tmp_path / "out")


def test_dtype_flag_casts_and_export_restores_the_source_dtype(tmp_path):
    """--dtype fp32 on a bf16 source: fp32 weights in Megatron, the bf16 source again on export."""
    src = make_hf_checkpoint(tmp_path / "hf", "tiny", dtype=torch.bfloat16)
    qwen35_hf_to_megatron(src, tmp_path / "mg", dtype="fp32", progress=False)
    reader = TorchDistReader(tmp_path / "mg" / "release")
    assert {reader.dtype(k) for k in reader.tensors} == {torch.float32}
    qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    assert_same_hf_checkpoint(src, tmp_path / "out")


def test_written_checkpoint_is_what_megatron_save_writes(tmp_path):
    """Same keys, global shapes, chunks and values as save_checkpoint of the model loaded in memory; and
    load_checkpoint of the converted files gives the in-memory model's tensors exactly."""
    cfg = qwen35_preset("tiny-moe")
    src = make_hf_checkpoint(tmp_path / "hf", "tiny-moe", how="packed", mtp_layout="packed")
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)

    from megatron_qwen35.provider import qwen35_gpt_model

    def build():
        return qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")

    model = build()
    hf_state = SafetensorsCheckpoint(src)
    load_hf_state_dict(model, cfg, {k: hf_state[k] for k in hf_state}, expert_layout="packed")
    save_checkpoint(model, cfg, tmp_path / "ref")
    ours, ref = TorchDistReader(tmp_path / "mg" / "release"), TorchDistReader(tmp_path / "ref" / "iter_0000000")
    assert set(ours.metadata.state_dict_metadata) == set(ref.metadata.state_dict_metadata)
    for key, md in ref.tensors.items():
        assert ours.tensors[key].size == md.size, key
        chunks = lambda m: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)  # noqa: E731
        assert chunks(ours.tensors[key]) == chunks(md), key
        assert torch.equal(ours.read(key), ref.read(key)), key

    loaded = build()
    load_checkpoint(loaded, tmp_path / "mg")
    want = megatron_named_tensors(model)
    for name, tensor in megatron_named_tensors(loaded).items():
        assert torch.equal(tensor, want[name]), name


def _transformers_model(path: Path, is_moe: bool):
    from transformers import AutoModelForCausalLM

    modeling(is_moe)  # put transformers' pure-PyTorch GDN paths back before it builds the layers
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_converted_model_matches_transformers(preset, tmp_path):
    """load_model(converted) against transformers on the original files: max |delta| <= 1e-4, KL <= 1e-6, same
    argmax everywhere (fp32)."""
    from megatron_qwen35.inference import load_model

    src = make_hf_checkpoint(tmp_path / "hf", preset)
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    cfg = qwen35_preset(preset)
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _transformers_model(src, cfg.is_moe)(input_ids=ids).logits.float()
    got = load_model(tmp_path / "mg")(ids)
    assert (got - want).abs().max().item() <= LOGIT_TOL
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl.max().item() <= KL_TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("how", ["save_pretrained", "packed"])
def test_export_loads_in_transformers(how, tmp_path):
    """transformers' from_pretrained reads the export into exactly the weights it reads from the source."""
    src = make_hf_checkpoint(tmp_path / "hf", "tiny-moe", how=how)
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False, max_shard_size=64 * 1024)
    want = _transformers_model(src, True).state_dict()
    got = _transformers_model(tmp_path / "out", True).state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_save_pretrained_writes_experts_per_expert(tmp_path):
    """The layout an export without a recorded source uses is the one transformers itself writes."""
    src = make_hf_checkpoint(tmp_path / "hf", "tiny-moe")
    names = set(SafetensorsCheckpoint(src))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)


def test_export_without_source_record_is_save_pretrained_layout(tmp_path):
    """A checkpoint saved by training (no HF metadata) exports per-expert, text-only, and transformers loads it.
    It also holds what megatron.training writes beside the model: sharded objects (RNG and rerun state, Transformer
    Engine's `_extra_state`) and common entries (args); the export reads the model's tensors only."""
    import io
    from argparse import Namespace

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset("tiny-moe").replace(mtp_num_layers=0)
    hf = reference_model(cfg)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
    load_hf_state_dict(model, cfg, hf.state_dict())
    megatron_training_extras = {
        "rng_state": ShardedObject("rng_state", [{"random_rng_state": (1, 2)}], (1,), (0,)),
        "rerun_state_machine": ShardedObject("rerun_state_machine_state", {"mode": "disabled"}, (1,), (0,)),
        "te_extra_state": ShardedObject("decoder.layers.3.self_attention.core_attention._extra_state",
                                        io.BytesIO(b"fp8 meta"), (1,), (0,)),
        "args": Namespace(tensor_model_parallel_size=1), "num_floating_point_operations_so_far": 0}
    save_checkpoint(model, cfg, tmp_path / "trained", extra_state=megatron_training_extras)
    qwen35_megatron_to_hf(tmp_path / "trained", tmp_path / "out", progress=False)
    got = _transformers_model(tmp_path / "out", True).state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the culprit, and no output left behind
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return make_hf_checkpoint(root / "hf", "tiny", how="packed")


@pytest.fixture
def source(dense_source, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(dense_source, copy)
    return copy


def _rewrite(source: Path, change):
    reader = SafetensorsCheckpoint(source)
    tensors = {k: reader[k] for k in reader}
    change(tensors)
    write_safetensors(source / "model.safetensors", tensors)


@contextlib.contextmanager
def _untouched(*inputs: Path):
    """The block leaves every file under `inputs` as it was, to the byte (and adds or removes none)."""
    before = [_tree_bytes(p) for p in inputs]
    yield
    assert [_tree_bytes(p) for p in inputs] == before


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_tensor_is_named(source, tmp_path):
    _rewrite(source, lambda t: t.pop("model.layers.2.linear_attn.dt_bias"))
    with _untouched(source), pytest.raises(KeyError, match="model.layers.2.linear_attn.dt_bias"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    _assert_nothing_left(tmp_path / "mg")


def test_unexpected_tensor_is_named(source, tmp_path):
    _rewrite(source, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with _untouched(source), pytest.raises(KeyError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)


def test_wrong_shape_is_named(source, tmp_path):
    _rewrite(source, lambda t: t.update({"model.layers.3.self_attn.o_proj.weight": torch.zeros(64, 100)}))
    want = r"'model.layers.3.self_attn.o_proj.weight'.*\[64, 100\].*\[64, 128\]"
    with _untouched(source), pytest.raises(ValueError, match=want):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)


def test_unknown_model_type_is_named(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with _untouched(source), pytest.raises(ValueError, match="unknown model_type 'llama'"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)


def test_truncated_safetensors_is_named(source, tmp_path):
    f = source / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with _untouched(source), pytest.raises(CheckpointFileError, match=r"model.safetensors: truncated.*'"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)


def test_corrupt_safetensors_header_is_named(source, tmp_path):
    f = source / "model.safetensors"
    with open(f, "r+b") as h:
        h.seek(8)
        h.write(b"\xff\xfe{{{{")
    want = "model.safetensors: corrupt safetensors header"
    with _untouched(source), pytest.raises(CheckpointFileError, match=want):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)


def test_existing_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "mg"
    out.mkdir()
    (out / "keep").write_text("x")
    with _untouched(source), pytest.raises(FileExistsError, match="--overwrite"):
        qwen35_hf_to_megatron(source, out, progress=False)
    assert (out / "keep").is_file()
    qwen35_hf_to_megatron(source, out, overwrite=True, progress=False)
    assert not (out / "keep").exists() and (out / CONFIG).is_file()


def test_failure_while_writing_leaves_nothing(source, tmp_path, monkeypatch):
    """An error mid-way (here: the disk 'fills' on the 5th chunk) removes the temporary directory."""
    calls = []
    original = TorchDistWriter.write_chunk

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return original(self, *a, **k)

    monkeypatch.setattr(TorchDistWriter, "write_chunk", failing)
    with _untouched(source), pytest.raises(OSError, match="No space"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    _assert_nothing_left(tmp_path / "mg")


def test_truncated_megatron_data_is_named_on_export(source, tmp_path):
    qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    data = tmp_path / "mg" / "release" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    with _untouched(tmp_path / "mg"), pytest.raises(CheckpointFileError, match="__0_0.distcp: cannot read tensor"):
        qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_command_lines_convert_and_report_errors(source, tmp_path, capsys):
    to_mg = runpy.run_path(str(REPO / "tools/convert/hf_to_megatron.py"), run_name="cli")["main"]
    to_hf = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")["main"]
    assert to_mg(["--hf-dir", str(source), "--out-dir", str(tmp_path / "mg"), "--no-progress"]) == 0
    assert to_hf(["--megatron-dir", str(tmp_path / "mg"), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert_same_hf_checkpoint(source, tmp_path / "out")
    with _untouched(source, tmp_path / "mg"):
        assert to_mg(["--hf-dir", str(source), "--out-dir", str(tmp_path / "mg"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_that_would_replace_the_input_is_refused_even_with_overwrite(source, tmp_path, where):
    """--out-dir equal to --hf-dir (or a directory holding it) with --overwrite deleted the input: refused, and the
    input is untouched to the byte."""
    out = source if where == "same" else source.parent
    with _untouched(source), pytest.raises(ValueError, match=f"would replace the input {source}"):
        qwen35_hf_to_megatron(source, out, overwrite=True, progress=False)
    qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    with _untouched(tmp_path / "mg"), pytest.raises(ValueError, match="would replace the input"):
        qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "mg", overwrite=True, progress=False)


def test_a_killed_runs_temporary_directory_is_removed_by_the_next_run(source, tmp_path, capsys):
    stale = tmp_path / ".mg.tmp-999999999-abcd"  # no such pid
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 1000)
    qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mg.")]


def test_outputs_honour_the_umask(source, tmp_path):
    old = os.umask(0o022)
    try:
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
        qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "exported", progress=False)
    finally:
        os.umask(old)
    for out in (tmp_path / "mg", tmp_path / "exported"):
        assert out.stat().st_mode & 0o777 == 0o755, oct(out.stat().st_mode)


def test_a_stored_head_that_differs_from_a_tied_embedding_is_used_as_transformers_does(tmp_path):
    """config.json says tie_word_embeddings, the files hold a distinct lm_head.weight: transformers runs the stored
    head (untied), so the converted model does too; the round trip gives back the source's files."""
    from megatron_qwen35.inference import load_model

    src = make_hf_checkpoint(tmp_path / "hf", "tiny", how="packed")
    reader = SafetensorsCheckpoint(src)
    tensors = {k: reader[k] for k in reader}
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = torch.randn_like(embedding) * embedding.std()  # the embedding's scale, not a copy
    write_safetensors(src / "model.safetensors", tensors)
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _transformers_model(src, False)(input_ids=ids).logits.float()
    got = load_model(tmp_path / "mg")(ids)
    assert (got - want).abs().max().item() <= LOGIT_TOL and torch.equal(got.argmax(-1), want.argmax(-1))
    qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    assert_same_hf_checkpoint(src, tmp_path / "out")


@pytest.mark.parametrize("bug", ["drops", "repeats"])
def test_a_table_bug_cannot_finish_an_incomplete_checkpoint(source, tmp_path, monkeypatch, bug):
    """The import writer checks that every tensor of the model was written exactly once before the output appears."""
    write = MegatronLayout.write
    victim = "decoder.layers.1.self_attention.dt_bias"

    def faulty(self, writer, name, tensor, **kwargs):
        if name != victim or bug == "repeats":
            write(self, writer, name, tensor, **kwargs)
        if name == victim and bug == "repeats":
            write(self, writer, name, tensor, **kwargs)

    monkeypatch.setattr(MegatronLayout, "write", faulty)
    with _untouched(source), pytest.raises(ValueError, match="was not written|is written twice"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    _assert_nothing_left(tmp_path / "mg")


def test_a_missing_input_directory_is_named_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        qwen35_hf_to_megatron(tmp_path / "nope", tmp_path / "mg", progress=False)
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        qwen35_megatron_to_hf(tmp_path / "nope", tmp_path / "hf", progress=False)
    _assert_nothing_left(tmp_path / "mg")
    _assert_nothing_left(tmp_path / "hf")


def test_a_full_disk_is_one_error_line_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    """ENOSPC in a conversion lane: one `error:` line, exit code 2, no output and no temporary directory."""
    import errno

    from megatron_qwen35.convert import torch_dist

    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch_dist.torch, "save", save_until_full)
    to_mg = runpy.run_path(str(REPO / "tools/convert/hf_to_megatron.py"), run_name="cli")["main"]
    with _untouched(source):
        assert to_mg(["--hf-dir", str(source), "--out-dir", str(tmp_path / "mg"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No space left on device") and "free space and run again" in err[-1]
    _assert_nothing_left(tmp_path / "mg")


def test_a_full_disk_during_export_is_one_error_line_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    """ENOSPC while the export writes its shards: one `error:` line, exit code 2, no output, the checkpoint intact."""
    import errno

    from megatron_qwen35.convert import safetensors_files

    qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    calls = []

    def until_full(write):  # the shards are written by pwrite (headers, computed tensors) and copy_file_range
        def write_until_full(*args):
            calls.append(1)
            if len(calls) > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args)
        return write_until_full

    monkeypatch.setattr(safetensors_files.os, "pwrite", until_full(os.pwrite))
    monkeypatch.setattr(safetensors_files.os, "copy_file_range", until_full(os.copy_file_range))
    to_hf = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")["main"]
    with _untouched(tmp_path / "mg"):
        assert to_hf(["--megatron-dir", str(tmp_path / "mg"), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No space left on device") and "free space and run again" in err[-1]
    _assert_nothing_left(tmp_path / "out")


def test_nan_or_inf_in_a_weight_is_carried_with_a_warning_naming_it(source, tmp_path):
    """transformers loads such a file, so the conversion does too; the tensor is named in a warning both ways."""
    def poison(t):
        t["model.layers.1.linear_attn.dt_bias"][0] = float("nan")

    _rewrite(source, poison)
    with _untouched(source), pytest.warns(UserWarning, match="'model.layers.1.linear_attn.dt_bias' holds 1 NaN"):
        qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    want = r"tensor 'decoder.layers.1.self_attention.dt_bias' holds 1 NaN / Inf"
    with _untouched(tmp_path / "mg"), pytest.warns(UserWarning, match=want):
        qwen35_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    assert_same_hf_checkpoint(source, tmp_path / "out")  # bit for bit, the NaN included


def test_load_model_names_the_cut_off_file_and_tensor(source, tmp_path):
    """A checkpoint whose data file was cut off (an interrupted copy): one error naming the file and a tensor it
    loses, instead of a long traceback from inside torch."""
    from megatron_qwen35.inference import load_model

    qwen35_hf_to_megatron(source, tmp_path / "mg", progress=False)
    data = tmp_path / "mg" / "release" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    want = rf"{data} is cut off at \d+ bytes: '[\w.]+' needs bytes"
    with _untouched(tmp_path / "mg"), pytest.raises(CheckpointFileError, match=want):
        load_model(tmp_path / "mg")
