"""LoRA checkpoints through the converters and the generator, against transformers + peft (fp32, CPU):

- a peft adapter imports beside its base (`hf_to_megatron.py --adapter`) and runs in load_model equal to peft;
- the dropout an adapter trains with is recorded and written where peft takes it;
- the export writes it back as a peft adapter (`--adapter-only`) that PeftModel.from_pretrained loads with equal
  logits (every tensor equal to the source adapter's), or merged into the base, where transformers alone gives the
  LoRA model's logits;
- `tools/generate.py --adapter` gives transformers + peft's greedy tokens;
- an adapter of another model or LoRA shape is one named error, and nothing is written.
"""

import runpy
from pathlib import Path

import pytest
import torch

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.megatron_to_hf import qwen35_adapter_to_peft, qwen35_megatron_to_hf
from tests.test_convert import make_hf_checkpoint
from tests.test_lora import peft_config

pytestmark = pytest.mark.usefixtures("megatron_single_process")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    from megatron_qwen35.hf_reference import modeling

    modeling(is_moe=True), modeling(is_moe=False)  # transformers' torch kernels on CPU
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(batch=2, seq=40, seed=1):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _megatron_logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def released(request, tmp_path_factory):
    """(preset, HF base dir, peft adapter dir, peft model on the base) with random adapter weights."""
    from peft import get_peft_model

    from megatron_qwen35.config import qwen35_preset

    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    hf = make_hf_checkpoint(root / "hf", request.param)
    torch.manual_seed(5)
    peft_model = get_peft_model(_hf_model(hf), peft_config(qwen35_preset(request.param))).eval()
    peft_model.save_pretrained(root / "adapter")
    return request.param, hf, root / "adapter", peft_model


def test_imported_adapter_runs_in_load_model_equal_to_peft(released, tmp_path):
    from megatron_qwen35.inference import load_model

    _, hf, adapter, peft_model = released
    tool = runpy.run_path(str(REPO / "tools/convert/hf_to_megatron.py"), run_name="cli")  # the command users run
    assert tool["main"](["--hf-dir", str(hf), "--adapter", str(adapter), "--out-dir", str(tmp_path / "lora"),
                         "--no-progress"]) == 0
    lora_ckpt = tmp_path / "lora"
    base_ckpt = qwen35_hf_to_megatron(hf, tmp_path / "base", progress=False)
    ids = _ids()
    want = _logits(peft_model, ids)
    for model in (load_model(lora_ckpt), load_model(base_ckpt, adapter=adapter)):
        assert (_megatron_logits(model, ids) - want).abs().max().item() <= TOL


def test_adapter_export_is_the_peft_adapter_and_merged_export_is_the_lora_model(released, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    _, hf, adapter, peft_model = released
    lora_ckpt = qwen35_hf_to_megatron(hf, tmp_path / "lora", adapter=adapter, progress=False)
    out = qwen35_adapter_to_peft(lora_ckpt, tmp_path / "exported")
    want, got = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = _ids()
    reloaded = PeftModel.from_pretrained(_hf_model(hf), out).eval()
    assert (_logits(reloaded, ids) - _logits(peft_model, ids)).abs().max().item() <= TOL
    merged = qwen35_megatron_to_hf(lora_ckpt, tmp_path / "merged", progress=False)
    assert (_logits(_hf_model(merged), ids) - _logits(peft_model, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("released", ["tiny"], indirect=True)  # the MoE model's adapter runs in the tests above
def test_generate_with_an_adapter_gives_peft_tokens(released, tmp_path, capsys):
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    _, hf, adapter, peft_model = released
    base_ckpt = qwen35_hf_to_megatron(hf, tmp_path / "base", progress=False)
    tokenizer, prompt = Qwen35Tokenizer(), "ab c"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        want = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    tool = runpy.run_path(str(REPO / "tools/generate.py"), run_name="cli")
    assert tool["main"](["--checkpoint", str(base_ckpt), "--adapter", str(adapter), "--prompt", prompt,
                         "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(want.tolist()) + "\n"


def test_an_adapter_of_another_model_is_named_and_nothing_is_written(released, tmp_path):
    preset, hf, adapter, _ = released
    other = make_hf_checkpoint(tmp_path / "other", "tiny-moe" if preset == "tiny" else "tiny")
    with pytest.raises(ValueError, match=f"{adapter}: the PEFT adapter lacks '.*' \\(an adapter of other target"):
        qwen35_hf_to_megatron(other, tmp_path / "out", adapter=adapter, progress=False)
    assert not (tmp_path / "out").exists()
    from megatron_qwen35.inference import load_model

    with pytest.raises(ValueError, match=f"{adapter}: the PEFT adapter lacks"):  # generation on the other base
        load_model(qwen35_hf_to_megatron(other, tmp_path / "other_mg", progress=False), adapter=adapter)
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        qwen35_adapter_to_peft(qwen35_hf_to_megatron(hf, tmp_path / "base", progress=False), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # peft's exclude_modules leaves some targets without adapters: named, not "an adapter of another model"
    import json
    import shutil

    excluding = shutil.copytree(adapter, tmp_path / "excluding")
    config = json.loads((excluding / "adapter_config.json").read_text())
    (excluding / "adapter_config.json").write_text(json.dumps({**config, "exclude_modules": ["model.layers.3.x"]}))
    with pytest.raises(ValueError, match=r"exclude_modules \['model.layers.3.x'\]: not supported"):
        qwen35_hf_to_megatron(hf, tmp_path / "out", adapter=excluding, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_dropout_trained_with_is_recorded_and_written_where_peft_takes_it():
    """--lora-dropout is kept in the checkpoint's record and written as the PEFT adapter's lora_dropout; peft takes no
    dropout on target_parameters (routed experts, routers), so an adapter with those is written without it."""
    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.lora import LoRASettings
    from megatron_qwen35.lora.peft_format import peft_config as written_config

    settings = LoRASettings(rank=4, dropout=0.1)
    assert LoRASettings.from_record(settings.to_record()) == settings
    assert written_config(settings, qwen35_preset("tiny"))["lora_dropout"] == 0.1
    assert written_config(settings, qwen35_preset("tiny-moe"))["lora_dropout"] == 0.0
    dense_only = LoRASettings(rank=4, dropout=0.1, target_modules=("q_proj", "down_proj"))
    assert written_config(dense_only, qwen35_preset("tiny-moe"))["lora_dropout"] == 0.1


def test_a_merged_export_onto_a_bf16_release_keeps_its_dtypes_and_files(tmp_path):
    """A bf16 release (transformers' save_pretrained: sharded, per-expert) with a peft adapter: the merged export
    writes every tensor under the release's name, in the release's dtype and shard file, each adapted weight
    `W + scaling B A` computed in fp32 (peft's merge_and_unload on the fp32 model) and rounded once to bf16."""
    import json

    from peft import PeftModel, get_peft_model
    from safetensors import safe_open

    from megatron_qwen35.config import qwen35_preset

    hf = make_hf_checkpoint(tmp_path / "hf", "tiny-moe", dtype=torch.bfloat16)
    torch.manual_seed(5)
    get_peft_model(_hf_model(hf), peft_config(qwen35_preset("tiny-moe"))).save_pretrained(tmp_path / "adapter")
    lora_ckpt = qwen35_hf_to_megatron(hf, tmp_path / "lora", adapter=tmp_path / "adapter", progress=False)
    merged = qwen35_megatron_to_hf(lora_ckpt, tmp_path / "merged", progress=False)
    # peft's merge in fp32, saved by transformers: the release's names (per expert)
    PeftModel.from_pretrained(_hf_model(hf), tmp_path / "adapter").merge_and_unload().save_pretrained(
        tmp_path / "want", max_shard_size="200KB")
    index = "model.safetensors.index.json"
    source, written, want = (json.loads((d / index).read_text())["weight_map"] for d in (hf, merged, tmp_path / "want"))
    assert written == source
    changed = 0
    for name, file in written.items():
        with safe_open(merged / file, "pt") as f, safe_open(hf / file, "pt") as g, \
                safe_open(tmp_path / "want" / want[name], "pt") as w:
            got, base, expected = f.get_tensor(name), g.get_tensor(name), w.get_tensor(name).to(torch.bfloat16)
        assert got.dtype == base.dtype == torch.bfloat16, name
        assert torch.equal(got, expected) or (got.float() - expected.float()).abs().max() <= \
            2 ** -7 * expected.float().abs().max(), name  # fp32 sums in another order: at most a rounding apart
        changed += not torch.equal(got, base)
    assert changed > 0
