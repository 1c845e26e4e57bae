"""Does a parallel layout fit a Qwen3.5 model? One check per rule, each error naming the field, its value and the size.

megatron-core finds most of these itself, but deep inside a layer and as a bare `assert` ("4 is not divisible by 3"),
after minutes of start-up on a large job. `qwen35_gpt_model` calls `check_parallel_layout` before building anything.
docs/parallelism.md lists the rules with the layouts that are proven by tests.
"""

from __future__ import annotations

from megatron_qwen35.config import Qwen35Config


class ParallelLayoutError(ValueError):
    """A parallel layout that the model's shape cannot be split into."""


def check_parallel_layout(cfg: Qwen35Config, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                          expert_parallel: int = 1, virtual_pipeline_parallel: int | None = None,
                          expert_tensor_parallel: int | None = None, context_parallel: int = 1,
                          batch_p2p_comm: bool | None = None, uneven_pipeline: bool = False,
                          seq_length: int | None = None) -> None:
    """Raise ValueError naming the field, its value and the parallel size for each rule the layout breaks: heads,
    query groups and vocabulary against TP, experts against EP, the MLP widths against TP / expert-TP, layers against
    PP x VPP, VPP's p2p setting, the GDN heads against CP and, when given, the training sequence length against CP."""
    tp, pp, ep, cp = tensor_parallel, pipeline_parallel, expert_parallel, context_parallel
    vpp = virtual_pipeline_parallel or 1
    etp = tp if expert_tensor_parallel is None else expert_tensor_parallel
    for flag, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("expert_parallel", ep),
                        ("virtual_pipeline_parallel", vpp), ("expert_tensor_parallel", etp),
                        ("context_parallel", cp)):
        if not isinstance(value, int) or value < 1:
            raise ParallelLayoutError(f"{flag} must be a positive integer, got {value!r}")

    problems = []

    def divisible(field: str, value: int | None, flag: str, size: int, what: str) -> None:
        if value is not None and size > 1 and value % size:
            problems.append(f"{field}={value} is not divisible by {flag}={size} ({what})")

    for field in ("num_attention_heads", "linear_num_key_heads", "linear_num_value_heads"):
        divisible(field, getattr(cfg, field), "tensor_parallel", tp, "each tensor-parallel rank holds whole heads")
    divisible("vocab_size", cfg.vocab_size, "tensor_parallel", tp, "each rank holds an equal slice of the vocabulary")
    groups = cfg.num_query_groups  # megatron splits KV groups over TP, or replicates each on TP / groups ranks
    if groups % tp and tp % groups:
        problems.append(f"num_query_groups={groups} neither divides nor is divisible by tensor_parallel={tp}")
    if cfg.is_moe:
        divisible("num_experts", cfg.num_experts, "expert_parallel", ep, "each expert-parallel rank holds whole "
                  "experts")
        divisible("moe_ffn_hidden_size", cfg.moe_ffn_hidden_size, "expert_tensor_parallel", etp,
                  "each expert's MLP is split over expert-tensor-parallel ranks")
        divisible("moe_shared_expert_intermediate_size", cfg.moe_shared_expert_intermediate_size, "tensor_parallel",
                  tp, "the shared expert's MLP is split over tensor-parallel ranks")
    else:
        if ep > 1:
            problems.append(f"expert_parallel={ep} needs a mixture-of-experts model; '{cfg.name}' is dense")
        divisible("ffn_hidden_size", cfg.ffn_hidden_size, "tensor_parallel", tp,
                  "the MLP is split over tensor-parallel ranks")
    if cfg.vision is not None:  # the vision tower is tensor parallel like the text model
        divisible("vision num_heads", cfg.vision.num_heads, "tensor_parallel", tp,
                  "each tensor-parallel rank holds whole heads of the vision tower")
        divisible("vision intermediate_size", cfg.vision.intermediate_size, "tensor_parallel", tp,
                  "the vision tower's MLP is split over tensor-parallel ranks")
    if pp * vpp > 1 and not uneven_pipeline and cfg.num_layers % (pp * vpp):
        problems.append(f"num_layers={cfg.num_layers} is not divisible by pipeline_parallel x "
                        f"virtual_pipeline_parallel={pp} x {vpp} "
                        "(every pipeline chunk holds the same number of layers)")
    if vpp > 1 and pp == 1:
        problems.append(f"virtual_pipeline_parallel={vpp} needs pipeline_parallel > 1")
    if vpp > 1 and pp == 2 and batch_p2p_comm:
        problems.append("virtual_pipeline_parallel with pipeline_parallel=2 needs batch_p2p_comm=False (and "
                        "overlap_p2p_comm=True, megatron.training's default): with batched p2p the two ranks exchange "
                        "forward and backward tensors in one batch and receive them swapped")
    if cp > 1:  # the GDN layers trade the sequence split for a split of their heads (all-to-all over CP)
        for field in ("linear_num_key_heads", "linear_num_value_heads"):
            heads = getattr(cfg, field)
            if heads % tp == 0 and (heads // tp) % cp:
                problems.append(f"{field}={heads} split over tensor_parallel={tp} leaves {heads // tp} per rank, "
                                f"not divisible by context_parallel={cp} (the Gated DeltaNet layers run the whole "
                                "sequence on 1/CP of each rank's heads)")
    if cp > 1 and seq_length is not None and seq_length % (2 * cp):
        problems.append(f"seq_length={seq_length} is not divisible by 2 x context_parallel={2 * cp} (megatron "
                        "splits every sequence into 2 x CP equal chunks)")
    if problems:
        raise ParallelLayoutError(f"parallel layout TP={tp} PP={pp} VPP={vpp} EP={ep} ETP={etp} CP={cp} does not fit "
                                  f"Qwen3.5 '{cfg.name}': " + "; ".join(problems))


def check_world_size(world_size: int, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                     context_parallel: int = 1, expert_parallel: int = 1,
                     expert_tensor_parallel: int | None = None) -> None:
    """The job's processes tile both of megatron-core's grids: TP x PP x CP for the dense part, EP x expert-TP x PP for
    the experts (its initialize_model_parallel says only 'world_size (1) is not divisible by 2', on every rank)."""
    etp = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
    for grid, names in ((tensor_parallel * pipeline_parallel * context_parallel,
                         f"TP {tensor_parallel} x PP {pipeline_parallel} x CP {context_parallel}"),
                        (expert_parallel * etp * pipeline_parallel,
                         f"EP {expert_parallel} x expert-TP {etp} x PP {pipeline_parallel}")):
        if world_size % grid:
            raise ParallelLayoutError(f"the layout's {names} = {grid} does not divide the job's {world_size} "
                                      "process(es): launch as many processes as the layout needs (a multiple of "
                                      f"{grid}, e.g. torchrun --nproc-per-node {grid})")


def check_transformer_config_layout(cfg: Qwen35Config, config, seq_length: int | None = None) -> None:
    """`check_parallel_layout` with the sizes a megatron TransformerConfig carries (an explicitly uneven pipeline,
    megatron's num_layers_in_first/last_pipeline_stage or pipeline_model_parallel_layout, is megatron's to check)."""
    check_parallel_layout(cfg, tensor_parallel=config.tensor_model_parallel_size,
                          pipeline_parallel=config.pipeline_model_parallel_size,
                          expert_parallel=config.expert_model_parallel_size,
                          virtual_pipeline_parallel=config.virtual_pipeline_model_parallel_size,
                          expert_tensor_parallel=config.expert_tensor_parallel_size,
                          context_parallel=config.context_parallel_size, batch_p2p_comm=config.batch_p2p_comm,
                          uneven_pipeline=bool(config.num_layers_in_first_pipeline_stage
                                               or config.num_layers_in_last_pipeline_stage
                                               or config.pipeline_model_parallel_layout),
                          seq_length=seq_length)


__all__ = ["ParallelLayoutError", "check_parallel_layout", "check_world_size", "check_transformer_config_layout"]
