"""The pretraining path: forward_step's loss, exact resume through pretrain_qwen35.py, tokenized data round trip."""

import contextlib
import io
import runpy
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain_runs import pretrain

REPO = Path(__file__).resolve().parents[1]


def test_forward_step_loss_equals_hand_computation(megatron_single_process, monkeypatch):
    """Summed masked cross entropy and token count, exactly as computed by hand from the logits."""
    import megatron.training.global_vars as global_vars

    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model
    from megatron_qwen35.training.steps import forward_step

    cfg = qwen35_preset("tiny-moe")  # with MTP: its loss rides on the graph, not in the returned LM loss
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", Namespace(
        create_attention_mask_in_dataloader=False, micro_batch_size=2, seq_length=12, mtp_num_layers=1,
        padded_vocab_size=cfg.vocab_size, check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=False))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    loss_mask = (torch.rand(2, 12, generator=g) > 0.3).float()
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, attention_mask=None,
                 position_ids=torch.arange(12).expand(2, -1))
    with torch.no_grad():
        output, loss_fn = forward_step(iter([batch]), model)
        loss, num_tokens, report = loss_fn(output)
        logits = model(tokens, batch["position_ids"], None)
    hand = (F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none")
            * loss_mask.reshape(-1)).sum()
    assert int(num_tokens) == int(loss_mask.sum())
    assert torch.allclose(loss, hand, rtol=1e-6, atol=0)
    assert torch.allclose(report["lm loss"], torch.stack([hand, loss_mask.sum()]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_loss_stops_the_step_with_megatrons_message(megatron_single_process, monkeypatch, bad):
    """loss_func runs pretrain_gpt's checks through megatron's rerun state machine (on by default)."""
    import megatron.training.global_vars as global_vars

    from megatron_qwen35.training.steps import loss_func

    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", Namespace(check_for_nan_in_loss_and_grad=True,
                                                               check_for_spiky_loss=False))
    per_token = torch.tensor([[1.0, bad, 2.0]])
    what = "NaN" if bad != bad else "Inf"
    with pytest.raises(RuntimeError, match=f"found {what} in local forward loss calculation"):
        loss_func(torch.ones(1, 3), per_token)
    loss, count, _ = loss_func(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 5.0, 2.0]]))
    assert float(loss) == 3.0 and int(count) == 2


def test_a_diverging_run_stops_at_the_nan_with_megatrons_message(tmp_path):
    """Through the entry point: a learning rate that blows the weights up ends the run at the first NaN loss."""
    run = pretrain(tmp_path, "--train-iters", "6", "--lr", "1e12", "--min-lr", "1e11", "--clip-grad", "0",
                   check=False)
    out = run.stdout + run.stderr
    assert "found NaN in local forward loss calculation" in out or "found Inf in local forward loss calculation" in out
    assert "Unexpected result" in out and 1 in run.losses and 6 not in run.losses


def test_resume_continues_exactly(tmp_path):
    """Stopping after step 2 (--exit-interval) and resuming from megatron.training's checkpoint (optimizer, scheduler,
    data position) gives steps 3 and 4 the uninterrupted losses to the bit; the final training checkpoint exports to
    Hugging Face."""
    straight = pretrain(tmp_path, "--train-iters", "4", run_name="straight")
    ckpt = ("--save", str(tmp_path / "resumed"), "--save-interval", "2", "--train-iters", "4")
    first = pretrain(tmp_path, *ckpt, "--exit-interval", "2", run_name="first")
    second = pretrain(tmp_path, *ckpt, "--load", str(tmp_path / "resumed"), run_name="second")
    assert sorted(straight.losses) == [1, 2, 3, 4]
    assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
    for step in (1, 2):
        assert first.losses[step] == straight.losses[step], step
    for step in (3, 4):
        assert second.losses[step] == straight.losses[step], (step, second.losses[step], straight.losses[step])
        assert second.grad_norms[step] == straight.grad_norms[step]

    # A training checkpoint (optimizer state included) exports to Hugging Face names: the model's tensors only.
    from safetensors import safe_open

    from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf

    qwen35_megatron_to_hf(tmp_path / "resumed", tmp_path / "hf", progress=False)
    with safe_open(str(next((tmp_path / "hf").glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "mtp.fc.weight" in names
    assert not any("optimizer" in n or "exp_avg" in n for n in names)


def test_preprocessed_tokens_decode_to_the_source_text(tmp_path):
    """jsonl and plain text -> .bin/.idx -> decode: each document's text, followed by one end-of-document token; one
    worker and two write the same files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen35.data.preprocess import iter_documents, tokenize_to_indexed
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "Qwen3.5 mixes Gated DeltaNet and attention."}\n{"text": "Zweite Zeile: ünïcödé ✓"}\n')
    counts = tokenize_to_indexed([jsonl, REPO / "data" / "tiny_corpus.txt"], tmp_path / "out" / "corpus", workers=2)
    documents = list(iter_documents(jsonl)) + list(iter_documents(REPO / "data" / "tiny_corpus.txt"))
    data = IndexedDataset(str(tmp_path / "out" / "corpus"))
    tok = Qwen35Tokenizer()
    assert counts["documents"] == len(data) == len(documents) == 11
    for i, text in enumerate(documents):
        ids = data[i].tolist()
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert not list((tmp_path / "out").glob("*.tmp*"))
    # one worker tokenizes in this process (no pool): the same bytes
    tokenize_to_indexed([jsonl, REPO / "data" / "tiny_corpus.txt"], tmp_path / "one" / "corpus", workers=1)
    for name in ("corpus.bin", "corpus.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_preprocess_names_a_missing_input(tmp_path):
    from megatron_qwen35.data.preprocess import tokenize_to_indexed

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tokenize_to_indexed([tmp_path / "nope.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("content,message", [
    (b'{"text": "fine"}\n{"text": "broken\n', "docs.jsonl:2: not valid JSON"),
    (b'{"text": "fine"}\n{"text": 42}\n', "docs.jsonl:2: 'text' is a JSON int, not a string"),
    (b'{"text": "fine"}\n["a list"]\n', "docs.jsonl:2: a JSON list, not an object"),
    (b'{"body": "no text field"}\n', "docs.jsonl:1: has no 'text' field"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "docs.jsonl:2: not UTF-8 text (byte 13 of the line"),
])
def test_preprocess_names_the_file_and_line_of_bad_input(tmp_path, content, message):
    """One `error:` line naming file and line (after the progress bar), exit code 2, no output files."""
    (tmp_path / "docs.jsonl").write_bytes(content)
    main = runpy.run_path(str(REPO / "tools" / "data" / "preprocess.py"), run_name="cli")["main"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "out" / "corpus")])
    last = err.getvalue().strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last, err.getvalue()
    assert not list(tmp_path.rglob("corpus*"))
