"""Conversion parity at a released model's real shapes: benchmarks/real_shapes.py's 0.8b case, asserted.

The full 0.8b model (24 layers, vocabulary 248320, tied head, its MTP layer), stored as Hugging Face stores the release
(bf16 with fp32 A_log and GDN norm weight, sharded with an index): HF -> Megatron, real text through transformers'
model on the source files and through load_model of the conversion (both fp32), Megatron -> HF bitwise. Each step runs
in its own process, as the benchmark runs it (measured on two cores: 75-100 s, 5.1 GiB peak RSS, in the step that
runs transformers' model).

The benchmark's 35b-a3b slice (2 layers, all 256 experts, real vocabulary) is not run here: in fp32 transformers' model
peaks at ~16 GiB RSS and load_model at ~20 GiB, and the case takes ~5 minutes; `python benchmarks/real_shapes.py`
runs it.
"""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_shapes  # noqa: E402  (benchmarks/real_shapes.py; spawned steps import it by this name too)

from megatron_qwen35.checkpoint import read_config  # noqa: E402


@pytest.mark.slow
def test_0_8b_converts_to_the_same_logits_and_back_bitwise(tmp_path):
    """max |delta logit| <= 1e-4, KL(ref || ours) <= 1e-6 at every token, the same argmax at every token, and the
    export equal to the source in every tensor's name, dtype, shape and byte and in config.json /
    generation_config.json."""
    case = real_shapes.CASES["0.8b"]
    try:
        r = real_shapes.run_case(case, tmp_path, batch=2, seq=64, log=lambda *_: None)
        cfg, _ = read_config(tmp_path / "mg")
    finally:  # three checkpoints of ~1.4 GiB and two logits files: pytest would keep them
        for p in tmp_path.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    print("\n" + real_shapes.report(r))

    # what was converted: the real shapes, the MTP layer, the release's fp32 tensors (A_log and GDN norm per GDN layer)
    assert (cfg.num_layers, cfg.vocab_size, cfg.hidden_size, cfg.mtp_num_layers) == (24, 248320, 1024, 1)
    assert cfg.tie_word_embeddings
    assert r["build"]["fp32_tensors"] == 2 * cfg.layer_types.count("linear_attention") == 36
    assert r["build"]["shards"] > 1

    lg = r["logits"]
    assert lg["shape"] == (2, 64, 248320)
    assert lg["max_abs_delta"] <= real_shapes.LOGIT_TOL, lg
    assert lg["kl_max"] <= real_shapes.KL_TOL, lg
    assert lg["top1_agree"] == lg["tokens"], lg

    rt = r["round_trip"]
    assert not rt["missing"] and not rt["extra"], rt
    assert rt["bitwise"] == rt["tensors"] == r["build"]["tensors"], rt["differ"][:5]
    assert rt["files_equal"] == {"config.json": True, "generation_config.json": True}
    # by default the export writes the converted source's own files: same shard names and index, each byte for byte
    assert rt["identical_files"] == rt["source_files"] == len(rt["export_files"]), rt["export_files"]
