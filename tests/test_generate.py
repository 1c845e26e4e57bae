"""Generation in megatron (`megatron_qwen35.inference.generate`) against transformers' `generate` and against the
training forward, on tiny random dense and MoE models in fp32 on CPU.

The batch is three prompts of 5, 70 and 13 tokens, left-padded to 70 (70: more than one 64-token GDN chunk), and
32 new tokens each. Tolerances, in fp32: a decode step's logits against the full-sequence forward differ by the
summation order of the chunked and recurrent GDN forms and of attention over a cache (<= 1e-4, the issue's bound);
log-probabilities by the same (<= 1e-5). Measured maxima are in the docstrings.
"""

from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict
from megatron_qwen35.data.chat_template import IMAGE_SLOT
from megatron_qwen35.hf_reference import reference_model
from megatron_qwen35.inference import (
    Qwen35CausalLM,
    generate,
    left_padded,
    sample_next_tokens,
    stream_generate,
)
from megatron_qwen35.provider import qwen35_gpt_model

PROMPT_LENGTHS = (5, 70, 13)
NEW_TOKENS = 32
LOGIT_TOL = 1e-4
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def models(request, megatron_single_process):
    """(transformers' model, ours with its weights): the tiny preset with its MTP layer, which generation skips."""
    cfg = qwen35_preset(request.param)
    hf = reference_model(cfg.replace(mtp_num_layers=0), seed=0)
    gpt = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(gpt, cfg, hf.state_dict(), include_mtp=False)
    return hf, Qwen35CausalLM(gpt, cfg).eval()


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def prompts(models):
    return _prompts(models[1].config.vocab_size)


@pytest.fixture(scope="module")
def generated(models, prompts):
    """Our greedy steps over the padded batch: (input_ids, attention_mask, sequences, logprobs, logits per step)."""
    input_ids, attention_mask = left_padded(prompts)
    steps = list(stream_generate(models[1], input_ids, NEW_TOKENS, attention_mask=attention_mask))
    sequences = torch.cat([input_ids] + [s.tokens.unsqueeze(1) for s in steps], dim=1)
    logprobs = torch.stack([s.logprobs for s in steps], dim=1)
    logits = torch.stack([s.logits for s in steps], dim=1)  # [b, n, vocab]
    return input_ids, attention_mask, sequences, logprobs, logits


def _unpadded_rows(prompts, sequences):
    """Each row's prompt and continuation, without its pads."""
    width = max(len(p) for p in prompts)
    return [torch.tensor(p + sequences[i, width:].tolist()) for i, p in enumerate(prompts)]


def _training_forward(gpt, rows, labels=None):
    """GPTModel.forward as `training/steps.py`'s forward_step calls it, on the rows right-padded to one batch (its
    causal masks keep the padding after each row from reaching the row): logits [b, s, vocab], or with `labels` the
    per-token losses [b, s]."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    positions = torch.arange(width).expand_as(tokens)
    with torch.no_grad():
        if labels is None:
            return gpt(tokens, positions, None)
        return gpt(tokens, positions, None, labels=labels(tokens))


def test_greedy_tokens_equal_transformers_generate(models, generated):
    """32 greedy tokens for three left-padded prompts of different lengths equal transformers' `generate` on the same
    batch with its attention mask, token for token."""
    hf, _ = models
    input_ids, attention_mask, sequences, _, _ = generated
    with torch.no_grad():
        want = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)
    assert sequences.shape == want.shape == (3, max(PROMPT_LENGTHS) + NEW_TOKENS)
    assert torch.equal(sequences, want)
    assert len(set(sequences[:, -NEW_TOKENS:].flatten().tolist())) > 8  # not one repeated token: a test that can fail


def test_every_decode_step_logits_equal_the_full_sequence_forward(models, prompts, generated):
    """Step t's logits for each row (prompt processed once, then the caches) equal the training forward's logits of
    the row's whole unpadded sequence at that position: max |delta| <= 1e-4 (measured 5.4e-6 dense, 1.2e-5 MoE)."""
    _, model = models
    _, _, sequences, _, step_logits = generated
    full = _training_forward(model.model, _unpadded_rows(prompts, sequences))
    for row, prompt in enumerate(prompts):
        want = full[row, len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS]
        err = (step_logits[row] - want).abs().max().item()
        assert err <= LOGIT_TOL, f"row {row}: max |delta logit| {err:.2e}"


def test_logprobs_equal_the_training_forward(models, prompts, generated):
    """The log-probabilities generate returns equal -loss of the training forward (GPTModel with labels, as
    forward_step calls it) at the generated tokens: <= 1e-5 (measured 2.4e-6 dense, 4.3e-6 MoE)."""
    _, model = models
    _, _, sequences, logprobs, _ = generated
    rows = _unpadded_rows(prompts, sequences)
    losses = _training_forward(model.model, rows, labels=lambda t: torch.roll(t, -1, dims=1))  # [b, s]
    for row, prompt in enumerate(prompts):
        want = -losses[row, len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS]
        err = (logprobs[row] - want).abs().max().item()
        assert err <= LOGPROB_TOL, f"row {row}: max |delta logprob| {err:.2e}"


def test_a_prompt_fed_in_two_pieces_gives_the_same_next_token_logits(megatron_single_process):
    """Left-padded prompts through the model as 40 then 30 slots (the second piece reads the first's KV cache and
    GDN states, with causal attention inside it) give the next-token logits of the prompts fed at once (fp32,
    <= 1e-4; a piece that could see its own future is off by 0.65). Eight layers, so that a second attention layer
    reads what the first wrote inside the piece."""
    from megatron_qwen35.layers.inference_context import Qwen35InferenceContext

    cfg = qwen35_preset("tiny").replace(num_layers=8, mtp_num_layers=0)
    gpt = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(gpt, cfg, reference_model(cfg, seed=2).state_dict(), include_mtp=False)
    model = Qwen35CausalLM(gpt, cfg).eval()
    input_ids, attention_mask = left_padded(_prompts(cfg.vocab_size))
    logits = []
    for pieces in ([70], [40, 30]):
        context = Qwen35InferenceContext(attention_mask == 0, max_sequence_length=input_ids.shape[1])
        rope = model.rotary_pos_emb(context.positions())
        for piece in input_ids.split(pieces, dim=1):
            last = model.prefill_or_decode(piece, context, rope)
        logits.append(last)
    assert (logits[1] - logits[0]).abs().max().item() <= LOGIT_TOL


def test_generate_returns_the_streamed_steps(models, generated):
    """`generate` is the streamed steps put together: sequences [b, s + n] and log-probabilities [b, n]."""
    input_ids, attention_mask, sequences, logprobs, _ = generated
    got, got_logprobs = generate(models[1], input_ids, NEW_TOKENS, attention_mask=attention_mask,
                                 return_logprobs=True)
    assert torch.equal(got, sequences) and torch.equal(got_logprobs, logprobs)


@pytest.mark.parametrize("min_new_tokens", [0, 6])
def test_rows_end_at_eos_like_transformers(models, generated, min_new_tokens):
    """With an end token (the 4th token row 0 generates), a row that emits it is filled with it and generation stops
    once every row has ended; min_new_tokens keeps the end token from being drawn before then. Sequences equal
    transformers' (pad_token_id = eos, the same min_new_tokens); log-probabilities after the end are 0."""
    hf, model = models
    input_ids, attention_mask, sequences, _, _ = generated
    eos = int(sequences[0, input_ids.shape[1] + 3])
    ours, logprobs = generate(model, input_ids, NEW_TOKENS, eos_token_id=eos, min_new_tokens=min_new_tokens,
                              attention_mask=attention_mask, return_logprobs=True)
    with torch.no_grad():
        want = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos, min_new_tokens=min_new_tokens)
    assert torch.equal(ours, want)
    new = ours[:, input_ids.shape[1]:]
    if min_new_tokens == 0:
        assert (new[0, 3:] == eos).all() and (logprobs[0, 4:] == 0).all() and logprobs[0, 3] < 0
    else:
        assert (new[:, :min_new_tokens] != eos).all()


def test_one_prompt_without_padding_equals_its_row_in_the_padded_batch(models, prompts, generated):
    """The 13-token prompt alone (no attention mask, no padding) generates what its row of the padded batch did."""
    _, model = models
    input_ids, _, sequences, _, _ = generated
    alone = generate(model, torch.tensor([prompts[2]]), NEW_TOKENS)
    assert torch.equal(alone[0, len(prompts[2]):], sequences[2, input_ids.shape[1]:])


def test_generation_and_forward_never_run_the_mtp_head(models, generated):
    """The MTP layer is a training loss: neither the logits forward nor generation calls it."""
    _, model = models
    input_ids, attention_mask = generated[:2]

    def refuse(*args):
        raise AssertionError("the MTP block ran")

    handle = model.model.mtp.register_forward_pre_hook(refuse)
    try:
        model(input_ids[:, -5:])
        generate(model, input_ids, 2, attention_mask=attention_mask)
    finally:
        handle.remove()


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(models, generated):
    """Draws follow the generator (same seed, same tokens); a nucleus of almost no mass keeps only the most likely
    token, which is greedy decoding."""
    _, model = models
    input_ids, attention_mask, sequences = generated[:3]

    def sampled(seed, **kwargs):
        return generate(model, input_ids, 8, attention_mask=attention_mask,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sampled(3, temperature=0.8), sampled(3, temperature=0.8))
    assert torch.equal(sampled(4, temperature=1.5, top_p=1e-6), sequences[:, :input_ids.shape[1] + 8])


def test_a_padded_batch_needs_attention_that_masks_pads(models, generated, monkeypatch):
    """Transformer Engine's causal core attention ignores a padding mask: a left-padded batch on it is refused by name
    (here one attention layer's core attention swapped for another class); one unpadded prompt still generates."""
    _, model = models
    input_ids, attention_mask = generated[:2]
    attention = next(layer.self_attention for layer in model.model.decoder.layers
                     if hasattr(layer.self_attention, "core_attention"))

    class OtherCoreAttention(torch.nn.Module):
        forward = attention.core_attention.forward

    monkeypatch.setattr(attention, "core_attention", OtherCoreAttention())
    with pytest.raises(ValueError, match="backend='local'"):
        generate(model, input_ids, 2, attention_mask=attention_mask)
    assert generate(model, input_ids[:1, -5:], 2).shape == (1, 7)


def test_top_p_draws_only_from_the_nucleus():
    """Probabilities (0.5, 0.3, 0.15, 0.05) with top_p 0.7: only tokens 0 and 1 are ever drawn, both of them are."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    drawn = sample_next_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus


@pytest.mark.parametrize("change, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=4096), "exceeds the model's max_position_embeddings 4096"),
    (dict(input_ids=torch.tensor([1, 2, 3])), r"input_ids must be an integer tensor \[batch, seq\]"),
    (dict(input_ids=torch.tensor([[1, 600]])), r"outside the model's vocabulary \[0, 512\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), r"attention_mask rows \[0\] are not left-padded"),
    (dict(eos_token_id=[3, 9999]), "eos_token_id must be token ids"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
])
def test_bad_arguments_are_named(models, change, message):
    """Each bad argument is one ValueError that names it, before the model runs."""
    kwargs = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4) | change
    with pytest.raises(ValueError, match=message):
        generate(models[1], **kwargs)


# ------------------------------------------------------------------------------------------------
# tools/generate.py
# ------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _tool():
    return runpy.run_path(str(REPO / "tools/generate.py"), run_name="cli")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, megatron_single_process):
    """The tiny model (512-token vocabulary: prompts of single Latin letters fit it) saved as a checkpoint."""
    from megatron_qwen35.checkpoint import save_checkpoint

    cfg = qwen35_preset("tiny")
    gpt = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
    load_hf_state_dict(gpt, cfg, reference_model(cfg.replace(mtp_num_layers=0)).state_dict(), include_mtp=False)
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(gpt, cfg, path)
    return path


def test_generate_tool_prints_the_prompt_and_its_greedy_continuation(tiny_checkpoint, capsys):
    """`tools/generate.py --checkpoint DIR --prompt TEXT` prints the prompt and the text of generate's greedy tokens."""
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer
    from megatron_qwen35.inference import load_model

    tokenizer = Qwen35Tokenizer()
    prompt = "ab c"
    assert _tool()["main"](["--checkpoint", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    ids = torch.tensor([tokenizer.encode(prompt)])
    want = generate(load_model(tiny_checkpoint), ids, 6)[0, ids.shape[1]:]
    assert capsys.readouterr().out == prompt + tokenizer.decode(want.tolist()) + "\n"


def test_the_pytorch_gdn_path_is_chosen_explicitly_for_generation(tiny_checkpoint, capsys, monkeypatch):
    """--gdn-kernels torch (load_model's gdn_kernels): on a CUDA node where FLA does not import, the way to generate
    that its error names; every Gated DeltaNet layer gets the choice, and the tokens are the default's (CPU: the
    PyTorch path either way)."""
    import megatron_qwen35.inference as inference
    from megatron_qwen35.layers.gated_delta_net import Qwen35GatedDeltaNet

    built = []
    monkeypatch.setattr(inference, "load_model", lambda *a, f=inference.load_model, **k: built.append(f(*a, **k))
                        or built[-1])
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "ab c", "--max-new-tokens", "6"]
    assert _tool()["main"](args) == 0
    default = capsys.readouterr().out
    assert _tool()["main"]([*args, "--gdn-kernels", "torch"]) == 0
    assert capsys.readouterr().out == default
    kernels = [[m.kernels for m in model.modules() if isinstance(m, Qwen35GatedDeltaNet)] for model in built]
    assert kernels[0] and set(kernels[0]) == {"fla"} and set(kernels[1]) == {"torch"}


def test_text_stream_holds_back_an_unfinished_character():
    """Byte-level tokens can end inside a UTF-8 character ('𝔘𝔫' is six tokens): the stream prints nothing that
    decodes to the replacement character while it grows, and at the end exactly the text of all tokens."""
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    tokenizer = Qwen35Tokenizer()
    out = io.StringIO()
    writes = []
    out.write = lambda text, write=out.write: writes.append(text) or write(text)
    stream = _tool()["_TextStream"](tokenizer, out)
    for token in tokenizer.encode("x𝔘𝔫"):
        stream.add(token)
    assert out.getvalue() == "x𝔘𝔫" and not any("\ufffd" in w for w in writes) and len(writes) == 3
    stream.add(tokenizer.encode("𝔘")[0])  # generation stops inside a character: the end prints what there is
    stream.finish()
    assert out.getvalue() == "x𝔘𝔫\ufffd\n"


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/ckpt", "--prompt", "a"], "checkpoint directory /nonexistent/ckpt does not exist"),
    (["--prompt", "The small model"], "outside the 512-token vocabulary of the checkpoint"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "a", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "a", "--image", "x.png"], "--image needs a vision-language checkpoint"),
    (["--prompt", "a", "--system", "Be brief."], "--system shapes a chat prompt: it needs --chat"),
    (["--prompt", "a", "--no-thinking"], "--no-thinking shapes a chat prompt: it needs --chat"),
    (["--prompt", "a", "--thinking"], "--thinking shapes a chat prompt: it needs --chat"),
    (["--prompt", "a", "--chat"], "outside the 512-token vocabulary of the checkpoint"),
    (["--prompt", "a", "--tensor-parallel", "2"], "TP 2 x PP 1 x CP 1 = 2 does not divide the job's 1 process(es)"),
])
def test_generate_tool_names_bad_input_in_one_line(tiny_checkpoint, capsys, args, message):
    """A missing checkpoint, a prompt the model's vocabulary cannot hold (a chat's markers in a byte-sized one), an
    empty prompt, a bad setting or a chat setting without --chat: one `error: ...` line, exit code 2, nothing printed
    on stdout."""
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(tiny_checkpoint)] + args
    assert _tool()["main"](args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_inference_context_hides_pad_keys_and_counts_positions_from_real_tokens():
    """Row 0 opens with two pads: its real tokens sit at positions 0, 1, 2, ...; a pad key is hidden from every query
    but the pad itself; after the prompt no token is padding; an unpadded batch needs no mask at all."""
    from megatron_qwen35.layers.inference_context import Qwen35InferenceContext

    context = Qwen35InferenceContext(torch.tensor([[True, True, False], [False, False, False]]), max_sequence_length=5)
    assert context.positions().tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert context.padding(3).tolist() == [[True, True, False], [False, False, False]]
    assert context.attention_mask(3)[:, 0].tolist() == [
        [[False, True, False], [True, False, False], [True, True, False]],
        [[False, False, False]] * 3]
    context.increment_sequence_len_offset(3)
    assert context.padding(1) is None
    assert context.attention_mask(1)[:, 0].tolist() == [[[True, True, False, False]], [[False] * 4]]
    assert Qwen35InferenceContext(torch.zeros(2, 3, dtype=torch.bool), 5).attention_mask(3) is None


def test_generate_tool_continues_a_prompt_after_an_image(tmp_path, capsys, megatron_single_process):
    """`--image PNG`: the image before the prompt, prepared by the data pipeline's processor, and generate's greedy
    tokens with it printed (a randomly initialised tiny-vl-demo, real vocabulary); a missing image is named. With
    --chat the image opens the user turn of the released template's conversation, and only the reply is printed."""
    from megatron_qwen35.checkpoint import save_checkpoint
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer
    from megatron_qwen35.inference import load_model

    cfg = qwen35_preset("tiny-vl-demo").replace(mtp_num_layers=0)
    save_checkpoint(qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32),
                                     backend="local"), cfg, tmp_path / "vl")
    image = REPO / "data/vl/images/00_red_circle.png"
    tool = _tool()
    assert tool["main"](["--checkpoint", str(tmp_path / "vl"), "--image", str(image), "--prompt", "A red",
                         "--max-new-tokens", "4"]) == 0
    tokenizer = Qwen35Tokenizer()
    model = load_model(tmp_path / "vl")
    ids, vision = tool["_with_images"](model, tokenizer, "<image>A red", [image])
    assert int((ids == cfg.vision.image_token_id).sum()) == int(vision["image_grid_thw"].prod()) // 4
    want = generate(model, ids, 4, **vision)[0, ids.shape[1]:]
    assert capsys.readouterr().out == "A red" + tokenizer.decode(want.tolist()) + "\n"
    assert tool["main"](["--checkpoint", str(tmp_path / "vl"), "--image", str(tmp_path / "no.png"), "--prompt",
                         "A"]) == 2
    assert "--image " + str(tmp_path / "no.png") + " does not exist" in capsys.readouterr().err
    # --chat: the image inside the user turn, where the released template writes it; only the reply printed
    assert tool["main"](["--checkpoint", str(tmp_path / "vl"), "--image", str(image), "--prompt", "A red",
                         "--chat", "--max-new-tokens", "4"]) == 0
    text = _released_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A red"}]}])
    assert text.count(IMAGE_SLOT) == 1
    ids, vision = tool["_with_images"](model, tokenizer, text.replace(IMAGE_SLOT, "<image>"), [image])
    want = generate(model, ids, 4, eos_token_id=CHAT_END_IDS, **vision)[0, ids.shape[1]:]
    assert capsys.readouterr().out == tokenizer.decode([t for t in want.tolist() if t not in CHAT_END_IDS]) + "\n"


# ------------------------------------------------------------------------------------------------
# tools/generate.py --chat
# ------------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
RELEASED_TEMPLATES = {True: FIXTURES / "qwen3_5_chat_template.jinja",  # 4B and larger: thinking on by default
                      False: FIXTURES / "qwen3_5_small_chat_template.jinja"}  # 0.8B and 2B: off
IM_END, ENDOFTEXT = 248046, 248044  # Qwen3.5's <|im_end|> and <|endoftext|>: generation_config.json's eos_token_id
CHAT_END_IDS = [IM_END, ENDOFTEXT]


def _released_template(messages, *, thinking_by_default: bool = True, **kwargs) -> str:
    """The generation prompt transformers' `apply_chat_template` renders with a released template (its own
    renderer, `render_jinja_template`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], add_generation_prompt=True,
                                        chat_template=RELEASED_TEMPLATES[thinking_by_default].read_text(), **kwargs)
    return rendered[0]


def test_thinking_by_default_follows_the_released_template_revision():
    """The 0.8B and 2B shapes open the reply without thinking (whatever their checkpoint is named, as a converted
    one is named after its folder); 4B and larger, and the tiny presets, with it."""
    from megatron_qwen35.chat import qwen35_thinking_by_default

    assert not qwen35_thinking_by_default(qwen35_preset("0.8b"))
    assert not qwen35_thinking_by_default(qwen35_preset("2b").replace(name="Qwen3.5-2B", vision=None))
    for name in ("4b", "9b", "27b", "35b-a3b", "397b-a17b", "tiny", "tiny-demo"):
        assert qwen35_thinking_by_default(qwen35_preset(name)), name


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    return Qwen35Tokenizer()


@pytest.mark.parametrize("system, images", [(None, 0), ("  Be brief. ", 2)])
@pytest.mark.parametrize("thinking", [[], ["--thinking"], ["--no-thinking"]])
@pytest.mark.parametrize("preset", ["tiny", "0.8b"])
def test_chat_prompt_is_the_released_templates_generation_prompt(preset, system, thinking, images, qwen_tokenizer):
    """What --chat gives the model (text and token ids) is what transformers renders with the released template of
    the checkpoint's size for [system turn,] user turn [with its images first] and the generation prompt:
    --system adds the system turn, --no-thinking the empty thinking block, --thinking an open one, and neither the
    revision's default (open for tiny, as 4B and larger; empty for 0.8B)."""
    tool = _tool()
    argv = ["--checkpoint", "unused", "--prompt", "What is 2+2?", "--chat"] + thinking
    argv += ["--image", "a.png"] * images + ([] if system is None else ["--system", system])
    text = tool["_model_text"](tool["_arguments"](argv), qwen35_preset(preset))
    text = text.replace("<image>", IMAGE_SLOT)  # the processor's placeholder, where the template's slot was
    user = [{"type": "image"}] * images + [{"type": "text", "text": "What is 2+2?"}]
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user",
                                                                                       "content": user}]
    kwargs = {} if not thinking else {"enable_thinking": thinking == ["--thinking"]}
    want = _released_template(messages, thinking_by_default=preset == "tiny", **kwargs)
    assert text == want
    assert qwen_tokenizer.encode(text) == qwen_tokenizer.encode(want)
    # what the template says, spelled out
    head = "" if system is None else "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert text.startswith(head + "<|im_start|>user\n" + IMAGE_SLOT * images + "What is 2+2?<|im_end|>\n")
    opened = thinking == ["--thinking"] or (not thinking and preset == "tiny")
    assert text.endswith("<|im_start|>assistant\n" + ("<think>\n" if opened else "<think>\n\n</think>\n\n"))


def _tokenizer_folder(path: Path, template: Path | None) -> Path:
    """A Hugging Face tokenizer folder (byte-level BPE trained on the spot, Qwen3.5's chat markers as special
    tokens), with `template` as its chat_template.jinja when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([RELEASED_TEMPLATES[True].read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>").save_pretrained(path)
    if template is not None:
        (path / "chat_template.jinja").write_text(template.read_text())
    return path


def test_a_tokenizer_folders_chat_template_renders_the_chat(tmp_path):
    """--tokenizer-dir with a chat template of its own renders the chat as that folder's `apply_chat_template` does
    (here the 0.8B revision for the tiny model, so the thinking block is empty where ours would open it); a folder
    without one renders with ours."""
    from transformers import AutoTokenizer

    tool = _tool()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    argv = ["--checkpoint", "unused", "--prompt", "Hi", "--system", "Be brief.", "--chat", "--tokenizer-dir"]
    folder = _tokenizer_folder(tmp_path / "with", RELEASED_TEMPLATES[False])
    text = tool["_model_text"](tool["_arguments"](argv + [str(folder)]), qwen35_preset("tiny"))
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    assert text == want and text.endswith("<think>\n\n</think>\n\n")
    folder = _tokenizer_folder(tmp_path / "without", None)
    text = tool["_model_text"](tool["_arguments"](argv + [str(folder)]), qwen35_preset("tiny"))
    assert text == _released_template(messages) and text.endswith("assistant\n<think>\n")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, megatron_single_process):
    """(transformers' tiny-demo model, its converted checkpoint, the chat's prompt ids, the reply it generates): the
    real vocabulary, and <|im_end|>'s output row swapped with that of the 4th token the model first answered, so the
    greedy reply is three tokens and the end of the turn."""
    from megatron_qwen35.checkpoint import save_checkpoint
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    cfg = qwen35_preset("tiny-demo")
    hf = reference_model(cfg.replace(mtp_num_layers=0), seed=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    ids = torch.tensor([Qwen35Tokenizer().encode(_released_template(messages))])
    with torch.no_grad():
        first = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=ENDOFTEXT)[0, ids.shape[1]:]
        fourth = int(first[3])
        assert fourth not in first[:3].tolist() + CHAT_END_IDS
        rows = hf.lm_head.weight  # untied in tiny-demo: the swap changes what comes out, not what goes in
        rows[[fourth, IM_END]] = rows[[IM_END, fourth]].clone()
    gpt = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
    load_hf_state_dict(gpt, cfg, hf.state_dict(), include_mtp=False)
    path = tmp_path_factory.mktemp("tiny-demo") / "checkpoint"
    save_checkpoint(gpt, cfg, path)
    return hf, path, ids, first[:3].tolist()


def test_chat_reply_equals_transformers_generate_on_the_templated_prompt(chat_checkpoint, qwen_tokenizer, capsys):
    """`--chat --system S --prompt P` on a converted tiny-demo checkpoint prints exactly the reply transformers'
    greedy `generate` gives for the prompt its `apply_chat_template` renders with the released template (thinking
    on, as the revision of 4B and larger), stopping at <|im_end|>: its tokens without the end, and nothing else."""
    hf, path, ids, reply = chat_checkpoint
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=CHAT_END_IDS,
                           pad_token_id=ENDOFTEXT)[0, ids.shape[1]:].tolist()
    assert want == reply + [IM_END]  # transformers stops at the end of the turn too
    assert _tool()["main"](["--checkpoint", str(path), "--chat", "--system", "Be brief.", "--prompt", "What is 2+2?",
                            "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == qwen_tokenizer.decode(reply) + "\n"


HISTORY = {  # a conversation's earlier turns, as a row of tools/data/preprocess_sft.py's input
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "What is 2+2?"},
                 {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
                 {"role": "user", "content": "And times 3?"},
                 {"role": "assistant", "content": "",
                  "tool_calls": [{"function": {"name": "calc", "arguments": {"expr": "4*3"}}}]},
                 {"role": "tool", "content": "12"}],
    "tools": [{"type": "function", "function": {"name": "calc", "description": "Evaluate.",
                                                "parameters": {"type": "object",
                                                               "properties": {"expr": {"type": "string"}}}}}],
}


@pytest.mark.parametrize("thinking", [[], ["--no-thinking"]])
@pytest.mark.parametrize("preset", ["tiny", "0.8b"])
def test_a_conversations_earlier_turns_render_as_the_released_template_does(preset, thinking, tmp_path):
    """--history (the earlier turns: a system prompt, reasoning, which the template drops from turns before the
    last user query, a tool call and its result, the tools' schemas) then --prompt: transformers' rendering of the
    whole conversation with the released template of the checkpoint's size."""
    tool = _tool()
    (tmp_path / "turns.json").write_text(json.dumps(HISTORY))
    argv = ["--checkpoint", "unused", "--prompt", "Thanks!", "--chat", "--history", str(tmp_path / "turns.json")]
    text = tool["_model_text"](tool["_arguments"](argv + thinking), qwen35_preset(preset))
    kwargs = {} if not thinking else {"enable_thinking": False}
    want = _released_template(HISTORY["messages"] + [{"role": "user", "content": "Thanks!"}], tools=HISTORY["tools"],
                              thinking_by_default=preset == "tiny", **kwargs)
    assert text == want and "<tool_call>" in text and "# Tools" in text and "Two and two." not in text
    (tmp_path / "list.json").write_text(json.dumps(HISTORY["messages"][1:]))  # a plain list of messages
    argv[-1] = str(tmp_path / "list.json")
    assert tool["_model_text"](tool["_arguments"](argv + ["--system", "Be brief."]), qwen35_preset(preset)) == \
        _released_template(HISTORY["messages"] + [{"role": "user", "content": "Thanks!"}],
                           thinking_by_default=preset == "tiny")


@pytest.mark.parametrize("history, says", [
    ("{not json", "is not valid JSON"),
    ({"turns": []}, "expected a list of messages"),
    ([{"role": "user", "content": [{"type": "image", "image": "a.png"}]}, {"role": "assistant", "content": "A."}],
     "turn 0 holds an image or video"),
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A."}],
      "images": ["a.png"]}, "gives images or videos"),
    ([{"role": "system", "content": "Other."}], "begins with a system turn of its own, and a system turn was given"),
    ([{"role": "wizard", "content": "x"}], "messages[0] has the role 'wizard'; Qwen3.5's template knows"),
])
def test_a_history_the_chat_cannot_render_is_one_error_line(history, says, tmp_path, capsys, chat_checkpoint):
    _, path, _, _ = chat_checkpoint
    (tmp_path / "turns.json").write_text(history if isinstance(history, str) else json.dumps(history))
    assert _tool()["main"](["--checkpoint", str(path), "--chat", "--system", "Hi.", "--prompt", "Go on.",
                            "--history", str(tmp_path / "turns.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and says in err, err


def test_a_chat_with_earlier_turns_answers_as_transformers_generate(chat_checkpoint, qwen_tokenizer, tmp_path, capsys):
    """The conversation's turns before the new one, through --history: the reply transformers' greedy `generate`
    gives for the whole conversation rendered with the released template, token for token."""
    hf, path, _, _ = chat_checkpoint
    ids = torch.tensor([qwen_tokenizer.encode(_released_template(
        HISTORY["messages"] + [{"role": "user", "content": "Thanks!"}], tools=HISTORY["tools"]))])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=CHAT_END_IDS,
                           pad_token_id=ENDOFTEXT)[0, ids.shape[1]:].tolist()
    (tmp_path / "turns.json").write_text(json.dumps(HISTORY))
    assert _tool()["main"](["--checkpoint", str(path), "--chat", "--history", str(tmp_path / "turns.json"),
                            "--prompt", "Thanks!", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == qwen_tokenizer.decode([t for t in want if t not in CHAT_END_IDS]) + "\n"


def test_a_chat_fine_tune_answers_as_transformers_on_its_export(tmp_path, qwen_tokenizer, capsys,
                                                               megatron_single_process):
    """The flow users run: a converted tiny-demo checkpoint (the real vocabulary) fine-tuned on chats through the
    recipe, then `tools/generate.py --chat` on the run's checkpoint prints the reply transformers' greedy `generate`
    gives on the exported checkpoint for the prompt the released template renders, token for token."""
    from transformers import AutoModelForCausalLM

    from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
    from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
    from megatron_qwen35.data.preprocess_sft import qwen35_preprocess_sft
    from megatron_qwen35.hf_reference import modeling
    from tests.pretrain_runs import recipe
    from tests.test_convert import make_hf_checkpoint

    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(8)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qwen35_preprocess_sft([tmp_path / "chats.jsonl"], tmp_path / "sft", qwen35_preset("tiny-demo"))
    hf = make_hf_checkpoint(tmp_path / "hf", "tiny-demo", how="packed", mtp_layout="per_expert", seed=2)
    converted = qwen35_hf_to_megatron(hf, tmp_path / "converted", progress=False)
    recipe(tmp_path, LOAD=str(converted), SFT_DATA_PATH=str(tmp_path / "sft"), PRESET="tiny-demo", MOCK_DATA="0",
           SEQ_LEN="128", GLOBAL_BATCH="2", TRAIN_ITERS="2", WARMUP="0", LR="1e-2", MIN_LR="1e-2")
    tuned = tmp_path / "ckpt-run"
    exported = qwen35_megatron_to_hf(tuned, tmp_path / "exported", progress=False)
    modeling(is_moe=True)  # transformers' torch kernels on CPU
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is 3 plus 3?"}]
    ids = torch.tensor([qwen_tokenizer.encode(_released_template(messages))])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=CHAT_END_IDS,
                              pad_token_id=ENDOFTEXT)[0, ids.shape[1]:].tolist()
        before = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval().generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=CHAT_END_IDS, pad_token_id=ENDOFTEXT)
    capsys.readouterr()
    assert _tool()["main"](["--checkpoint", str(tuned), "--chat", "--prompt", "What is 3 plus 3?",
                            "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == qwen_tokenizer.decode([t for t in want if t not in CHAT_END_IDS]) + "\n"
    assert before[0, ids.shape[1]:].tolist() != want  # the fine-tune changed the reply
