"""Packed chat samples (data/sft_dataset.py, data/packing.py) and what the model does with them.

- A packed sequence holds each conversation's tokens, the next token as its label within the conversation, the loss on
  exactly the tokens the assistant says, positions restarting at every conversation, padding marked and never in the
  loss, and the boundaries as cu_seqlens (aligned for context parallelism).
- Documents do not see each other: changing one conversation's tokens leaves every other conversation's logits equal
  to the bit (Gated DeltaNet conv and recurrent state, attention, MoE, all reset at the boundaries).
"""

import json

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.data.packing import PackedLayout, first_fit
from megatron_qwen35.data.preprocess_sft import qwen35_preprocess_sft
from megatron_qwen35.data.sft_dataset import Qwen35SFTDataset, build_sft_datasets, sft_samples
from megatron_qwen35.data.tokenizer import qwen35_tokenizer_for

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def test_first_fit_places_each_document_in_the_first_sequence_with_room():
    assert first_fit([5, 3, 6, 2, 4], 10) == [[0, 1, 3], [2, 4]]
    assert first_fit([5, 3, 6, 2, 4], 10, align=4) == [[0], [1, 3], [2], [4]]  # aligned: 8, 4, 8, 4, 4
    with pytest.raises(ValueError, match="document 0 has 11 tokens"):
        first_fit([11], 10)
    assert PackedLayout.of([5, 3], 16, align=4).cu_seqlens == (0, 8, 12, 16)  # a padding document closes it
    assert PackedLayout.of([8, 8], 16).cu_seqlens == (0, 8, 16)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}.", "reasoning_content": "Think."}]}
            for i in range(5)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qwen35_preprocess_sft([root / "c.jsonl"], root / "out", qwen35_preset("tiny-moe"))
    return root / "out"


def test_a_packed_sequence_holds_each_conversation_with_its_labels_loss_and_positions(chat_dir):
    samples = sft_samples(chat_dir)
    lengths = samples.sizes["tokens"].tolist()
    dataset = Qwen35SFTDataset(samples, list(range(5)), 2 * max(lengths) + 8, 1, align=4)
    members = dataset.sequences[0]
    seq = dataset.sequence(members)
    cu = seq["cu_seqlens"][:int(seq["num_documents"]) + 1].tolist()
    tokenizer = qwen35_tokenizer_for(qwen35_preset("tiny-moe"))
    assert cu[0] == 0 and cu[-1] == dataset.seq_length and all(b % 4 == 0 for b in cu)
    for d, k in enumerate(members):
        raw, start = samples[k], cu[d]
        n = len(raw["tokens"])
        assert torch.equal(seq["tokens"][start:start + n], raw["tokens"])
        assert torch.equal(seq["labels"][start:start + n - 1], raw["tokens"][1:])
        assert torch.equal(seq["position_ids"][start:cu[d + 1]], torch.arange(cu[d + 1] - start))
        learned = seq["labels"][start:start + n][seq["loss_mask"][start:start + n].bool()]
        assert tokenizer.decode(learned.tolist()) == "<think>\nThink.\n</think>\n\nAnswer " + str(k) + ".<|im_end|>"
        assert not seq["padding_mask"][start:start + n].any() and seq["padding_mask"][start + n:cu[d + 1]].all()
    assert seq["padding_mask"][cu[len(members)]:].all() and not seq["loss_mask"][seq["padding_mask"]].any()


def test_splits_are_packed_on_their_own_and_evaluation_off_builds_none(chat_dir):
    train, valid, test = build_sft_datasets(chat_dir, 256, [3, 0, 0], vision=None, split="60,40,0")
    assert valid is None and test is None and len(train) == 3
    assert sorted(k for s in train.sequences for k in s) == [0, 1, 2]  # positions in the train split
    _, valid, _ = build_sft_datasets(chat_dir, 256, [3, 2, 0], vision=None, split="60,40,0")
    assert sorted(int(valid.indices[k]) for s in valid.sequences for k in s) == [3, 4]


def _packed_params(cu: torch.Tensor):
    from megatron_qwen35.training.steps import thd_packed_seq_params

    return thd_packed_seq_params(cu)  # what training hands the model


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_changing_one_conversation_leaves_the_others_logits_equal_to_the_bit(preset):
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset(preset)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = (70, 33, 25)  # 70: not a multiple of the GDN's 64-token chunk
    cu = torch.tensor([0, 70, 103, 128], dtype=torch.int32)
    tokens = torch.randint(0, cfg.vocab_size, (1, 128), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    changed = tokens.clone()
    changed[0, 10:60] = torch.randint(0, cfg.vocab_size, (50,), generator=g)  # conversation 0 only
    with torch.no_grad():
        before, after = (model(t, positions, None, packed_seq_params=_packed_params(cu)) for t in (tokens, changed))
    assert not torch.equal(before[:, :70], after[:, :70])
    assert torch.equal(before[:, 70:], after[:, 70:])


def test_chat_demo_set_is_what_the_script_writes_and_preprocesses_for_the_demo_model(tmp_path):
    """tools/data/make_sft_demo.py regenerates data/sft byte for byte; recipes/tiny-sft.sh's preprocessing of it (real
    tokenizer, images from data/vl) keeps every conversation within its sequence length, each with something to
    learn."""
    import runpy

    from tests.test_convert import REPO

    assert runpy.run_path(str(REPO / "tools/data/make_sft_demo.py"))["main"](["--out", str(tmp_path)]) == 0
    assert (tmp_path / "chats.jsonl").read_bytes() == (REPO / "data/sft/chats.jsonl").read_bytes()
    counts = qwen35_preprocess_sft([REPO / "data/sft/chats.jsonl"], tmp_path / "sft", qwen35_preset("tiny-vl-demo"),
                                   media_dir=REPO / "data/vl", image_pixels=(1024, 16384), seq_length=384)
    assert counts["conversations"] == 144 and counts["images"] == 36 and counts["truncated"] == counts["skipped"] == 0
    samples = sft_samples(tmp_path / "sft")
    assert all(int(samples[i]["loss_mask"].sum()) > 0 for i in range(len(samples)))


def test_padding_is_out_of_the_routers_load_balancing_loss():
    """Two conversations packed with 26 or 90 padding tokens after them (padding_mask, as the chat data gives it):
    the loss and every gradient, the routers' (load-balancing loss on) included, are the same; counted as tokens
    (no padding mask), the padding changes the routers' gradients."""
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset("tiny-moe")
    assert cfg.router_aux_loss_coef > 0
    torch.manual_seed(0)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 256, (1, 70), generator=g)

    def gradients(length: int, mask_padding: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
        tokens = torch.cat([text, torch.full((1, length - 70), 256)], dim=1)
        labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        loss_mask = torch.zeros(1, length)
        loss_mask[0, :39], loss_mask[0, 40:69] = 1, 1  # each conversation's next tokens
        padding = torch.zeros(1, length, dtype=torch.bool)
        padding[0, 70:] = mask_padding
        positions = torch.cat([torch.arange(40), torch.arange(30), torch.arange(length - 70)]).unsqueeze(0)
        cu = torch.tensor([0, 40, 70, length], dtype=torch.int32)
        model.zero_grad()
        per_token = model(tokens, positions, None, labels=labels, loss_mask=loss_mask, padding_mask=padding,
                          packed_seq_params=_packed_params(cu))
        loss = (per_token * loss_mask).sum()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (short_loss, short), (long_loss, long) = gradients(96), gradients(160)
    assert abs(short_loss - long_loss) <= 1e-6 * abs(short_loss) and set(short) == set(long)
    routers = [n for n in short if n.endswith("router.weight")]
    assert routers
    for name in short:
        assert (short[name] - long[name]).abs().max().item() <= 1e-6 * max(1.0, short[name].abs().max().item()), name
    _, counted = gradients(160, mask_padding=False)
    assert any((counted[n] - long[n]).abs().max().item() > 1e-6 for n in routers)
