"""Generation under tensor and expert parallelism equals the single process (gloo, 2 ranks).

Each rank loads the checkpoint the single process saved through `load_model` (which builds the model for the current
layout) and generates for the same left-padded batch of three prompts. TP2 splits every attention and GDN layer's
heads (KV caches and GDN states hold each rank's share) and the vocabulary; EP2 splits the experts.
"""

import pytest
import torch

from megatron_qwen35.checkpoint import save_checkpoint
from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict
from megatron_qwen35.hf_reference import reference_model
from megatron_qwen35.provider import qwen35_gpt_model
from tests.parallel.harness import run_distributed

NEW_TOKENS = 16
LOGPROB_TOL = 1e-5  # fp32: TP splits the projections' sums and the vocabulary's softmax; measured 1.9e-6
LAYOUTS = {"tp2": dict(tensor_parallel=2), "ep2": dict(expert_parallel=2)}


def _prompts(cfg):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 66, 2)]


def _generate(cfg, checkpoint_dir, sample_seed):
    """Greedy sequences and log-probabilities, and 8 tokens drawn at temperature 1 with `sample_seed`."""
    from megatron_qwen35.inference import generate, left_padded, load_model

    model = load_model(checkpoint_dir)
    input_ids, attention_mask = left_padded(_prompts(cfg))
    sequences, logprobs = generate(model, input_ids, NEW_TOKENS, attention_mask=attention_mask,
                                   return_logprobs=True)
    sampled = generate(model, input_ids, 8, temperature=1.0, attention_mask=attention_mask,
                       generator=torch.Generator().manual_seed(sample_seed))
    return sequences, logprobs, sampled


def _rank(rank, world, preset, layout, checkpoint_dir):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(**layout)
    return _generate(qwen35_preset(preset), checkpoint_dir, sample_seed=100 + rank)  # each rank its own draw


@pytest.mark.parametrize("preset,layout", [("tiny", "tp2"), ("tiny-moe", "tp2"), ("tiny-moe", "ep2")])
def test_parallel_generation_equals_single_process(preset, layout, tmp_path, megatron_single_process):
    """TP2 / EP2 generate the single process's greedy tokens, with its log-probabilities (<= 1e-5); and tokens
    drawn with a different generator on each rank still agree across tensor-parallel ranks (rank 0's draw is
    used), which keeps their caches one model's."""
    cfg = qwen35_preset(preset)
    single = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
    load_hf_state_dict(single, cfg, reference_model(cfg.replace(mtp_num_layers=0)).state_dict(), include_mtp=False)
    save_checkpoint(single, cfg, tmp_path / "weights")
    want_sequences, want_logprobs, _ = _generate(cfg, tmp_path / "weights", sample_seed=0)

    results = run_distributed(_rank, 2, preset, LAYOUTS[layout], str(tmp_path / "weights"))
    for sequences, logprobs, _ in results:
        assert torch.equal(sequences, want_sequences)
        assert (logprobs - want_logprobs).abs().max().item() <= LOGPROB_TOL
    if layout == "tp2":
        assert torch.equal(results[0][2], results[1][2])
