"""Evaluation and generation: `load_model(checkpoint_dir)` -> `Qwen35CausalLM`; `generate(model, input_ids, ...)`.

The checkpoint directory (written by this project's training or converters) carries the model config, so nothing
else is needed. A one-process gloo group is set up when none exists; in an already initialised multi-rank job
(TP/EP), the model is built for the current layout and the logits are gathered over tensor parallelism.

The model runs GPTModel's own pieces -- embedding, decoder, output layer -- with the rope of each row's own positions
(what GPTModel.forward cannot take); its MTP head, a training-time loss, never runs.

Generation is a static batch with left padding (`layers/inference_context.py` says why nothing depends on the pads):
the prompts go through the model once (Gated DeltaNet's chunked kernel; attention writing megatron's KV cache), then
every row gets one token per step (the recurrent kernel; attention reading the cache). The same rules as
transformers' `generate` on a left-padded batch with its attention mask: positions count real tokens, pads are
masked in attention and zeroed at Gated DeltaNet's input; greedy output equals it token for token (tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from megatron.core import parallel_state

from megatron_qwen35.checkpoint import load_checkpoint, read_config
from megatron_qwen35.config import Qwen35Config, qwen35_transformer_config
from megatron_qwen35.layers.core_attention import Qwen35CoreAttention
from megatron_qwen35.layers.inference_context import Qwen35InferenceContext
from megatron_qwen35.layers.rotary import mrope_position_ids
from megatron_qwen35.parallel_layout import check_parallel_layout
from megatron_qwen35.provider import qwen35_gpt_model
from megatron_qwen35.runtime import apply_runtime_patches, initialize_parallel


class Qwen35CausalLM(torch.nn.Module):
    """`model(input_ids [b, s], pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
    video_grid_thw=None)` -> float logits [b, s, vocab], transformers' inputs (no padding, no packing): text
    positions 0..s-1, or transformers' rope index where images / videos are given; `generate` drives
    `prefill_or_decode` with an inference context."""

    def __init__(self, gpt_model: torch.nn.Module, cfg: Qwen35Config):
        super().__init__()
        self.model = gpt_model
        self.config = cfg

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        vision = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        if all(v is None for v in vision.values()):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            return self._logits(input_ids, self.rotary_pos_emb(positions))
        if self.config.vision is None:
            raise ValueError(f"model '{self.config.name}' has no vision tower: it takes no pixel values")
        positions = mrope_position_ids(input_ids, self.config.vision, image_grid_thw, video_grid_thw)
        hidden = self.model.embed(input_ids, **vision)
        return self._logits(input_ids, self.rotary_pos_emb(positions), hidden=hidden)

    def slot_rotary_pos_emb(self, context: Qwen35InferenceContext, input_ids: torch.Tensor, vision: dict,
                            attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The rope of every slot of a generation [slots, b, 1, d]. Text: each row's real tokens count from 0. With
        images or videos, the prompt takes transformers' rope index and every new token the row's largest prompt
        position + 1, + 1 per step on all three streams (transformers' rope deltas)."""
        if not vision:
            return self.rotary_pos_emb(context.positions())
        prompt = mrope_position_ids(input_ids, self.config.vision, vision.get("image_grid_thw"),
                                    vision.get("video_grid_thw"), attention_mask)  # [3, b, s]
        steps = torch.arange(context.max_sequence_length - input_ids.shape[1], device=prompt.device)
        after = prompt.amax(dim=(0, 2)).unsqueeze(1) + 1 + steps  # [b, new slots]
        return self.rotary_pos_emb(torch.cat([prompt, after.expand(3, -1, -1)], dim=2))

    @torch.no_grad()
    def prefill_or_decode(self, input_ids: torch.Tensor, context: Qwen35InferenceContext,
                          rotary_pos_emb: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits [b, vocab] (fp32) after `input_ids` [b, s]: the prompts (the context's
        `sequence_len_offset` is 0) or the newest token of each row; advances the context past them.
        rotary_pos_emb: the rope of every slot (`slot_rotary_pos_emb`); hidden: the prompts' decoder input when
        they hold images (`Qwen35VLModel.embed`)."""
        num_tokens = input_ids.shape[1]
        logits = self._logits(input_ids, rotary_pos_emb, attention_mask=context.attention_mask(num_tokens),
                              inference_context=context, last_token_only=True, hidden=hidden)
        context.increment_sequence_len_offset(num_tokens)
        context.enable_decode_mode()  # every row's prompt is in the caches now
        return logits[:, -1]

    def rotary_pos_emb(self, positions: torch.Tensor) -> torch.Tensor:
        """megatron's rope of `positions` [b, s] (or mRoPE's [3, b, s]) as [s, b, 1, rotary dim]: rows of the table
        GPTModel builds for positions 0..n-1 (the values training uses), one row per token, so each batch row has
        its own positions; a vision-language model's mRoPE module computes them from the positions directly."""
        if self.config.vision is not None:
            return self.model.rotary_pos_emb(positions)
        table = self.model.rotary_pos_emb.get_emb(int(positions.max()) + 1)  # [n, 1, 1, d]
        return table[:, 0, 0][positions.t()].unsqueeze(2)

    def _logits(self, input_ids, rotary_pos_emb, *, attention_mask=None, inference_context=None,
                last_token_only=False, hidden=None) -> torch.Tensor:
        """GPTModel.forward without its MTP head and loss: embedding (unless `hidden`, the decoder input, is given),
        decoder, output layer gathered over TP."""
        gpt = self.model
        if hidden is None:
            hidden = gpt.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]; rope carries the positions
        with _unfused_rope(gpt.config):
            hidden = gpt.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                 inference_context=inference_context)
        if last_token_only:
            hidden = hidden[-1:]
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(hidden, weight=weight, runtime_gather_output=True)  # [s, b, vocab]
        return logits.transpose(0, 1).float()


@contextlib.contextmanager
def _unfused_rope(config):
    """Transformer Engine's fused rope takes one row of positions for the whole batch (megatron's rope_utils warns
    so for mRoPE with batch > 1); rows with their own positions need megatron's unfused rope, same numbers."""
    fused = config.apply_rope_fusion
    config.apply_rope_fusion = False
    try:
        yield
    finally:
        config.apply_rope_fusion = fused


def load_model(checkpoint_dir: Path | str, *, backend: str | None = None, adapter: Path | str | None = None,
               base: Path | str | None = None, gdn_kernels: str = "fla", **config_overrides) -> Qwen35CausalLM:
    """The model saved in `checkpoint_dir`, in eval mode; `config_overrides` go to TransformerConfig.
    `gdn_kernels`: "fla" (FLA's kernels on CUDA, which must import) or "torch" (the PyTorch path, chosen explicitly).

    A LoRA checkpoint runs with its adapters: a LoRA run's holds the adapters alone, on the base it was trained on,
    named by `base` (checked against the fingerprint it records: lora/base.py); hf_to_megatron.py --adapter's holds
    both. `adapter` (a Hugging Face PEFT LoRA adapter directory of this base, as peft's save_pretrained or
    megatron_to_hf.py --adapter-only writes it) puts that adapter on a base checkpoint.

    An entry point: it applies the run-time patches (runtime/register.py) and, where no parallel state exists, sets
    up a one-process one. On a CUDA machine the model runs on Transformer Engine (`backend="te"`, which must import)
    unless `backend="local"` says otherwise; elsewhere on the local backend."""
    from megatron_qwen35.convert.record import ConversionRecord
    from megatron_qwen35.lora import LoRASettings, adapter_whole_shapes, apply_lora, from_peft, load_adapter_tensors
    from megatron_qwen35.lora.base import base_named_by_the_run, check_base, load_base, recorded_base
    from megatron_qwen35.lora.peft_format import read_peft_adapter

    apply_runtime_patches()
    cfg, metadata = read_config(checkpoint_dir)
    saved_lora = LoRASettings.from_record(metadata["lora"]) if metadata.get("lora") else None
    if adapter is not None and saved_lora is not None:
        raise ValueError(f"{checkpoint_dir} holds LoRA adapters already; give `adapter` with a base checkpoint")
    fingerprint = recorded_base(metadata) if saved_lora is not None else None
    if fingerprint is None and base is not None:
        raise ValueError(f"{checkpoint_dir} holds {'its base' if saved_lora else 'no LoRA adapters'}: `base` names "
                         "the base of a LoRA run's checkpoint, which holds the adapters alone")
    if fingerprint is not None:
        if base is None:
            raise ValueError(f"{checkpoint_dir} holds LoRA adapters without their frozen base: give `base`, the "
                             f"checkpoint they were trained on{base_named_by_the_run(metadata)}")
        check_base(base, fingerprint, checkpoint_dir)
    peft_lora, peft_tensors = read_peft_adapter(adapter) if adapter is not None else (None, None)
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = backend or ("te" if device == "cuda" else "local")
    # No random initialisation: the strict load below overwrites every weight, and on CPU the initialisation's
    # temporaries fragment the heap (a 35b-a3b slice held 22.4 GiB for 13.2 GiB of fp32 parameters).
    overrides = dict(params_dtype=torch.float32, perform_initialization=False,
                     tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                     expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                     sequence_parallel=False)
    overrides.update(config_overrides)
    check_parallel_layout(cfg, tensor_parallel=overrides["tensor_model_parallel_size"],
                        expert_parallel=overrides["expert_model_parallel_size"])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("load_model runs the whole model on each rank; use pipeline_parallel=1")
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, backend=backend, device=device, **overrides),
                             backend=backend, gdn_kernels=gdn_kernels)
    if saved_lora is not None:
        apply_lora(model, cfg, saved_lora)
    if fingerprint is not None:  # the base from its own checkpoint, the adapters from the LoRA run's
        load_base(model, base)
        model.checkpoint_adapters_only = True
        load_checkpoint(model, checkpoint_dir)
        model.checkpoint_adapters_only = False
    else:
        load_checkpoint(model, checkpoint_dir)
    if peft_lora is not None:
        apply_lora(model, cfg, peft_lora)
        prefix = ConversionRecord.from_metadata(metadata).export_layout(cfg).prefix
        try:
            load_adapter_tensors(model, from_peft(peft_tensors, cfg, adapter_whole_shapes(model), hf_prefix=prefix))
        except ValueError as e:
            raise ValueError(f"{adapter}: {e}") from None
    return Qwen35CausalLM(model, cfg).eval()


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

class GenerationStep(NamedTuple):
    """One step of every row: the new token [b], its log-probability [b] under the model (temperature 1, no top-p:
    what a trainer's forward computes) and the logits it came from [b, vocab] (fp32); a row that has ended repeats
    its end token with log-probability 0."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    logits: torch.Tensor


def generate(model: Qwen35CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, *, min_new_tokens: int = 0,
             attention_mask: torch.Tensor | None = None, return_logprobs: bool = False,
             generator: torch.Generator | None = None, **vision):
    """The prompts `input_ids` [b, s] and their continuations: [b, s + n], n <= max_new_tokens (fewer when every row
    has ended); with return_logprobs, also each new token's log-probability [b, n] (see `GenerationStep`).

    attention_mask [b, s] (1 real token, 0 pad) marks left padding, as for transformers' `generate`; without it every
    token is real. temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) cut to the
    smallest set of probability >= top_p, with `generator` (the same on every tensor-parallel rank: rank 0's draw is
    used). A row ends at any of eos_token_id, not before min_new_tokens (transformers' rule: the end tokens are
    not drawn until then), and is then filled with the first of them.

    `vision`: transformers' image / video inputs of the prompts (pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw; a vision-language model's), every image of the batch in order.
    """
    new_tokens, logprobs = [], []
    for step in stream_generate(model, input_ids, max_new_tokens, temperature, top_p, eos_token_id,
                                min_new_tokens=min_new_tokens, attention_mask=attention_mask, generator=generator,
                                **vision):
        new_tokens.append(step.tokens)
        logprobs.append(step.logprobs)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    return (sequences, torch.stack(logprobs, dim=1)) if return_logprobs else sequences


def stream_generate(model: Qwen35CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, *, min_new_tokens: int = 0,
                    attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, **vision) -> Iterator[GenerationStep]:
    """`generate`, one `GenerationStep` at a time as the tokens come (arguments as there); bad arguments raise here,
    before the first step is asked for."""
    padding = _check_generation_inputs(model, input_ids, max_new_tokens, temperature, top_p, attention_mask)
    vision = _check_vision_inputs(model, vision)
    if bool(padding.any()) and not _attention_masks_padding(model):
        raise ValueError("a left-padded batch needs the local backend's attention, which takes the padding mask "
                         "(Transformer Engine's causal attention ignores one): load_model(dir, backend='local'), or "
                         "prompts of one length")
    end_ids = _end_token_ids(eos_token_id, model.config.vocab_size, input_ids.device)
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    context = Qwen35InferenceContext(padding, max_sequence_length=input_ids.shape[1] + max_new_tokens)
    return _generation_steps(model, input_ids, context, max_new_tokens, temperature, top_p, end_ids, min_new_tokens,
                             generator, vision, attention_mask)


@torch.no_grad()
def _generation_steps(model, input_ids, context, max_new_tokens, temperature, top_p, end_ids, min_new_tokens,
                      generator, vision, attention_mask) -> Iterator[GenerationStep]:
    """The prompts once (with their images), then one token per row per step, until max_new_tokens or every row
    has ended."""
    rotary_pos_emb = model.slot_rotary_pos_emb(context, input_ids, vision, attention_mask)  # [slots, b, 1, d]
    hidden = model.model.embed(input_ids, **vision) if vision else None
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input = input_ids
    for step in range(max_new_tokens):
        logits = model.prefill_or_decode(step_input, context, rotary_pos_emb, hidden)  # [b, vocab] fp32
        hidden = None  # the images are in the caches now
        allowed = logits if end_ids is None or step >= min_new_tokens else logits.index_fill(-1, end_ids, -torch.inf)
        tokens = _same_on_every_tensor_parallel_rank(sample_next_tokens(allowed, temperature, top_p, generator))
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if end_ids is not None:
            tokens = tokens.masked_fill(ended, int(end_ids[0]))
            logprobs = logprobs.masked_fill(ended, 0.0)
            ended |= torch.isin(tokens, end_ids)
        yield GenerationStep(tokens, logprobs, logits)
        if bool(ended.all()):
            return
        step_input = tokens.unsqueeze(1)


def sample_next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """[b] token ids from logits [b, vocab]: argmax at temperature 0 (the first of equal maxima, as torch and
    transformers pick), else a draw from softmax(logits / temperature) restricted to the nucleus of mass top_p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [b, s], attention_mask [b, s]) of prompts of different lengths, each right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def _check_generation_inputs(model, input_ids, max_new_tokens, temperature, top_p, attention_mask) -> torch.Tensor:
    """Every argument that would fail deep inside the model, named; returns the padding [b, s] (True = pad)."""
    if not isinstance(model, Qwen35CausalLM):
        raise TypeError(f"generate takes the Qwen35CausalLM load_model returns, got {type(model).__name__}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("input_ids must be an integer tensor [batch, seq], got "
                         f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"input_ids must hold at least one prompt token, got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids hold ids outside the model's vocabulary [0, {vocab}): "
                         f"min {int(input_ids.min())}, max {int(input_ids.max())}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_len = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {max_len}")
    if not temperature >= 0.0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}")
    real = attention_mask.to(input_ids.device) != 0
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
    not_left_padded = (real[:, :-1] & ~real[:, 1:]).any(dim=1) | ~real[:, -1]
    if bool(not_left_padded.any()):
        rows = not_left_padded.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are not left-padded (zeros, then ones up to the last column); "
                         "generate pads on the left, as megatron_qwen35.inference.left_padded does")
    return ~real


def _check_vision_inputs(model: Qwen35CausalLM, vision: dict) -> dict:
    """The image / video keyword arguments that are given, named if unknown or if the model has no tower."""
    unknown = sorted(set(vision) - {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"})
    if unknown:
        raise TypeError(f"generate got unexpected keyword arguments {unknown}")
    vision = {k: v for k, v in vision.items() if v is not None}
    if vision and model.config.vision is None:
        raise ValueError(f"model '{model.config.name}' has no vision tower: it takes no pixel values")
    return vision


def _attention_masks_padding(model: Qwen35CausalLM) -> bool:
    """Whether every attention layer's core attention is ours, which masks pad keys by the mask it is given."""
    cores = [layer.self_attention.core_attention for layer in model.model.decoder.layers
             if hasattr(layer.self_attention, "core_attention")]
    return all(isinstance(core, Qwen35CoreAttention) for core in cores)


def _end_token_ids(eos_token_id, vocab_size: int, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id must be token ids in [0, {vocab_size}), got {eos_token_id!r}")
    return torch.tensor(ids, device=device)


def _same_on_every_tensor_parallel_rank(tokens: torch.Tensor) -> torch.Tensor:
    """Tensor-parallel ranks hold one model: a sampled token that differed between them would split their caches.
    Greedy tokens agree anyway (the logits are gathered); drawn ones are tensor-parallel rank 0's."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())
    return tokens
