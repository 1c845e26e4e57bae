"""The register of run-time patches: every row documented and tied to the upstream source it was written against
(a version bump fails here, naming the patch to re-check), and each upstream-bug fix proven against the defect."""

import importlib.metadata
import subprocess
import sys
import warnings
from argparse import Namespace

import pytest

from megatron_qwen35.runtime import register
from megatron_qwen35.runtime.patching import fingerprint, original, resolve


@pytest.mark.parametrize("patch", register.PATCHES, ids=lambda p: p.name)
def test_patch_is_tied_to_the_upstream_source_it_replaces(patch):
    """The replaced upstream objects hash to the fingerprint taken at WRITTEN_FOR: if this fails after an upgrade,
    re-read `patch.replaces` in the new release, re-check the patch, and record the new fingerprint."""
    assert patch.kind in (register.NO_CUDA, register.UPSTREAM_BUG, register.UPSTREAM_COST)
    assert patch.why and callable(patch.apply) and patch.replaces
    assert fingerprint(patch.replaces) == patch.fingerprint, (
        f"{patch.name}: {', '.join(patch.replaces)} changed upstream since megatron-core "
        f"{register.WRITTEN_FOR['megatron-core']} / torch {register.WRITTEN_FOR['torch']}")


@pytest.mark.parametrize("dependency", register.DEPENDENCIES, ids=lambda d: d.name)
def test_upstream_code_we_depend_on_is_what_it_was_read_as(dependency):
    """Code we call or subclass without replacing it (the GDN base class and its extension points, the TP-shared
    gradients' reduction, megatron.training's --finetune hook, the rerun checks): a changed source after an upgrade
    fails here; re-read it for `dependency.how` and record the new fingerprint."""
    assert dependency.how and dependency.targets
    assert fingerprint(dependency.targets) == dependency.fingerprint, (
        f"{dependency.name}: {', '.join(dependency.targets)} changed upstream; re-read them for: {dependency.how}")


def test_nothing_in_the_package_changes_megatron_on_import_or_build():
    """A program that embeds the package (an RL trainer, a notebook) gets megatron changed only when it asks:
    importing the package and building a model apply no patch; a build where a needed patch is missing names the
    call to make."""
    code = ("import torch, megatron_qwen35.provider, megatron_qwen35.inference, megatron_qwen35.convert.megatron_keys;"
            "from megatron_qwen35.runtime import register, one_rank_world;"
            "from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config;"
            "from megatron_qwen35.provider import qwen35_gpt_model;"
            "assert register.applied_patches() == [], register.applied_patches();"
            "cfg = qwen35_preset('tiny');"
            "tc = qwen35_transformer_config(cfg, perform_initialization=False);\n"
            "try:\n"
            "    with one_rank_world(), torch.device('meta'): qwen35_gpt_model(cfg, tc)\n"
            "except RuntimeError as e: print(e)\n"
            "assert register.applied_patches() == []")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TORCHDYNAMO_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    if not __import__("torch").cuda.is_available():  # this machine needs the no-CUDA rows to build
        assert "call megatron_qwen35.runtime.apply_runtime_patches() once first" in done.stdout, done.stdout


def test_patch_names_are_unique_and_the_pinned_versions_are_installed():
    names = [p.name for p in register.PATCHES]
    assert len(names) == len(set(names))
    assert register.version_mismatches() == {}
    for package, version in register.WRITTEN_FOR.items():
        assert importlib.metadata.version(package).split("+")[0] == version


def test_other_versions_are_named_when_patches_are_applied(monkeypatch):
    monkeypatch.setitem(register.WRITTEN_FOR, "megatron-core", "0.18.0")
    monkeypatch.setattr(register, "_APPLIED", [])
    monkeypatch.setattr(register, "PATCHES", ())  # nothing to apply: only the check runs
    with pytest.warns(UserWarning, match=r"megatron-core 0\.19\.2 \(written for 0\.18\.0\)"):
        register.apply_patches()


def test_no_cuda_rows_are_applied_only_without_cuda():
    """With CUDA, only the upstream-bug fixes apply (fresh interpreter: nothing patched yet)."""
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_qwen35.runtime import register\n"
            "print(register.apply_patches())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"TORCHDYNAMO_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str([p.name for p in register.PATCHES if p.kind != register.NO_CUDA])


def test_dataset_helpers_are_not_rebuilt_where_the_wheel_ships_them(monkeypatch):
    """megatron's compile_helpers runs make, and the wheel has no Makefile: it exits the process. The fix uses the
    compiled helpers and never calls make."""
    import megatron.core.datasets.utils as dataset_utils

    register.apply_patches()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or Namespace(returncode=2))
    with pytest.raises(SystemExit):
        resolve("megatron.core.datasets.utils:compile_helpers")()  # the defect, as released
    assert calls and calls[0][0][0] == "make"
    calls.clear()
    dataset_utils.compile_helpers()
    assert calls == []


def _flops_args():
    """megatron.training's args for tiny-moe as pretrain_qwen35.py parses them (the FLOPs count reads these)."""
    from megatron.training.arguments import parse_args

    from megatron_qwen35.training.flags import add_qwen35_args
    from megatron_qwen35.training.launch import qwen35_argv

    saved = sys.argv
    sys.argv = ["pretrain_qwen35.py", *qwen35_argv(["--qwen35-preset", "tiny-moe", "--seq-length", "32",
                                                     "--micro-batch-size", "2"])]
    try:
        args = parse_args(add_qwen35_args)
    finally:
        sys.argv = saved
    args.padded_vocab_size = args.vocab_size  # validate_args sets it (--make-vocab-size-divisible-by 1)
    return args


def test_flops_count_covers_the_mtp_layer():
    """megatron's FLOPs count asserts on a layer-pattern list with MTP (every Qwen3.5 run, first log); the fix counts
    the MTP layer as the full-attention layer it is and leaves the args as they were."""
    from megatron.training import training

    register.apply_patches()
    args = _flops_args()
    pattern = list(args.linear_attention_freq)
    with pytest.raises(AssertionError, match="linear_attention_pattern"):
        original(training, "num_floating_point_operations")(args, 4)
    with_mtp = training.num_floating_point_operations(args, 4)
    assert args.linear_attention_freq == pattern
    args.mtp_num_layers = None
    without_mtp = training.num_floating_point_operations(args, 4)
    assert with_mtp > without_mtp > 0


def test_mtp_count_fix_changes_nothing_without_context_parallelism():
    import torch
    from megatron.core.transformer import multi_token_prediction as mtp

    register.apply_patches()
    x = torch.arange(12.0).view(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = mtp.roll_tensor(x, shifts=-1, dims=-1)
        theirs = original(mtp, "roll_tensor")(x, shifts=-1, dims=-1)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(torch.as_tensor(ours[1]), torch.as_tensor(theirs[1]))


def test_megatrons_gpt_model_deprecation_notice_is_left_out_of_our_builds_alone(megatron_single_process, caplog):
    """megatron-core 0.19 logs a deprecation notice on every GPTModel it builds, asking for HybridModel (which cannot
    hold Qwen3.5: provider.py): our models are built without it, while megatron's own GPTModel still logs it (so the
    notice's text is still the one we leave out) and the logger keeps no filter of ours afterwards."""
    import logging

    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.model import GPT_MODEL_DEPRECATION_NOTICE
    from megatron_qwen35.provider import qwen35_gpt_model

    def notices() -> int:
        return sum(GPT_MODEL_DEPRECATION_NOTICE in r.getMessage() for r in caplog.records)

    logger = logging.getLogger(GPTModel.__module__)
    filters = list(logger.filters)
    cfg = qwen35_preset("tiny")
    with caplog.at_level(logging.WARNING, logger=GPTModel.__module__), torch.device("meta"):
        qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, perform_initialization=False), backend="local")
        assert notices() == 0
        plain = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, perform_initialization=False)
        GPTModel(plain, get_gpt_layer_local_spec(), vocab_size=16, max_sequence_length=8)
        assert notices() == 1
    assert logger.filters == filters


def test_a_synchronous_save_starts_no_process_and_reads_back_what_it_wrote(megatron_single_process, tmp_path):
    """megatron's synchronous torch_dist save, as released, starts a multiprocessing manager (a spawned process that
    imports torch) at a process's first save to pass results within the process; with the register the results stay
    in the process, no child is left running, and the checkpoint reads back exactly."""
    import multiprocessing

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    register.apply_patches()
    weight = torch.randn(3, 4)
    children = set(multiprocessing.active_children())
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, str(tmp_path))
    assert set(multiprocessing.active_children()) == children
    assert filesystem_async._results_queue is None  # the asynchronous path still creates its manager when used
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)},
                                     str(tmp_path))
    assert torch.equal(loaded["w"], weight)
