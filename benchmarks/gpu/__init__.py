"""The GPU checks in one run: FLA against the torch path, bf16 against fp32, TE against local, generation, speed.

    python benchmarks/gpu_checks.py            # a session with a CUDA device
    python benchmarks/gpu_checks.py --dry-run  # CI: every check on CPU, small shapes, FLA under Triton's interpreter

1. fla_vs_torch: `gdn_ops.chunk_gated_delta_rule` and `causal_conv1d`, FLA's Triton kernels against the same call with
   deterministic=True (the torch path), same inputs on the same device: fp32 and bf16, plain and packed (documents
   not multiples of 64 tokens), 2x more value heads than key heads; the output and the gradients of every input
   (backward of a fixed random projection of the output).
2. bf16_forward: the fp32 model (local backend, torch GDN path) against the same weights in bf16 under megatron's
   Float16Module (Transformer Engine where it imports, else local), copied through a saved checkpoint loaded with
   strict key matching: relative max |delta logit|, KL(fp32 || bf16) per token, top-1 agreement; then a bf16
   forward + backward, and A_log / the GDN norm weight (and their gradients) still fp32.
3. te_vs_local (where TE imports, on CUDA): one checkpoint loaded into the TE and the local model, fp32: logits,
   loss and the gradient of every parameter, matched by checkpoint name (the names both backends save under; TE fuses
   the input norms into its linears, so module names differ); the same on one packed (THD) sequence of three
   documents, each backend's packed logits also equal to its documents run alone (on CPU: the local half only);
   then LoRA on every linear of both (logits, loss, every adapter gradient; on CPU two local models).
4. generate: greedy generation of a left-padded batch (tiny-moe, local backend) through FLA's kernels (chunked and
   conv with states for the prompts, fused recurrent and conv update per token) against the same weights on the torch
   path, same device: every token equal, log-probabilities within check 1's fp32 bound.
5. stack_tflops (CUDA only): model TFLOP/s of a 4-layer 27b-shaped stack (3 GDN + 1 gated attention, dense MLP) at
   sequence 4096, forward + backward in bf16, divided by a bf16 matmul's TFLOP/s measured in the same run.
6. vision: one checkpoint of a VL model (tiny-vl's text model; on a GPU with 27b's ViT at depth 2) loaded into the TE
   and the local model (local and local where TE is absent: the dry run checks the code path): the tower's merged
   features for two images and a two-frame video of different sizes in fp32 and in bf16, then the whole model's
   logits, loss and every parameter's gradient (the tower's included) on a batch holding them, fp32.
Every reference runs on the device of what it checks. Errors are relative: max|got - want| / max|want| per tensor.
Prints one `check <name> ... ok|FAIL` line per result (`... skipped: <why>` where it cannot run; the timing line
ends with `ratio X`) and a summary; exits 1 if any check fails or raises.

    environment.py  first import: --dry-run read from sys.argv, the environment torch and triton read, Triton's
                    interpreter; DEVICE, and whether FLA's kernels run there
    tolerances.py   every bound, with its reason
    shapes.py       the sizes on a GPU and in the dry run
    reporting.py    the check lines, the summary's tally, the relative error
    batches.py      seeded inputs: normal samples, token batches, the VL batch
    models.py       presets, building a model on a named backend and device, the fp32 reference, checkpoint copies,
                    forward + backward, parameters by checkpoint name
    checks/         one module per check (fla_vs_torch, bf16, te_vs_local, generate, vision, stack_tflops)
    runner.py       the entry point: run-time patches, parallel state, every check in turn, the summary, the exit code
"""

from . import environment  # noqa: F401  (first: it sets the environment up before torch and triton are imported)
