"""Conversion parity at the released models' real shapes: transformers against the converted model, and the round trip.

    python benchmarks/real_shapes.py [--case 0.8b|35b-a3b-slice|all] [--batch 2] [--seq 64] [--workdir /tmp] [--keep]

For each case a random checkpoint is written the way Hugging Face stores the released ones (bf16, with `A_log` and
`linear_attn.norm.weight` in fp32, the MTP layer's `mtp.*` tensors included, sharded safetensors with an index;
names and shapes from transformers' own Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM; transformers has no MTP module,
so the `mtp.*` names come from our table and their shapes from transformers' full-attention layer), then:

  1. HF -> Megatron (`qwen35_hf_to_megatron`), timed, with the converting process's peak RSS;
  2. real text (Qwen35Tokenizer on data/tiny_corpus.txt) through transformers' model (`from_pretrained` of the
     source files, fp32, pure-PyTorch kernels) and through `load_model` of the conversion (fp32): max |delta logit|,
     KL(ref || ours) per token (mean and max), top-1 agreement;
  3. Megatron -> HF (`qwen35_megatron_to_hf`), timed, peak RSS; the export against the source: every tensor name,
     dtype, shape and byte (read with the safetensors library), config.json and generation_config.json byte for
     byte; and, as a further figure, how many of the source's files (shards, index) come back byte for byte.

Targets: max |delta| <= 1e-4, KL <= 1e-6 (every token), the same argmax everywhere, N/N tensors bitwise.

Cases:
  0.8b           the `0.8b` preset at full depth (24 layers, vocabulary 248320, tied head) + its MTP layer.
  35b-a3b-slice  `35b-a3b` cut to 2 layers, one Gated DeltaNet and one full attention (the preset's own pattern puts
                 the first full-attention layer at index 3, so 2 layers of it would be both GDN), all 256 experts,
                 width 512, vocabulary 248320, untied head; decoder experts fused 3-D as transformers holds them
                 (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), MTP experts per expert.
                 6.6 GiB in bf16; in fp32 transformers' model holds ~10 GiB and ours (with its MTP layer) 13.2 GiB
                 (measured peaks ~16 and ~20 GiB RSS), so every step runs in its own process, one after the other.

Every heavy step runs in a fresh (spawned) process: its peak RSS (psutil, sampled every 10 ms) is its own, and its
memory is gone before the next step starts.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser compiles on first call; same numbers

GB = 1024**3
CORPUS = ROOT / "data" / "tiny_corpus.txt"
LOGIT_TOL = 1e-4
KL_TOL = 1e-6
FP32_IN_RELEASED_FILES = ("linear_attn.A_log", "linear_attn.norm.weight")  # every other tensor is bf16
# The two model-loading steps run with glibc's mmap threshold fixed at 1 MiB: by default it rises to the largest block
# freed so far (up to 32 MiB), after which megatron's per-expert weights and their CPU-init temporaries come from
# the heap, which then stays fragmented: load_model of the 35b-a3b slice (13.2 GiB of fp32 parameters) holds 22.4 GiB
# after loading and peaks near 23 GiB (the OOM killer took it on a 23 GiB box); with the fixed threshold it holds
# 13.7 GiB and peaks at ~19.8 GiB. `--default-malloc` runs them without it.
MODEL_LOADING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
GENERATION_CONFIG = {"bos_token_id": 248044, "eos_token_id": [248046, 248044], "pad_token_id": 248044,
                     "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "5"}


@dataclass(frozen=True)
class Case:
    """A model shape, and how its Hugging Face files store the MTP layer's experts (MoE only; the decoder's are
    fused 3-D, as transformers' module holds them)."""

    name: str
    preset: str
    changes: dict[str, Any] = field(default_factory=dict)
    mtp_experts: str = "per_expert"  # the MTP layer's experts: "per_expert" (experts.{e}.*_proj) or "packed"
    description: str = ""

    def config(self):
        """The text model of the preset (the checkpoints here are Qwen3_5(Moe)ForCausalLM; the vision tower's
        conversion and parity are tests/test_vl_model.py's and tests/test_released_layouts.py's)."""
        from megatron_qwen35.config import qwen35_preset

        return qwen35_preset(self.preset).replace(vision=None, **self.changes)


CASES = {
    "0.8b": Case("0.8b", "0.8b", description="0.8b preset, 24 layers (18 GDN + 6 attention), vocab 248320, tied "
                 "head, MTP layer"),
    "35b-a3b-slice": Case("35b-a3b-slice", "35b-a3b",
                          dict(num_layers=2, layer_types=("linear_attention", "full_attention")),
                          description="35b-a3b, 2 layers (GDN + attention), 256 experts x 512 wide, vocab 248320, "
                          "untied head, decoder experts fused 3-D, MTP layer per-expert"),
}


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _transformers_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor transformers' model class stores for cfg (on the meta device: no memory)."""
    import torch

    from megatron_qwen35.hf_reference import modeling, reference_config

    m = modeling(cfg.is_moe)
    cls = m.Qwen3_5MoeForCausalLM if cfg.is_moe else m.Qwen3_5ForCausalLM
    with torch.device("meta"):
        model = cls(reference_config(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mtp_shapes(cfg, decoder: dict[str, tuple[int, ...]], expert_layout: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the MTP layer's `mtp.*` tensors (transformers has no MTP module): the names from our table,
    the shapes from transformers' own full-attention decoder layer (the MTP's inner layer is one) and the hidden
    size; the conversion then checks both against the model it builds."""
    from megatron_qwen35.config import FULL_ATTENTION
    from megatron_qwen35.convert.table import TEXT_ONLY_PREFIX, qwen35_rules

    names = [n for r in qwen35_rules(cfg.replace(mtp_num_layers=1), hf_prefix=TEXT_ONLY_PREFIX,
                                     expert_layout=expert_layout) for n in r.hf if n.startswith("mtp.")]
    layer = f"{TEXT_ONLY_PREFIX}layers.{cfg.layer_types.index(FULL_ATTENTION)}."
    h = cfg.hidden_size
    shapes = {}
    for name in names:
        inner = name.removeprefix("mtp.layers.0.")
        if name == "mtp.fc.weight":  # [norm(embedding) | norm(hidden)] -> hidden
            shapes[name] = (h, 2 * h)
        elif inner == name:  # pre_fc_norm_embedding, pre_fc_norm_hidden, norm
            shapes[name] = (h,)
        elif ".experts." in inner and layer + inner not in decoder:  # per expert, from the fused [E, 2I, H] / [E, H, I]
            e_gate_up, e_down = (decoder[f"{layer}mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj"))
            shapes[name] = e_down[1:] if inner.endswith("down_proj.weight") else (e_gate_up[1] // 2, e_gate_up[2])
        else:
            shapes[name] = decoder[layer + inner]
    return shapes


def _random(name: str, shape: tuple[int, ...], g):
    """hf_reference.randomize_'s distributions, tensor by tensor: norms (here also the MTP's pre_fc_norm_*) and
    A_log / dt_bias far from their init, so a missed +1 or a swapped head shows; other weights ~ 0.5 / sqrt(fan_in)."""
    import torch

    module = name.split(".")[-2] if "." in name else ""
    if name.endswith("A_log"):
        return torch.rand(shape, generator=g) * 2.0 - 1.0
    if name.endswith("dt_bias"):
        return torch.randn(shape, generator=g)
    if "norm" in module and name.endswith(".weight"):
        return torch.randn(shape, generator=g) * 0.3 + (1.0 if "linear_attn.norm" in name else 0.0)
    t = torch.randn(shape, generator=g)
    return t.mul_(0.5 / max(shape[-1], 1) ** 0.5)


def hf_dtype(name: str):
    import torch

    return torch.float32 if name.endswith(FP32_IN_RELEASED_FILES) else torch.bfloat16


def _shards(plan: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    shards, size = [[]], 0
    for name, shape in plan:
        nbytes = math.prod(shape) * hf_dtype(name).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def build_hf_checkpoint(case: Case, path: Path, *, seed: int = 0, max_shard_bytes: int = GB) -> dict[str, Any]:
    """The case's random checkpoint as the released files store it; streamed shard by shard (one shard, plus the
    fp32 draw of its largest tensor, in memory at a time). Returns its tensor count and bytes."""
    import torch
    from safetensors.torch import save_file

    from megatron_qwen35.config import qwen35_config_to_hf

    cfg = case.config()
    shapes = _transformers_shapes(cfg)
    if cfg.mtp_num_layers:
        shapes.update(_mtp_shapes(cfg, shapes, case.mtp_experts if cfg.is_moe else "packed"))
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # save_pretrained stores a tied head once, as the embedding
    shards = _shards(list(shapes.items()), max_shard_bytes)
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = _random(name, shape, g).to(hf_dtype(name))
            weight_map[name] = file
            total += tensors[name].nbytes
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(qwen35_config_to_hf(cfg), indent=2, sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return {"tensors": len(weight_map), "bytes": total, "shards": len(shards),
            "fp32_tensors": sum(hf_dtype(n) == torch.float32 for n in weight_map)}


# ---------------------------------------------------------------------------------------------------------------
# The steps (each in a fresh process)
# ---------------------------------------------------------------------------------------------------------------

def token_ids(batch: int, seq: int):
    """[batch, seq] consecutive pieces of data/tiny_corpus.txt, tokenized with the real Qwen3.5 tokenizer."""
    import torch

    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    ids = Qwen35Tokenizer().encode(CORPUS.read_text())
    if len(ids) < batch * seq:
        raise ValueError(f"{CORPUS} has {len(ids)} tokens; {batch} x {seq} needs {batch * seq}")
    return torch.tensor(ids[: batch * seq]).reshape(batch, seq)


def reference_logits(hf_dir: str, batch: int, seq: int, out: str) -> dict[str, Any]:
    """transformers' own model loaded from the source files in fp32, on its pure-PyTorch kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_qwen35.config import qwen35_config_from_hf
    from megatron_qwen35.hf_reference import modeling

    modeling(qwen35_config_from_hf(hf_dir).is_moe)  # before the layers are built, as tests/test_convert.py does
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "unexpected_keys"}  # unexpected: mtp.* (ignored)
    if problems or any(not k.startswith("mtp.") for k in info.get("unexpected_keys", ())):
        raise RuntimeError(f"transformers did not load {hf_dir} cleanly: {info}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError("transformers' model is not all fp32")
    with torch.no_grad():
        logits = model.eval()(input_ids=token_ids(batch, seq)).logits.float()
    torch.save(logits, out)
    return {}


def our_logits(megatron_dir: str, batch: int, seq: int, out: str) -> dict[str, Any]:
    """load_model of the converted checkpoint (fp32 parameters)."""
    import torch

    from megatron_qwen35.inference import load_model

    model = load_model(megatron_dir)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError("load_model's model is not all fp32")
    torch.save(model(token_ids(batch, seq)), out)
    return {}


def hf_to_megatron(src: str, dst: str) -> dict[str, Any]:
    from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron

    qwen35_hf_to_megatron(src, dst, progress=False)
    return {}


def megatron_to_hf(src: str, dst: str) -> dict[str, Any]:
    from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf

    qwen35_megatron_to_hf(src, dst, progress=False)
    return {}


def _child(fn_name: str, args: tuple, queue) -> None:
    """Child process: fn(*args), timed, with this process's peak RSS; imports are done (and timed) first."""
    start = time.perf_counter()
    import psutil

    import megatron_qwen35.provider  # noqa: F401  (megatron-core, transformers)
    from megatron_qwen35.runtime import apply_runtime_patches

    apply_runtime_patches()  # each child is an entry point
    setup = time.perf_counter() - start
    me, peak, done = psutil.Process(), [0, 0], threading.Event()

    def sample():  # ru_maxrss would report the parent's RSS: Linux keeps it across the spawn's exec
        while not done.is_set():
            m = me.memory_info()
            peak[0], peak[1] = max(peak[0], m.rss), max(peak[1], m.rss - m.shared)  # all, anonymous
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        start = time.perf_counter()
        result = globals()[fn_name](*args)
        os.sync()
        seconds = time.perf_counter() - start
    except BaseException as e:
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
        sys.exit(1)
    done.set()
    sampler.join()
    m = me.memory_info()
    queue.put({**result, "seconds": seconds, "setup_seconds": setup, "peak_rss": max(peak[0], m.rss),
               "peak_anon": max(peak[1], m.rss - m.shared)})


def run_step(fn, *args, env: dict[str, str] | None = None) -> dict[str, Any]:
    """fn(*args) in a fresh spawned process (with `env` added to its environment): its result with seconds,
    setup_seconds (imports), peak_rss and peak_anon (RSS less file-backed pages)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn.__name__, args, queue))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the spawned interpreter starts with this environment (glibc reads it at start)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    try:
        while True:
            try:
                result = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():  # killed (e.g. by the kernel's OOM killer) before it could report
                    result = {"error": f"the process died (exit code {proc.exitcode}; -9 is SIGKILL, e.g. out of "
                                       "memory)"}
                    break
    finally:
        proc.join()
    if "error" in result or proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {proc.exitcode}): {result.get('error', '')}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------

def compare_logits(want_path: Path, got_path: Path) -> dict[str, Any]:
    """max |delta logit|, KL(ref || ours) per token (mean, max), top-1 agreement (k of n tokens)."""
    import torch

    want, got = torch.load(want_path), torch.load(got_path)
    if want.shape != got.shape:
        raise ValueError(f"logits shapes differ: reference {tuple(want.shape)}, ours {tuple(got.shape)}")
    # in float64: in fp32, log_softmax over 248320 entries (|log p| ~ 12) alone rounds the KL to ~1e-7 per token
    kl = torch.nn.functional.kl_div(got.double().log_softmax(-1), want.double().log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    agree = got.argmax(-1) == want.argmax(-1)
    return {"max_abs_delta": (got - want).abs().max().item(), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1_agree": int(agree.sum()), "tokens": agree.numel(), "logit_absmax": want.abs().max().item(),
            "shape": tuple(want.shape)}


def compare_hf_checkpoints(want: Path, got: Path) -> dict[str, Any]:
    """Every tensor's name, dtype, shape and bytes (read with the safetensors library, not our reader), and
    config.json / generation_config.json byte for byte. Returns counts and the first differences."""
    import torch
    from safetensors import safe_open

    def tensor_files(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        return {k: p for p in sorted(d.glob("*.safetensors"))
                for k in safe_open(str(p), framework="pt").keys()}

    a, b = tensor_files(want), tensor_files(got)
    names = sorted(set(a) & set(b))
    differ = []
    for name in names:
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        same = (x.dtype, x.shape) == (y.dtype, y.shape) and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                        y.reshape(-1).view(torch.uint8))
        if not same:
            differ.append(f"{name}: {x.dtype} {list(x.shape)} -> {y.dtype} {list(y.shape)}")
        del x, y
    files = {f: _same_bytes(want / f, got / f) for f in ("config.json", "generation_config.json")
             if (want / f).is_file()}
    source_files = sorted(p.name for p in want.iterdir() if p.is_file())
    return {"tensors": len(a), "bitwise": len(names) - len(differ), "missing": sorted(set(a) - set(b)),
            "extra": sorted(set(b) - set(a)), "differ": differ, "files_equal": files,
            "source_files": len(source_files),
            "identical_files": sum(_same_bytes(want / f, got / f) for f in source_files),
            "export_files": sorted(p.name for p in got.iterdir() if p.is_file())}


def _same_bytes(a: Path, b: Path, chunk: int = 64 * 1024**2) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(chunk):
            if block != fb.read(chunk):
                return False
    return True


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------------
# One case, end to end
# ---------------------------------------------------------------------------------------------------------------

def run_case(case: Case, root: Path, *, batch: int = 2, seq: int = 64, model_env: dict[str, str] | None = None,
             log=print) -> dict[str, Any]:
    """Build, convert, compare, export, compare; every heavy step in its own process. Returns every figure.
    model_env: the two model-loading steps' environment additions (None: MODEL_LOADING_ENV)."""
    model_env = MODEL_LOADING_ENV if model_env is None else model_env
    root.mkdir(parents=True, exist_ok=True)
    hf, mg, out = root / "hf", root / "mg", root / "out"
    r: dict[str, Any] = {"case": case.name, "description": case.description, "batch": batch, "seq": seq,
                         "model_env": model_env}
    r["build"] = run_step(build_hf_checkpoint, case, hf)
    log(f"[{case.name}] source: {r['build']['tensors']} tensors ({r['build']['fp32_tensors']} fp32), "
        f"{r['build']['shards']} shards, {r['build']['bytes'] / GB:.2f} GiB, built in {r['build']['seconds']:.0f} s")
    r["to_megatron"] = run_step(hf_to_megatron, hf, mg)
    log(f"[{case.name}] HF -> Megatron {_timing(r['to_megatron'])}")
    r["reference"] = run_step(reference_logits, hf, batch, seq, root / "want.pt", env=model_env)
    log(f"[{case.name}] transformers forward {_timing(r['reference'])}")
    r["ours"] = run_step(our_logits, mg, batch, seq, root / "got.pt", env=model_env)
    log(f"[{case.name}] load_model forward {_timing(r['ours'])}")
    r["logits"] = compare_logits(root / "want.pt", root / "got.pt")
    r["to_hf"] = run_step(megatron_to_hf, mg, out)
    log(f"[{case.name}] Megatron -> HF {_timing(r['to_hf'])}")
    r["round_trip"] = compare_hf_checkpoints(hf, out)
    r["sizes"] = {"hf": dir_bytes(hf), "megatron": dir_bytes(mg), "export": dir_bytes(out)}
    return r


def _timing(step: dict[str, Any]) -> str:
    return (f"{step['seconds']:.1f} s, peak RSS {step['peak_rss'] / GB:.2f} GiB (anonymous {step['peak_anon'] / GB:.2f}"
            f" GiB; imports {step['setup_seconds']:.0f} s before that)")


def targets_met(r: dict[str, Any]) -> dict[str, bool]:
    lg, rt = r["logits"], r["round_trip"]
    return {"max_abs_delta": lg["max_abs_delta"] <= LOGIT_TOL, "kl": lg["kl_max"] <= KL_TOL,
            "top1": lg["top1_agree"] == lg["tokens"],
            "round_trip": rt["bitwise"] == rt["tensors"] and not rt["extra"] and all(rt["files_equal"].values())}


def report(r: dict[str, Any]) -> str:
    lg, rt, s, met = r["logits"], r["round_trip"], r["sizes"], targets_met(r)
    env = " ".join(f"{k}={v}" for k, v in r["model_env"].items())
    ok = lambda k: "met" if met[k] else "NOT met"  # noqa: E731
    lines = [
        f"== {r['case']}: {r['description']}",
        f"   text: {r['batch']} x {r['seq']} tokens of {CORPUS.name} (Qwen35Tokenizer); logits {lg['shape']}, "
        f"|logit| up to {lg['logit_absmax']:.2f}",
        f"   max |delta logit| {lg['max_abs_delta']:.3e} (target <= {LOGIT_TOL:g}: {ok('max_abs_delta')})",
        f"   KL(ref||ours) per token: mean {lg['kl_mean']:.3e}, max {lg['kl_max']:.3e} (target <= {KL_TOL:g}: "
        f"{ok('kl')})",
        f"   top-1 agreement {lg['top1_agree']}/{lg['tokens']} ({ok('top1')})",
        f"   round trip: {rt['bitwise']}/{rt['tensors']} tensors bitwise; files "
        + ", ".join(f"{f} {'identical' if same else 'DIFFERENT'}" for f, same in rt["files_equal"].items())
        + (f"; missing {rt['missing'][:3]}" if rt["missing"] else "") + (f"; extra {rt['extra'][:3]}" if rt["extra"]
                                                                         else "")
        + (f"; differ {rt['differ'][:3]}" if rt["differ"] else "") + f" ({ok('round_trip')})",
        f"   files: {rt['identical_files']}/{rt['source_files']} of the source's files (shards, index, config files) "
        f"byte-identical in the export ({len(rt['export_files'])} files there)",
        f"   sizes: HF source {s['hf'] / GB:.2f} GiB, Megatron {s['megatron'] / GB:.2f} GiB, export "
        f"{s['export'] / GB:.2f} GiB",
        f"   HF -> Megatron: {_timing(r['to_megatron'])}",
        f"   Megatron -> HF: {_timing(r['to_hf'])}",
        f"   transformers from_pretrained + forward: {_timing(r['reference'])}",
        f"   load_model + forward: {_timing(r['ours'])}",
        f"   (both model-loading steps with {env or 'glibc malloc defaults'})",
        f"   building the source: {_timing(r['build'])}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--default-malloc", action="store_true",
                        help="load the models without MODEL_LOADING_ENV (glibc's own mmap threshold)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qwen35-real-shapes-", dir=args.workdir))
    failed = False
    try:
        for name in CASES if args.case == "all" else [args.case]:
            start = time.perf_counter()
            r = run_case(CASES[name], root / name, batch=args.batch, seq=args.seq,
                         model_env={} if args.default_malloc else None)
            print(report(r))
            print(f"   case total {time.perf_counter() - start:.0f} s", flush=True)
            failed |= not all(targets_met(r).values())
            if not args.keep:
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        if args.keep:
            print(f"checkpoints kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
