"""Qwen3.5 vision-language: megatron-core's GPTModel with the vision tower on the first pipeline stage and
Qwen3.5's interleaved mRoPE (transformers' Qwen3_5(Moe)ForConditionalGeneration).

A subclass, not a wrapper: the text model keeps GPTModel's own names (`embedding.*`, `decoder.*`, `output_layer.*`,
`mtp.*`), so one conversion table and every text code path serve both; the tower adds `vision_model.*`.

- Positions: GPTModel's `mrope` slot holds `InterleavedMRoPE` (layers/rotary.py); `forward` takes position ids
  [3, b, s] (transformers' rope index, `mrope_position_ids`) or [b, s] for text, on every pipeline stage, since
  each stage applies rope.
- Vision features: the tower encodes images and videos separately (as transformers does) and its rows replace the
  embeddings of the image / video pad tokens in row-major (batch, sequence) order, transformers' `masked_scatter`.
  Under sequence parallelism the features are placed in a full-length tensor that is then scattered like the
  embeddings, so that its backward all-gathers the gradient: every tensor-parallel rank's tower replica then gets
  the gradient of every feature row, not only of the rows in its own sequence slice.
- Context parallelism: the pads are found in the micro-batch's tokens before the split (`full_input_ids`), the
  placed features are cut to this rank's tokens by the same load-balanced split as the batch (each packed document
  split on its own), and each rank's tower
  replica gets the gradient of its own rows; megatron's gradient reduction over data x context parallel ranks sums
  them, as it does for every other weight.
- A training micro-batch without images or videos still runs the tower, on one blank 2x2-merge patch group whose
  output enters the embeddings times 0: megatron's distributed data parallelism gathers parameters in forward
  pre-hooks (--overlap-param-gather) and reduces gradients when each bucket's parameters have reported on the last
  micro-batch (--overlap-grad-reduce), so a tower that sits out a step stalls its buckets (measured: the recipe's
  text-only step 3 on a VL model asserts in megatron's param gather once the tower has a bucket of its own, as a
  real-size ViT always has). The values are unchanged; the tower's gradient is zero on such micro-batches.
- MTP reads, at the vision positions of its shifted input, the placed features (the main model's decoder input
  there), not the pad token's embedding: on the tower's stage, or sent from it to the last stage under pipeline
  parallelism, with their gradient back (vl_mtp_inputs.py).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.layers.context_parallel import cp_rank_positions
from megatron_qwen35.layers.rotary import InterleavedMRoPE
from megatron_qwen35.layers.vision.model import Qwen35VisionModel
from megatron_qwen35.model import Qwen35GPTModel
from megatron_qwen35.vl_mtp_inputs import VisionRows, VisionRowsChannel, vision_aware_embedding, vision_slots


class Qwen35VLModel(Qwen35GPTModel):
    """Qwen35GPTModel + the vision tower (`vision_model`, first stage only) + interleaved mRoPE."""

    def __init__(self, cfg: Qwen35Config, config: TransformerConfig, *, backend: str, **gpt_kwargs):
        if cfg.vision is None:
            raise ValueError(f"model '{cfg.name}' has no vision config: build it with GPTModel")
        if config.apply_rope_fusion:
            raise ValueError("apply_rope_fusion is on, but a vision-language model's mRoPE positions differ per "
                             "sample and Transformer Engine's fused rope reads one position row: turn it off "
                             "(--no-rope-fusion)")
        gpt_kwargs.update(position_embedding_type="none")  # no rope table: the mrope slot is filled below
        super().__init__(config=config, **gpt_kwargs)
        self.position_embedding_type = "mrope"  # GPTModel's forward then calls rotary_pos_emb(position_ids, ...)
        self.rotary_pos_emb = InterleavedMRoPE(cfg)
        self.mrope_section = list(cfg.mrope_section)
        self.vision = cfg.vision
        self.vision_model = Qwen35VisionModel(cfg.vision, config, backend=backend) if self.pre_process else None
        self._mtp_vision: VisionRows | None = None  # this forward's rows for the MTP layer, on its stage
        self._mtp_channel = self._vision_rows_channel()
        if self.mtp_process:
            self.mtp.register_forward_pre_hook(self._mtp_reads_vision_rows, with_kwargs=True)

    def _vision_rows_channel(self) -> VisionRowsChannel | None:
        """Between the tower's stage and the MTP layer's, when they differ (pipeline parallelism): the first and last
        stages, which megatron's embedding group joins."""
        from megatron.core.transformer.multi_token_prediction import get_mtp_ranks

        if not self.config.mtp_num_layers or self.pp_group is None or self.pp_group.size() == 1:
            return None
        pp_ranks = torch.distributed.get_process_group_ranks(self.pp_group)
        if get_mtp_ranks(pp_ranks, self.config) != [pp_ranks[-1]]:
            raise ValueError("a vision-language model's MTP layer reads the vision features the first pipeline stage "
                             "places, which reach the last stage only: put the MTP layer on the last stage "
                             "(--pipeline-model-parallel-layout)")
        if self.pre_process == self.mtp_process:  # a middle stage (or both roles, with a custom layout)
            return None
        return VisionRowsChannel(self.embd_group, first_stage=self.pre_process,
                                 detached_heads=self.config.mtp_detach_heads)

    def _mtp_reads_vision_rows(self, module, args, kwargs):
        """Forward pre-hook of the MTP block: its embedding puts this micro-batch's features at vision positions."""
        if self._mtp_vision is None:
            return None
        kwargs["embedding"] = vision_aware_embedding(
            kwargs["embedding"], self._mtp_vision, cp_group=self.pg_collection.cp,
            packed_seq_params=kwargs.get("packed_seq_params"), sequence_parallel=self.config.sequence_parallel,
            tp_group=self.pg_collection.tp)
        return args, kwargs

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *,
                pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                full_input_ids=None, **kwargs):
        """GPTModel.forward with transformers' vision inputs: pixel_values [patches, patch_dim] and
        image_grid_thw [images, 3] (likewise for videos) for every image of the micro-batch, in order; under
        context parallelism `full_input_ids` are the micro-batch's tokens before the split."""
        if position_ids is not None and position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        packed, cp = kwargs.get("packed_seq_params"), self.pg_collection.cp
        cu_seqlens = packed.cu_seqlens_q_padded if packed is not None else None
        vision = None  # the rows and whole-sequence slots the MTP layer reads
        if decoder_input is None and self.pre_process:
            decoder_input, vision = self._embed(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                                pixel_values_videos=pixel_values_videos,
                                                video_grid_thw=video_grid_thw, full_input_ids=full_input_ids,
                                                cu_seqlens=cu_seqlens,
                                                for_mtp=self.mtp_process or self._mtp_channel is not None)
            if self._mtp_channel is not None:
                decoder_input = self._mtp_channel.send(decoder_input, vision, device=input_ids.device)
        elif self._mtp_channel is not None:  # the MTP stage
            weight = self.embedding.word_embeddings.weight
            received = self._mtp_channel.receive_rows(input_ids.shape[0], input_ids.shape[1] * cp.size(),
                                                      self.config.hidden_size, dtype=weight.dtype,
                                                      device=input_ids.device)
            vision = VisionRows(*received) if received is not None else None
        if vision is not None and self.mtp_process:
            slot = vision.slot
            if cp.size() > 1:  # this rank's tokens, as the batch was split
                slot = slot.index_select(1, cp_rank_positions(slot.shape[1], cp, cu_seqlens, device=slot.device))
            self._mtp_vision = VisionRows(vision.rows, slot)
        if packed is not None and cp.size() > 1:  # rope angles of the whole packed sequence (layers/rotary.py)
            self.rotary_pos_emb.packed_context_parallel = (cu_seqlens, cp)
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)
        finally:
            self.rotary_pos_emb.packed_context_parallel = None
            self._mtp_vision = None

    def embed(self, input_ids: torch.Tensor, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, full_input_ids: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | None:
        """The decoder input [s (/ cp / tp under CP and SP), b, h]: token embeddings with the vision features at
        the pad tokens; None when there is no vision input (GPTModel then embeds the tokens itself). `cu_seqlens`:
        a packed sequence's (padded) document boundaries, each document split over CP ranks on its own."""
        return self._embed(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                           full_input_ids=full_input_ids, cu_seqlens=cu_seqlens, for_mtp=False)[0]

    def _embed(self, input_ids, *, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, full_input_ids,
               cu_seqlens, for_mtp: bool) -> tuple[torch.Tensor | None, VisionRows | None]:
        """`embed`, and, `for_mtp`, the placed features as the MTP layer reads them (whole-sequence slots) where there
        are any (generation and models without MTP skip their copy)."""
        inputs = [(self.vision.image_token_id, "image", pixel_values, image_grid_thw),
                  (self.vision.video_token_id, "video", pixel_values_videos, video_grid_thw)]
        inputs = [i for i in inputs if i[2] is not None]
        if not inputs and not (self.training and torch.is_grad_enabled()):
            return None, None
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)
        if not inputs:
            return embeddings + self._tower_taking_part(embeddings), None
        cp = self.pg_collection.cp
        if cp.size() > 1 and full_input_ids is None:
            raise ValueError("under context parallelism the vision pads are found in the tokens before the split: "
                             "pass full_input_ids")
        ids = input_ids if cp.size() == 1 else full_input_ids
        batch, seq = ids.shape
        placed = embeddings.new_zeros(batch, seq, embeddings.shape[-1])
        is_vision = torch.zeros_like(ids, dtype=torch.bool)
        rows = 0
        for token_id, kind, pixels, grid in inputs:
            if grid is None:
                raise ValueError(f"{kind} pixel values were given without their {kind}_grid_thw")
            features = self.vision_model(pixels, grid)
            where = ids == token_id
            count = int(where.sum())
            if count != features.shape[0]:
                raise ValueError(f"the input has {count} {kind} pad tokens (id {token_id}) but its {kind}s give "
                                 f"{features.shape[0]} feature rows (grids {grid.tolist()})")
            placed = placed.masked_scatter(where.unsqueeze(-1), features.to(placed.dtype))
            is_vision |= where
            rows += count
        vision = VisionRows(placed[is_vision], vision_slots(is_vision)) if for_mtp and rows else None
        # [s, b, ...] like the embeddings, and contiguous: torch.where lays its output out like its inputs, and
        # megatron's MoE router views its input
        placed, is_vision = placed.transpose(0, 1).contiguous(), is_vision.t().contiguous()
        if cp.size() > 1:  # this rank's tokens, as the batch was split
            mine = cp_rank_positions(seq, cp, cu_seqlens, device=placed.device)
            placed, is_vision = placed.index_select(0, mine), is_vision.index_select(0, mine)
        if self.config.sequence_parallel:
            tp = self.pg_collection.tp
            placed = tensor_parallel.scatter_to_sequence_parallel_region(placed, group=tp)
            is_vision = is_vision.chunk(tp.size(), dim=0)[tp.rank()]
        return torch.where(is_vision.unsqueeze(-1), placed, embeddings), vision

    def _tower_taking_part(self, like: torch.Tensor) -> torch.Tensor:
        """0, computed through every module of the tower from one blank group of merge x merge patches (see the
        module's docstring: megatron's overlapped parameter gather and gradient reduce need every module each step)."""
        merge = self.vision.spatial_merge_size
        blank = torch.zeros(merge * merge, self.vision.patch_dim, device=like.device, dtype=like.dtype)
        return 0.0 * self.vision_model(blank, torch.tensor([[1, merge, merge]])).sum()
