"""--reset-attention-mask: pretraining sequences cut into their documents at end-of-document tokens, through the same
packed (THD) path as chat fine-tuning, so every layer (attention, Gated DeltaNet state, rope, MTP) restarts at each.
Proven through the recipe (recipes/common.sh -> pretrain_qwen35.py) from a converted checkpoint: the documents are
separated (the losses change), TP2 + SP, PP2, EP2 and DP2 log the single process's losses, and what the path cannot
do (CP, several sequences per micro-batch) is refused by name; in one process, each document of a cut sequence
computes as it does alone."""

import numpy as np
import pytest
import torch

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.training.steps import document_boundaries
from tests.parallel.test_pretrain_layouts import REL_TOL
from tests.pretrain_runs import recipe
from tests.test_convert import make_hf_checkpoint

EOD = 256  # the byte-level vocabulary's end of document (the tiny presets)


def test_document_boundaries_follow_each_end_of_document_token():
    tokens = torch.tensor([[5, 6, EOD, 7, EOD, 8, 9, 10]])
    assert document_boundaries(tokens, EOD).tolist() == [0, 3, 5, 8]
    assert document_boundaries(torch.tensor([[1, 2, EOD]]), EOD).tolist() == [0, 3]  # a final EOD ends the last
    with pytest.raises(ValueError, match="--micro-batch-size 1"):
        document_boundaries(torch.zeros(2, 4, dtype=torch.long), EOD)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_a_sequence_cut_at_its_end_of_document_tokens_runs_each_document_as_if_alone(preset):
    """What training hands the model for a --reset-attention-mask sequence (training/steps.py: its
    document_boundaries as THD PackedSeqParams, the dataset's running positions as they come without
    --reset-position-ids): each document's logits equal it run alone (fp32), and changing one document leaves the
    next one's logits equal to the bit (the GDN state and conv, attention and rope restart at each boundary)."""
    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model
    from tests.test_sft import _packed_params

    cfg = qwen35_preset(preset)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = (70, 33, 25)  # 70: not a multiple of the GDN's 64-token chunk
    tokens = torch.randint(0, EOD, (1, sum(lengths)), generator=g)
    ends = torch.tensor(lengths).cumsum(0)
    tokens[0, ends[:-1] - 1] = EOD  # the last document ends with the sequence
    cu = document_boundaries(tokens, EOD)
    assert cu.tolist() == [0, *ends.tolist()]
    running = torch.arange(tokens.shape[1]).unsqueeze(0)
    changed = tokens.clone()
    changed[0, 10:60] = torch.randint(0, EOD, (50,), generator=g)  # the first document only
    with torch.no_grad():
        packed, after = (model(t, running, None, packed_seq_params=_packed_params(cu)) for t in (tokens, changed))
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            alone = model(tokens[:, start:end], torch.arange(end - start).unsqueeze(0), None)
            assert (packed[:, start:end] - alone).abs().max().item() <= 1e-5, (start, end)
    assert not torch.equal(packed[:, :70], after[:, :70])
    assert torch.equal(packed[:, 70:], after[:, 70:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 documents of 3-14 byte ids, each ending in the end-of-document token."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path_factory.mktemp("corpus") / "docs"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    g = np.random.default_rng(0)
    for _ in range(80):
        doc = [*g.integers(0, 256, g.integers(2, 14)).tolist(), EOD]
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny MoE + MTP checkpoint from transformers, converted: every run starts from the same weights."""
    root = tmp_path_factory.mktemp("converted")
    hf = make_hf_checkpoint(root / "hf", "tiny-moe", how="packed", mtp_layout="per_expert", seed=3)
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


SETTINGS = dict(MOCK_DATA="0", MICRO_BATCH="1", GLOBAL_BATCH="2")
FLAGS = ("--null-tokenizer-eod-id", str(EOD))


@pytest.fixture(scope="module")
def separated(corpus, converted, tmp_path_factory):
    return recipe(tmp_path_factory.mktemp("reset"), *FLAGS, "--reset-attention-mask", LOAD=str(converted),
                  DATA_PATH=str(corpus), run_name="reset", **SETTINGS)


def test_separated_documents_train_otherwise_than_a_running_stream(separated, corpus, converted, tmp_path):
    stream = recipe(tmp_path, *FLAGS, LOAD=str(converted), DATA_PATH=str(corpus), run_name="stream", **SETTINGS)
    assert sorted(separated.losses) == sorted(stream.losses) == [1, 2, 3]
    assert abs(separated.losses[1] - stream.losses[1]) > 1e-3  # documents no longer see their predecessors


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(TP="2"), dict(PP="2"), dict(EP="2"), {}],
                         ids=["tp2_sp", "pp2", "ep2", "dp2"])
def test_separated_documents_at_a_layout_log_the_single_process_losses(separated, corpus, converted, tmp_path,
                                                                      settings):
    """(From a converted checkpoint, as every layout test: megatron.training would initialise each layout
    differently.)"""
    run = recipe(tmp_path, *FLAGS, "--reset-attention-mask", nproc=2, LOAD=str(converted), DATA_PATH=str(corpus),
                 run_name="layout", **SETTINGS, **settings)
    for step in (1, 2, 3):
        for want, got in ((separated.losses[step], run.losses[step]),
                          (separated.grad_norms[step], run.grad_norms[step])):
            assert abs(got - want) <= REL_TOL[step] * abs(want), (settings, step, got, want)


@pytest.mark.parametrize("settings,nproc,says", [
    (dict(MICRO_BATCH="2", GLOBAL_BATCH="4"), 1, "--reset-attention-mask separates each sequence's documents as a "
                                                 "packed sequence, one per micro-batch: --micro-batch-size 1, not 2"),
    (dict(CP="2"), 2, "--reset-attention-mask with context parallelism"),
])
def test_what_separated_documents_cannot_do_is_refused(corpus, converted, tmp_path, settings, nproc, says):
    run = recipe(tmp_path, *FLAGS, "--reset-attention-mask", nproc=nproc, LOAD=str(converted), DATA_PATH=str(corpus),
                 check=False, **{**SETTINGS, **settings})
    assert (run.stderr + run.stdout).count(says) == 1 and not run.losses
