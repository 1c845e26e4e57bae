"""What the VL model's MTP layer reads at image and video positions: the placed vision features, as the main model's
decoder input has them (and as serving engines feed their MTP draft), not the pad token's embedding.

megatron's MTP layer rolls the token ids one step left (within each packed document, across CP ranks) and embeds
them with the embedding GPTModel hands it (`embedding=` of MultiTokenPredictionBlock.forward). The VL model swaps
that callable for `vision_aware_embedding`: a slot tensor, [b, s] like the ids, holds 1 + the row of the vision
feature at each vision position (0 at text), is rolled by megatron's own `roll_tensor` exactly as the ids are, and
the rolled vision positions take their feature rows in place of the token embedding.

The features exist where the tower runs, on the first pipeline stage; the MTP layer sits on the last. Under pipeline
parallelism `VisionRowsChannel` sends them over the first and last stages' embedding group (not the pipeline group,
whose point-to-point order megatron's schedules own) once per micro-batch, in the order both stages run micro-batches,
and sends their gradient back: the tower then learns from the MTP loss at every layout as it does on one stage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel


@dataclass
class VisionRows:
    """A micro-batch's placed vision features: `rows` [n, h] in (batch, sequence) order of the vision positions;
    `slot` [b, s (/ cp)] int64, 1 + the row at each vision position of this rank's tokens, 0 at text."""

    rows: torch.Tensor
    slot: torch.Tensor


def vision_slots(is_vision: torch.Tensor) -> torch.Tensor:
    """[b, s] bool -> [b, s] int64: 1 + the index of each vision position in (batch, sequence) order, 0 at text."""
    flat = is_vision.reshape(-1)
    return torch.where(flat, flat.long().cumsum(0), 0).view_as(is_vision)


def vision_aware_embedding(embedding, vision: VisionRows, *, cp_group, packed_seq_params, sequence_parallel: bool,
                           tp_group):
    """The callable megatron's MTP layers embed their rolled ids with: each call (one per MTP layer, after it rolled
    the ids once more) rolls the slots as the ids were rolled and puts the feature rows at the vision positions."""
    from megatron.core.transformer import multi_token_prediction

    roll = inspect.unwrap(multi_token_prediction.roll_tensor)  # the roll alone (upstream_fixes wraps its count)
    slot = vision.slot

    def embed(input_ids, position_ids):
        nonlocal slot
        slot, _ = roll(slot, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
        tokens = embedding(input_ids=input_ids, position_ids=position_ids)  # [s (/ tp), b, h]
        where = slot.t() > 0  # [s, b]
        rows = vision.rows.to(tokens.dtype)[(slot.t() - 1).clamp(min=0)]  # [s, b, h]
        if sequence_parallel:  # scattered like the embeddings; its backward gathers every row's gradient
            rows = tensor_parallel.scatter_to_sequence_parallel_region(rows, group=tp_group)
            where = where.chunk(tp_group.size(), dim=0)[tp_group.rank()]
        return torch.where(where.unsqueeze(-1), rows, tokens)

    return embed


class _RowsGradientFromMTPStage(torch.autograd.Function):
    """Identity on the first stage's decoder input; its backward adds the gradient the MTP stage sends back for the
    feature rows (megatron back-propagates the decoder input's gradient through the first stage, which reaches the
    tower through this node)."""

    @staticmethod
    def forward(ctx, decoder_input, rows, channel):
        ctx.channel, ctx.shape, ctx.dtype = channel, rows.shape, rows.dtype
        return decoder_input.view_as(decoder_input)

    @staticmethod
    def backward(ctx, grad):
        rows_grad = ctx.channel.receive(torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device))
        return grad, rows_grad, None


class VisionRowsChannel:
    """The first pipeline stage's vision rows to the MTP stage (the last), and their gradient back, over `group` (the
    two stages' embedding group). Per micro-batch the first stage sends a header (rows, whether a gradient comes
    back), the slots and the rows; the MTP stage receives them in the same order. Sends are asynchronous and kept
    until done: the first stage runs ahead of the last by up to the pipeline's depth of micro-batches."""

    def __init__(self, group, *, first_stage: bool, detached_heads: bool):
        ranks = torch.distributed.get_process_group_ranks(group)
        self.group, self.peer = group, ranks[-1] if first_stage else ranks[0]
        self.detached_heads = detached_heads  # --mtp-detach-heads: the MTP loss trains no earlier module
        self._in_flight: list[tuple[torch.distributed.Work, torch.Tensor]] = []

    def _send(self, tensor: torch.Tensor) -> None:
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]
        tensor = tensor.contiguous()
        self._in_flight.append((torch.distributed.isend(tensor, self.peer, group=self.group), tensor))

    def receive(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.recv(tensor, self.peer, group=self.group)
        return tensor

    def send(self, decoder_input: torch.Tensor | None, vision: VisionRows | None, *,
             device: torch.device) -> torch.Tensor | None:
        """First stage: send this micro-batch's rows and whole-sequence slots (None: no vision input); returns the
        decoder input, through which the rows' gradient from the MTP stage flows back when one is due."""
        count = 0 if vision is None else vision.rows.shape[0]
        gradient_due = (count > 0 and torch.is_grad_enabled() and vision.rows.requires_grad
                        and not self.detached_heads)
        self._send(torch.tensor([count, int(gradient_due)], device=device))
        if count:
            self._send(vision.slot)
            self._send(vision.rows.detach())
        if gradient_due:
            return _RowsGradientFromMTPStage.apply(decoder_input, vision.rows, self)
        return decoder_input

    def receive_rows(self, batch: int, seq: int, hidden: int, *, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """MTP stage: (rows [n, h], slots [b, s]) of this micro-batch, or None without vision input; when the first
        stage wants it, the rows' gradient goes back once the backward has computed it."""
        count, gradient_due = self.receive(torch.zeros(2, dtype=torch.long, device=device)).tolist()
        if not count:
            return None
        slot = self.receive(torch.zeros(batch, seq, dtype=torch.long, device=device))
        rows = self.receive(torch.empty(count, hidden, dtype=dtype, device=device))
        if gradient_due:
            rows.requires_grad_(True)
            rows.register_hook(lambda grad: self._send(grad))
        return rows, slot


__all__ = ["VisionRows", "VisionRowsChannel", "vision_aware_embedding", "vision_slots"]
