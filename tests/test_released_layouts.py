"""The layouts of the public Qwen3.5 / Qwen3.6 releases, built by transformers itself at tiny size: the converted model
matches transformers loading the very same files (text only, and images with a video through the converted tower),
the Megatron checkpoint keeps the fp32 parameters, and the export gives back the release file for file (tensors,
dtypes, bytes, config files and the shard index).

- Qwen3.5 MoE (Qwen3.5-35B-A3B ...): the VL wrapper (`qwen3_5_moe`, `model.language_model.*`, `model.visual.*`,
  `lm_head.weight`, `mtp.*`); decoder experts fused 3-D (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
  [E, H, I]), the MTP layer's experts per expert; A_log and the GDN norm weight fp32, the rest bf16.
- Qwen3.6 MoE: the same wrapper, every expert fused (MTP too), every tensor bf16.
- Qwen3.5 dense (Qwen3.5-0.8B ... 27B): `qwen3_5` wrapper, dense MTP MLP, tied head (0.8B-4B: no `lm_head.weight`
  stored) or untied (9B, 27B), A_log and the GDN norm weight fp32, the rest bf16.
All sharded the way the releases are: `model.safetensors-0000i-of-0000n.safetensors` + model.safetensors.index.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_qwen35.checkpoint import read_config
from megatron_qwen35.config import (
    Qwen35Config,
    Qwen35VisionConfig,
    qwen35_config_from_hf,
    qwen35_config_to_hf,
    qwen35_preset,
)
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
from megatron_qwen35.convert.safetensors_files import INDEX_NAME, SafetensorsCheckpoint
from megatron_qwen35.convert.table import MULTIMODAL_PREFIX
from megatron_qwen35.convert.torch_dist import TorchDistReader
from megatron_qwen35.hf_reference import modeling, randomize_
from megatron_qwen35.layers.rotary import token_types
from tests.test_convert import KL_TOL, LOGIT_TOL, _mtp_tensors, assert_same_hf_checkpoint
from tests.test_vl_model import vl_batch

pytestmark = pytest.mark.usefixtures("megatron_single_process")

SHARD_BYTES = 96 * 1024  # a few shards for the tiny models, as the releases have many
FP32_IN_RELEASE = ("linear_attn.A_log", "linear_attn.norm.weight")  # Qwen3.5 stores these fp32, the rest bf16
FP32_IN_MEGATRON = ("self_attention.A_log", "self_attention.out_norm.weight")
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, temporal_patch_size=2,
                   spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16)  # transformers' vision_config
# The wrapper's image / video token ids, inside the tiny 512-token vocabulary (the releases' 248053-248057 are not).
VL_TOKEN_IDS = dict(image_token_id=508, video_token_id=509, vision_start_token_id=510, vision_end_token_id=511)
GENERATION_CONFIG = {"bos_token_id": 248044, "do_sample": True, "eos_token_id": [248046, 248044],
                     "pad_token_id": 248044, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


@dataclass(frozen=True)
class Layout:
    preset: str
    mtp_experts: str  # how the MTP layer stores its experts (the decoder's are fused in every release)
    fp32_in_release: tuple[str, ...]  # name suffixes the release stores in fp32
    tied: bool = True  # dense only: 0.8B-4B tie the head, 9B and 27B store lm_head.weight

    @property
    def cfg(self) -> Qwen35Config:
        """The model as our config holds it: the text preset with the release fixture's tower and token ids."""
        cfg = qwen35_preset(self.preset).replace(vision=Qwen35VisionConfig(**TINY_VISION, **VL_TOKEN_IDS))
        return cfg if cfg.is_moe else cfg.replace(tie_word_embeddings=self.tied)


LAYOUTS = {
    "qwen3_5_moe": Layout("tiny-moe", "per_expert", FP32_IN_RELEASE),
    "qwen3_6_moe": Layout("tiny-moe", "packed", ()),
    "qwen3_5_dense_tied": Layout("tiny", "packed", FP32_IN_RELEASE),
    "qwen3_5_dense_untied": Layout("tiny", "packed", FP32_IN_RELEASE, tied=False),
}


@dataclass(frozen=True)
class Release:
    layout: Layout
    cfg: Qwen35Config
    src: Path  # the release-layout Hugging Face directory
    mg: Path  # its conversion
    out: Path  # the conversion exported back


def _conditional_generation(cfg: Qwen35Config, seed: int) -> torch.nn.Module:
    """transformers' Qwen3_5(Moe)ForConditionalGeneration with cfg's text model and a tiny ViT, random weights."""
    m = modeling(cfg.is_moe)
    text = qwen35_config_to_hf(cfg.replace(vision=None))
    for key in ("architectures", "torch_dtype", "tie_word_embeddings"):  # the wrapper owns these
        text.pop(key)
    if cfg.is_moe:
        config_cls, model_cls = m.Qwen3_5MoeConfig, m.Qwen3_5MoeForConditionalGeneration
    else:
        config_cls, model_cls = m.Qwen3_5Config, m.Qwen3_5ForConditionalGeneration
    config = config_cls(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=cfg.tie_word_embeddings,
                        **VL_TOKEN_IDS)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    return randomize_(model_cls(config).float().eval(), seed)


def _write_shards(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The releases' file naming (`model.safetensors-00001-of-00004.safetensors`) and index, planned by
    huggingface_hub as save_pretrained plans it."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model.safetensors{suffix}.safetensors",
                                               max_shard_size=SHARD_BYTES)
    assert split.is_sharded and len(split.filename_to_tensors) > 2
    for file, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(path / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def make_release(path: Path, layout: Layout, seed: int = 0) -> Path:
    """A tiny checkpoint in the layout of a public release, from transformers' own ConditionalGeneration model."""
    cfg = layout.cfg
    model = _conditional_generation(cfg, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # fused experts, as the module holds them
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]  # a tied release stores the embedding only
    assert set(state) == {k for k in state if k.startswith((MULTIMODAL_PREFIX, "model.visual.", "lm_head."))}
    state.update(_mtp_tensors(cfg, hf_prefix=MULTIMODAL_PREFIX, layout=layout.mtp_experts, seed=seed + 5))
    state = {k: v.to(torch.float32 if k.endswith(layout.fp32_in_release) else torch.bfloat16)
             for k, v in state.items()}
    path.mkdir(parents=True)
    _write_shards(path, state)
    (path / "config.json").write_text(model.config.to_json_string())
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return path


@pytest.fixture(scope="module", params=list(LAYOUTS))
def release(request, megatron_single_process, tmp_path_factory) -> Release:
    """Each release layout built once, converted to Megatron and exported back."""
    layout = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = make_release(root / "hf", layout)
    qwen35_hf_to_megatron(src, root / "mg", progress=False)
    qwen35_megatron_to_hf(root / "mg", root / "out", progress=False)  # the source's own shards
    return Release(layout, layout.cfg, src, root / "mg", root / "out")


# ---------------------------------------------------------------------------------------------------------------
# The layout really is the release's
# ---------------------------------------------------------------------------------------------------------------

def test_source_has_the_release_layout(release):
    """Guards the fixture: fused decoder experts, the MTP experts as the release stores them, vision, dtypes."""
    files = SafetensorsCheckpoint(release.src)
    names, lm = set(files), MULTIMODAL_PREFIX
    config = json.loads((release.src / "config.json").read_text())
    assert config["model_type"] == ("qwen3_5_moe" if release.cfg.is_moe else "qwen3_5")
    assert config["architectures"] == [("Qwen3_5MoeForConditionalGeneration" if release.cfg.is_moe
                                        else "Qwen3_5ForConditionalGeneration")]
    assert {"text_config", "vision_config"} <= set(config)
    ours = qwen35_config_from_hf(config)  # our config accepts transformers' vision_config ...
    assert ours.vision == release.cfg.vision == read_config(release.mg)[0].vision
    vision_ids = [getattr(ours.vision, k) for k in VL_TOKEN_IDS]
    assert max(vision_ids) < ours.vocab_size == config["text_config"]["vocab_size"]  # ... and its ids fit the vocab
    assert any(n.startswith("model.visual.blocks.0.") for n in names)
    assert ("lm_head.weight" in names) == (not release.cfg.tie_word_embeddings)
    assert not any(n.startswith("model.layers.") for n in names)
    assert "mtp.fc.weight" in names
    if release.cfg.is_moe:
        e, i, h = release.cfg.num_experts, release.cfg.moe_ffn_hidden_size, release.cfg.hidden_size
        assert files.entries[f"{lm}layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * i, h)
        assert files.entries[f"{lm}layers.0.mlp.experts.down_proj"].shape == (e, h, i)
        assert not any(n.startswith(f"{lm}layers.0.mlp.experts.0.") for n in names)
        if release.layout.mtp_experts == "per_expert":
            assert files.entries["mtp.layers.0.mlp.experts.3.gate_proj.weight"].shape == (i, h)
            assert "mtp.layers.0.mlp.experts.gate_up_proj" not in names
        else:
            assert files.entries["mtp.layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * i, h)
            assert not any(n.startswith("mtp.layers.0.mlp.experts.0.") for n in names)
    else:
        assert f"{lm}layers.0.mlp.gate_proj.weight" in names and "mtp.layers.0.mlp.gate_proj.weight" in names
    for name, entry in files.entries.items():
        want = torch.float32 if name.endswith(release.layout.fp32_in_release) else torch.bfloat16
        assert entry.dtype == want, name
    assert {e.file.name for e in files.entries.values()} == set(json.loads(
        (release.src / INDEX_NAME).read_text())["weight_map"].values())


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers on the very same files
# ---------------------------------------------------------------------------------------------------------------

def _transformers_release_model(path: Path, is_moe: bool) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    m = modeling(is_moe)  # the pure-PyTorch GDN paths, before the layers are built
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model) is (m.Qwen3_5MoeForConditionalGeneration if is_moe else m.Qwen3_5ForConditionalGeneration)
    return model


def _check_release_parameters(reference: torch.nn.Module, release: Release) -> None:
    """transformers loaded every file tensor as stored (fused experts, fp32 A_log, the tower), so a parity check
    against it can fail."""
    params = reference.state_dict()
    files = SafetensorsCheckpoint(release.src)
    loaded = {n for n in files if not n.startswith("mtp.")}  # transformers has no MTP module
    assert loaded == set(params) - ({"lm_head.weight"} if release.cfg.tie_word_embeddings else set())
    for name in loaded:
        assert params[name].dtype == torch.float32 and torch.equal(params[name], files[name].float()), name
    if release.cfg.tie_word_embeddings:
        assert torch.equal(params["lm_head.weight"], params[f"{MULTIMODAL_PREFIX}embed_tokens.weight"])


def _assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """max |delta| <= 1e-4, KL <= 1e-6, same argmax (both compute in fp32 from the same bf16 / fp32 values)."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= LOGIT_TOL
    kl = torch.nn.functional.kl_div(got.double().log_softmax(-1), want.double().log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)  # in fp64: the divergence, not fp32's rounding
    assert kl.max().item() <= KL_TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_converted_model_matches_transformers_on_the_release_files(release):
    """load_model(converted) against transformers' ConditionalGeneration model on the release directory, text only:
    max |delta| <= 1e-4, KL <= 1e-6, same argmax."""
    from megatron_qwen35.inference import load_model

    reference = _transformers_release_model(release.src, release.cfg.is_moe)
    _check_release_parameters(reference, release)
    ids = torch.randint(0, release.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(input_ids=ids).logits.float()
    got = load_model(release.mg)(ids)
    assert got.shape == (2, 24, release.cfg.vocab_size)
    _assert_same_logits(got, want)


def test_converted_model_matches_transformers_on_images_and_a_video(release):
    """The same comparison with the converted tower in use: one batch holding two images and a two-frame video of
    different sizes (test_vl_model's `vl_batch`), transformers given the processor's `mm_token_type_ids`: max |delta|
    <= 1e-4, KL <= 1e-6, same argmax. Guard: other pixels move load_model's logits by far more than the tolerance,
    so a tower that was dropped or mis-converted would fail."""
    from megatron_qwen35.inference import load_model

    reference = _transformers_release_model(release.src, release.cfg.is_moe)
    _check_release_parameters(reference, release)
    batch = vl_batch(release.cfg)
    with torch.no_grad():
        want = reference(**batch, mm_token_type_ids=token_types(batch["input_ids"], release.cfg.vision)).logits
    model = load_model(release.mg)
    got = model(**batch)
    assert got.shape == (*batch["input_ids"].shape, release.cfg.vocab_size)
    _assert_same_logits(got, want.float())
    moved = model(**{**batch, "pixel_values": batch["pixel_values"] + 1.0})
    assert (moved - got).abs().max().item() > 100 * LOGIT_TOL


# ---------------------------------------------------------------------------------------------------------------
# The Megatron checkpoint
# ---------------------------------------------------------------------------------------------------------------

def test_megatron_checkpoint_keeps_a_log_and_the_gdn_norm_in_fp32(release):
    """A_log and the GDN output norm are fp32 in the Megatron checkpoint (A_log holding the release's values to the
    bit), every other tensor bf16."""
    reader = TorchDistReader(release.mg / "release")
    try:
        dtypes = {k: reader.dtype(k) for k in reader.tensors}
        fp32 = {k for k in dtypes if k.endswith(FP32_IN_MEGATRON)}
        n_gdn = sum(t == "linear_attention" for t in release.cfg.layer_types)
        assert len(fp32) == 2 * n_gdn
        assert {k: dtypes[k] for k in fp32} == dict.fromkeys(fp32, torch.float32)
        assert {k: d for k, d in dtypes.items() if k not in fp32 and d != torch.bfloat16} == {}
        files = SafetensorsCheckpoint(release.src)
        for i, layer_type in enumerate(release.cfg.layer_types):
            if layer_type == "linear_attention":
                stored = files[f"{MULTIMODAL_PREFIX}layers.{i}.linear_attn.A_log"]
                assert torch.equal(reader.read(f"decoder.layers.{i}.self_attention.A_log"), stored.float()), i
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------------------------
# The export gives back the release
# ---------------------------------------------------------------------------------------------------------------

def test_export_reproduces_every_tensor_and_the_config_files(release):
    """Every tensor name, dtype, shape and byte (vision and MTP included); config.json and generation_config.json
    byte for byte."""
    assert_same_hf_checkpoint(release.src, release.out)


def test_export_reproduces_the_shard_index(release):
    """The same safetensors files, each tensor in the file the release's index puts it in, the same total size;
    the index and every shard byte for byte."""
    want = json.loads((release.src / INDEX_NAME).read_text())
    got = json.loads((release.out / INDEX_NAME).read_text())
    files = lambda d: sorted(p.name for p in d.glob("*.safetensors"))  # noqa: E731
    assert files(release.out) == files(release.src)
    assert files(release.src) == sorted(set(want["weight_map"].values()))
    moved = {n: (f, got["weight_map"].get(n)) for n, f in want["weight_map"].items() if got["weight_map"].get(n) != f}
    assert not moved, f"{len(moved)} of {len(want['weight_map'])} tensors not in the release's file, e.g. " + \
        ", ".join(f"{n}: {f} -> {g}" for n, (f, g) in list(moved.items())[:3])
    assert got["weight_map"] == want["weight_map"]
    assert got["metadata"]["total_size"] == want["metadata"]["total_size"]
    for name in [INDEX_NAME, *files(release.src)]:
        assert (release.out / name).read_bytes() == (release.src / name).read_bytes(), name
