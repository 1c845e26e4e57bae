"""Defects of megatron-core / megatron.training 0.19.2 that stop or skew a Qwen3.5 run on GPUs as much as on CPUs.

Applied on every machine (register.py's UPSTREAM_BUG rows), each the smallest change that makes the upstream function
do what it documents. Each goes when the pinned release fixes it; the register's fingerprint test names it then.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from megatron_qwen35.runtime.patching import replace


def _compile_helpers_unless_prebuilt(compile_helpers):
    @functools.wraps(compile_helpers)
    def compile_helpers_unless_prebuilt():
        """megatron's dataset index helpers: use the compiled module the wheel ships; build only when it is absent."""
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()

    return compile_helpers_unless_prebuilt


def fix_compile_helpers_in_wheel() -> None:
    # initialize_megatron runs `make -C megatron/core/datasets` on rank 0; the pip wheel ships helpers_cpp compiled but
    # no Makefile, so make fails and megatron calls sys.exit(1): every pip-installed run ends before step 1.
    from megatron.core.datasets import utils

    if not hasattr(utils.compile_helpers, "__wrapped__"):
        replace(utils, "compile_helpers", _compile_helpers_unless_prebuilt(utils.compile_helpers))


def _flops_with_mtp_layer_pattern(num_floating_point_operations):
    @functools.wraps(num_floating_point_operations)
    def num_floating_point_operations_with_mtp(args, *rest, **kwargs):
        """megatron's FLOPs count, with the linear-attention pattern extended over the MTP layers (full attention)."""
        pattern, mtp = args.linear_attention_freq, args.mtp_num_layers or 0
        if not (isinstance(pattern, list) and mtp and len(pattern) == args.num_layers):
            return num_floating_point_operations(args, *rest, **kwargs)
        args.linear_attention_freq = pattern + [0] * mtp  # Qwen3.5's MTP layer is a full-attention layer
        try:
            return num_floating_point_operations(args, *rest, **kwargs)
        finally:
            args.linear_attention_freq = pattern

    return num_floating_point_operations_with_mtp


def fix_flops_count_with_mtp() -> None:
    # transformer_flops counts num_layers + mtp_num_layers layers and asserts that a list --linear-attention-freq has
    # that many entries, while argument validation and the model require num_layers entries: with MTP (every Qwen3.5
    # preset) every run raises AssertionError when it first logs throughput.
    from megatron.training import training

    flops = training.num_floating_point_operations
    if not hasattr(flops, "__wrapped__"):
        replace(training, "num_floating_point_operations", _flops_with_mtp_layer_pattern(flops))


# Whether the MTP loss being computed is normalised per token (config.calculate_per_token_loss): set around each call
# of process_mtp_loss, read by the roll below (megatron's roll_tensor has no config).
_PER_TOKEN_MTP_LOSS: contextvars.ContextVar[bool] = contextvars.ContextVar("qwen35_per_token_mtp_loss", default=False)


def _roll_with_sequence_count(roll_tensor):
    @functools.wraps(roll_tensor)
    def roll_tensor_sequence_count(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        """megatron's MTP roll, with the count megatron divides the MTP loss by made independent of how tokens are
        grouped. Normalised per token: this rank's tokens before the roll, so megatron's scale (before / count) is
        1 and the MTP loss sums over tokens as the LM loss does (both divided by the global batch's LM token count),
        however documents are packed into micro-batches or split over CP ranks. Per micro-batch: n_rolled / cp over
        the CP group (megatron divides each rank's sum by it, then averages the ranks)."""
        rolled, count = roll_tensor(tensor, shifts=shifts, dims=dims, cp_group=cp_group,
                                    packed_seq_params=packed_seq_params)
        dtype = rolled.dtype if rolled.is_floating_point() else torch.float32
        if _PER_TOKEN_MTP_LOSS.get():
            return rolled, tensor.detach().sum().to(dtype)
        if cp_group is None or cp_group.size() == 1:
            return rolled, count
        count = count.detach().to(torch.float64).clone()
        torch.distributed.all_reduce(count, group=cp_group)
        return rolled, (count / cp_group.size()).to(dtype)

    return roll_tensor_sequence_count


def _with_normalisation_known(process_mtp_loss):
    @functools.wraps(process_mtp_loss)
    def process_mtp_loss_normalisation_known(*args, **kwargs):
        """megatron's MTP loss, with its config's normalisation visible to the roll above."""
        config = kwargs.get("config", args[8] if len(args) > 8 else None)
        token = _PER_TOKEN_MTP_LOSS.set(bool(config.calculate_per_token_loss))
        try:
            return process_mtp_loss(*args, **kwargs)
        finally:
            _PER_TOKEN_MTP_LOSS.reset(token)

    return process_mtp_loss_normalisation_known


def fix_mtp_loss_under_context_parallelism() -> None:
    # megatron weighs each micro-batch's (and CP rank's) MTP loss by its own count of rolled target tokens. Per
    # micro-batch: the counts differ across CP ranks by construction (the sequence's last position, which has no next
    # token, sits on CP rank 0), so each token weighs 1/(cp x n_rank) instead of 1/n (7% off at 16 tokens and CP 2,
    # 0.05% at 4096; NVIDIA/Megatron-LM#7498). Per token: each micro-batch's sum is scaled by its own before / after
    # ratio, so the objective depends on which documents share a micro-batch (packing) and a rank. The roll's count
    # (the divisor of both the back-propagated and the logged MTP loss) becomes the one that weighs every token alike
    # (see the roll above). Only the MTP module's roll and GPTModel's binding of process_mtp_loss change; the rolls of
    # ids and positions ignore the count.
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer import multi_token_prediction as mtp

    if not hasattr(mtp.roll_tensor, "__wrapped__"):
        replace(mtp, "roll_tensor", _roll_with_sequence_count(mtp.roll_tensor))
    if not hasattr(gpt_model.process_mtp_loss, "__wrapped__"):
        replace(gpt_model, "process_mtp_loss", _with_normalisation_known(gpt_model.process_mtp_loss))


def _token_count_of_the_group(count_tokens):
    @functools.wraps(count_tokens)
    def count_tokens_of_the_group(routing_map, reduce_group, topk=None, with_padding_mask=False):
        """megatron's expert token counts, the `local` count with padding masked being the group's mean: the one
        number megatron's per-token aux-loss scaling (local x group size) means."""
        global_per_expert, local, total = count_tokens(routing_map, reduce_group, topk=topk,
                                                       with_padding_mask=with_padding_mask)
        if with_padding_mask:
            local = total / reduce_group.size()
        return global_per_expert, local, total

    return count_tokens_of_the_group


def fix_moe_aux_loss_with_padding_over_split_sequences() -> None:
    # Under --calculate-per-token-loss megatron scales each rank's router aux loss by its own count of non-padding
    # tokens x the TP x CP group's size, meaning the group's count; with a padding mask (packed sequences) the
    # padding falls unevenly over the sequence-parallel / context-parallel ranks, so each rank weighs the loss by
    # its own share (measured: the grad norm 0.6% off at TP2 + SP and at CP2 on packed chat sequences). The count
    # megatron hands on becomes the group's mean, which it already has (it all-reduced the per-expert counts).
    from megatron.core.transformer.moe import router

    if not hasattr(router.get_tokens_per_expert_and_token_count, "__wrapped__"):
        replace(router, "get_tokens_per_expert_and_token_count",
                _token_count_of_the_group(router.get_tokens_per_expert_and_token_count))


def _mtp_rolls_the_whole_padding_mask(get_embeddings):
    @functools.wraps(get_embeddings)
    def get_embeddings_whole_padding_mask(self, input_ids, position_ids, embedding, hidden_states,
                                          packed_seq_params=None, padding_mask=None):
        """megatron's MTP inputs, with the padding mask rolled as a whole sequence (as the token ids are) and then
        cut back to this rank's sequence-parallel slice."""
        tp = self.tp_group
        if padding_mask is None or not self.config.sequence_parallel or tp is None or tp.size() == 1:
            return get_embeddings(self, input_ids, position_ids, embedding, hidden_states,
                                  packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        whole = gather_from_sequence_parallel_region(padding_mask.t().to(torch.uint8).contiguous(), group=tp)
        out = get_embeddings(self, input_ids, position_ids, embedding, hidden_states,
                             packed_seq_params=packed_seq_params, padding_mask=whole.t().bool())
        rolled = out[2].t().chunk(tp.size(), dim=0)[tp.rank()].t().contiguous()
        return (*out[:2], rolled, *out[3:])

    return get_embeddings_whole_padding_mask


def fix_mtp_padding_mask_under_sequence_parallelism() -> None:
    # Under sequence parallelism the MTP layer receives the padding mask already cut to this rank's slice of the
    # sequence and rolls that slice by one token as if it were the whole sequence (its token ids are whole): the
    # MTP layer's MoE router then masks the wrong tokens (measured on packed chat sequences: the grad norm 2.6e-4 off
    # at TP2 + SP). The mask is gathered, rolled with the ids, and cut again.
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    method = MultiTokenPredictionLayer._get_embeddings
    if not hasattr(method, "__wrapped__"):
        replace(MultiTokenPredictionLayer, "_get_embeddings", _mtp_rolls_the_whole_padding_mask(method))


def _main_params_in_model_order(build):
    @functools.wraps(build)
    def build_in_model_order(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        """megatron's main-param groups, each inner-optimizer group's params in the order the checkpoint index of
        every model param (`model_param_group_index_map`) assumes: the group's model params' order."""
        groups = build.__func__(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        model_f16, model_f32, _, shard_f32, shard_f32_from_f16 = groups
        if not config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            for g, group_range in enumerate(opt_group_ranges):
                main = dict(zip(map(id, model_f32[g]), shard_f32[g], strict=True))
                main.update(zip(map(id, model_f16[g]), shard_f32_from_f16[g], strict=True))
                group_range["orig_group"]["params"] = [main[id(p)] for p in group_range["params"]]
        return groups

    build_in_model_order.in_model_order = True
    return classmethod(build_in_model_order)


def fix_distributed_optimizer_with_fp32_params() -> None:
    # The distributed optimizer puts a group's fp32 params first in its inner optimizer group, while the index its
    # checkpoints use (model_param_group_index_map) counts the group's params in model order: a bf16 model with any
    # fp32 parameter (Qwen3.5's A_log, GDN norm) saves and loads other params' Adam state in their place, or asserts.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    if not getattr(build.__func__, "in_model_order", False):  # (a classmethod always has __wrapped__)
        replace(DistributedOptimizer, "_build_model_and_main_param_groups", _main_params_in_model_order(build))


@contextlib.contextmanager
def _every_param_as_a_main_param(optimizer):
    """Within the block, the fp16/bf16 optimizer's (float16 model param, fp32 main param) lists hold every param of
    each group in the inner optimizer's order, an fp32 model param being its own main param."""
    saved = optimizer.float16_groups, optimizer.fp32_from_float16_groups
    model_of = {id(main): model for models, mains in zip(*saved, strict=True)
                for model, main in zip(models, mains, strict=True)}
    mains = [list(group["params"]) for group in optimizer.optimizer.param_groups]
    optimizer.float16_groups = [[model_of.get(id(p), p) for p in group] for group in mains]
    optimizer.fp32_from_float16_groups = mains
    try:
        yield
    finally:
        optimizer.float16_groups, optimizer.fp32_from_float16_groups = saved


def _with_every_param_as_a_main_param(method):
    @functools.wraps(method)
    def with_every_param(self, *args, **kwargs):
        with _every_param_as_a_main_param(self):
            return method(self, *args, **kwargs)

    return with_every_param


def fix_float16_optimizer_with_fp32_params() -> None:
    # The (non-distributed) fp16/bf16 optimizer maps its checkpoint's param ids to model params by enumerating the
    # float16 params only, while the ids count every param of the inner optimizer: with any fp32 parameter in a bf16
    # model the optimizer state goes to the wrong params ("Optimizer shape ... does not match model shape").
    # Presenting each fp32 param as its own main param makes both lists count every param, in the ids' order.
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for name in ("sharded_state_dict", "load_state_dict"):
        method = Float16OptimizerWithFloat16Params.__dict__[name]
        if not hasattr(method, "__wrapped__"):
            replace(Float16OptimizerWithFloat16Params, name, _with_every_param_as_a_main_param(method))


def _chain_of_this_layout(load_state_dict):
    @functools.wraps(load_state_dict)
    def load_state_dict_of_another_chain(self, state_dict):
        """The saved state in this layout's chain: every optimizer gets every saved param group (each picks its own
        by their identifiers) beside its own part of the sharded state (in the fully reshardable format, keyed by the
        model's tensors: any layout's)."""
        chained = len(self.chained_optimizers)
        if not isinstance(state_dict, dict):
            return load_state_dict(self, state_dict)
        parts = [v for k, v in sorted((k, v) for k, v in state_dict.items() if isinstance(k, int))]
        flat = {k: v for k, v in state_dict.items() if not isinstance(k, int)}
        if (not parts if chained == 1 else not flat and all("optimizer" in p for p in parts)):
            return load_state_dict(self, state_dict)  # saved by a chain of this layout's length
        groups = [g for d in [flat, *parts] if "optimizer" in d for g in d["optimizer"]["param_groups"]]
        # where expert params shared the dense optimizer, their groups were not marked expert-parallel: the flag
        # says which optimizer holds a group, its hyperparameters are the dense group's
        from megatron.core.optimizer.optimizer import param_group_identifier_keys

        def identifier(group):
            return tuple(group.get(k) for k in param_group_identifier_keys)

        saved = {identifier(g) for g in groups}
        flipped = [{**g, "is_expert_parallel": not g.get("is_expert_parallel", False)} for g in groups]
        groups += [g for g in flipped if identifier(g) not in saved]
        common = {k: v for d in [*parts, flat] for k, v in d.items() if k not in ("optimizer", "param_state")}
        if chained == 1:  # a chain saved, one optimizer here: its sharded state was asked for unnumbered
            return load_state_dict(self, {**common, **flat, "optimizer": {"param_groups": groups}})
        return load_state_dict(self, {i: {**common, **part, "optimizer": {"param_groups": groups}}
                                      for i, part in enumerate(parts)})

    load_state_dict_of_another_chain.of_any_chain = True
    return load_state_dict_of_another_chain


def fix_chained_optimizer_count_change() -> None:
    # megatron puts MoE expert parameters in an optimizer of their own only where their data-parallel group differs
    # from the dense parameters' (not at TP1 / EP1 on one rank): a checkpoint saved with one optimizer holds its
    # state unnumbered, one saved with two numbers it, and ChainedOptimizer.load_state_dict refuses the other shape
    # ("Expected 2 entries", or a KeyError) even in the fully reshardable format made to change layouts.
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    if not getattr(ChainedOptimizer.load_state_dict, "of_any_chain", False):
        replace(ChainedOptimizer, "load_state_dict", _chain_of_this_layout(ChainedOptimizer.load_state_dict))


__all__ = ["fix_chained_optimizer_count_change", "fix_compile_helpers_in_wheel", "fix_flops_count_with_mtp",
           "fix_mtp_loss_under_context_parallelism", "fix_moe_aux_loss_with_padding_over_split_sequences",
           "fix_mtp_padding_mask_under_sequence_parallelism", "fix_distributed_optimizer_with_fp32_params",
           "fix_float16_optimizer_with_fp32_params"]
