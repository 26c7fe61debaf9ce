"""`lima-lightning chat`: a multi-turn conversation in the terminal with the base model or an adapter.

    lima-lightning chat --config configs/demo.yaml --model.adapter_path runs/demo/lightning_logs/version_0/adapters/final
    lima-lightning chat --config configs/llama2-7b-qlora.yaml --model.adapter_path .../adapters/final --prompt "Write a haiku"

Takes fit's options (`--config`, `--model.*` including `--model.adapter_path` and `--model.generation.*`,
`--data.template`, `--data.max_seq_length`; the others are accepted and ignored) and loads the model as
`predict` does; without `--model.adapter_path` the base model answers alone. Each turn the whole
conversation so far is encoded with `data.template` by the very function predict uses (`encode_prompt`), so
the model is fed exactly the ids of that conversation's prefix in training. The answer streams as it is
generated and ends at EOS or after `model.generation.max_new_tokens` tokens (a note says which). When the
prompt plus `max_new_tokens` would exceed `data.max_seq_length`, the oldest exchanges are dropped (a note
says how many). Notes go to stderr, the conversation to stdout.

Typing: a message and Enter; `/reset` starts a new conversation (`--system` stays); `/exit`, Ctrl-D (end of
input) or Ctrl-C end the session. Input that is not a terminal is read line by line and echoed after `you> `.
`--prompt TEXT` answers once and exits: stdout holds the answer alone, for scripts.

Runs on the CPU (`trainer.accelerator: cpu`, or `auto` without a GPU) or on one CUDA GPU (`gpu`, `cuda`,
or `auto` with one). Sampling follows `model.generation` (seeded once with its `seed`); greedy with
`--model.generation.do_sample false`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import TextIO

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import encode_prompt
from lima_lightning.errors import UserError

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # byte-fallback tokens, as Llama-2's SentencePiece names them
COMMANDS = {"/reset": "start a new conversation", "/exit": "end the session", "/help": "list these commands"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """chat's own options, and the rest: fit's options, for `parse_fit_config`."""
    parser = argparse.ArgumentParser(
        prog="lima-lightning chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--p` must not swallow one of fit's options
        epilog="Every other option is fit's (`lima-lightning fit --help` lists them): --config, --model.*, --data.template, ...",
    )
    parser.add_argument("--prompt", default=None, help="Answer this one message, print the answer alone on stdout, and exit.")
    parser.add_argument("--system", default=None, help="A system prompt for the conversation (kept across /reset).")
    return parser.parse_known_args(argv)


# ----------------------------------------------------------------------------- the conversation (pure, given a generator)
@dataclass
class ChatSession:
    """The turns so far and how each next prompt is encoded; `generate(ids, streamer)` returns predict's result dict.

    `history_notes` collects what `ask` had to say about the history (turns dropped, a long message).
    """

    generate: object  # (input_ids: list[int], out: TextIO | None) -> {"response", "finish_reason", "new_tokens"}
    tokenizer: object
    template: str
    max_seq_length: int
    max_new_tokens: int
    system: str | None = None
    turns: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, message: str) -> tuple[list[int], list[str]]:
        """The ids fed to the model for `message` after the history, oldest exchanges dropped to fit; and notes."""
        turns = [*self.turns, message]
        budget = self.max_seq_length - self.max_new_tokens
        dropped = 0
        while True:
            ids = encode_prompt(Conversation(tuple(turns[2 * dropped :]), self.system), self.tokenizer, self.template)
            if len(ids) <= budget or 2 * dropped + 1 >= len(turns):
                break
            dropped += 1
        notes = []
        if dropped:
            self.turns = self.turns[2 * dropped :]
            notes.append(
                f"(dropped the oldest {dropped} exchange{'s' * (dropped > 1)} of the conversation: the prompt plus "
                f"max_new_tokens={self.max_new_tokens} must fit data.max_seq_length={self.max_seq_length})"
            )
        if len(ids) > budget:
            notes.append(
                f"(this prompt is {len(ids)} tokens: with max_new_tokens={self.max_new_tokens} it exceeds "
                f"data.max_seq_length={self.max_seq_length}, longer than anything trained on; answering anyway)"
            )
        return ids, notes

    def ask(self, message: str, out: TextIO | None, notes: TextIO) -> dict:
        """Answer `message` (streamed to `out`), then add both to the history; returns the generation result."""
        ids, history_notes = self.prompt_ids(message)
        for note in history_notes:
            print(note, file=notes, flush=True)
        result = self.generate(ids, out)
        self.turns += [message, result["response"]]
        if result["finish_reason"] == "length":
            print(f"(stopped after max_new_tokens={self.max_new_tokens} tokens, before EOS)", file=notes, flush=True)
        return result


def read_lines(stream: TextIO, out: TextIO):
    """Yield the user's lines: with a prompt and line editing on a terminal, echoed after `you> ` otherwise."""
    interactive = stream.isatty()
    while True:
        if interactive and stream is sys.stdin:
            try:
                line = input("you> ")
            except EOFError:
                print(file=out)
                return
        else:
            line = stream.readline()
            if not line:
                return
            line = line.rstrip("\n")
            print(f"you> {line}", file=out, flush=True)
        yield line


def converse(session: ChatSession, lines, out: TextIO, notes: TextIO) -> None:
    """The session loop: commands, or a message answered after `assistant> `; ends at /exit or the end of the lines."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            if text == "/exit":
                return
            if text == "/reset":
                session.reset()
                print("(new conversation)", file=notes, flush=True)
            else:
                known = "; ".join(f"{name}: {what}" for name, what in COMMANDS.items())
                print(f"({known})" if text == "/help" else f"(unknown command {text}; {known})", file=notes, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        session.ask(line, out, notes)


# ----------------------------------------------------------------------------- the model
def chat_device(accelerator: object):
    """CPU, or the first CUDA GPU, as `trainer.accelerator` asks; a one-line error for anything else."""
    import torch

    name = str(accelerator).lower()
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if name == "auto":
            return torch.device("cpu")
        raise UserError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible; chat on the CPU with --trainer.accelerator cpu")
    raise UserError(f"trainer.accelerator={accelerator}: chat runs on the CPU or one CUDA GPU; use --trainer.accelerator cpu or gpu")


def load_module(model_options: dict, device):
    """`LIMALoRAModule` loaded as `predict` loads it (its configure_model: base, adapter or merge, eval mode) onto `device`.

    Lightning's Trainer is only the module's view of the device and the stage here: nothing is fitted or launched.
    """
    import logging
    import warnings

    import lightning as L
    from lightning.pytorch.trainer.states import TrainerFn
    from transformers.utils import logging as transformers_logging

    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(**model_options)
    # Keep the terminal for the conversation: no "GPU available" lines, weight-loading bars, bitsandbytes' note
    # about an optional CPU kernel, or library deprecation warnings. Errors still show.
    quieted = {name: logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "bitsandbytes")}
    levels = {name: logger.level for name, logger in quieted.items()}
    for logger in quieted.values():
        logger.setLevel(logging.ERROR)
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            trainer = L.Trainer(
                accelerator="cuda" if device.type == "cuda" else "cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.state.fn = TrainerFn.PREDICTING  # configure_model loads as for predict (adapter frozen, or merged)
            module.trainer = trainer
            module.configure_model()
    finally:
        for name, logger in quieted.items():
            logger.setLevel(levels[name])
        if bars_were_on:  # off already when stderr is not a terminal (console.setup)
            transformers_logging.enable_progress_bar()
    module.model.eval()
    return module.to(device)


class Streamer:
    """Writes an answer to `out` as its tokens are generated (transformers' streamer protocol: `put`, `end`).

    Each step decodes the answer's tokens so far, as predict decodes the finished answer, and writes what is new. A
    trailing run of byte tokens (`<0xE2>`: Llama spells rare characters byte by byte) waits for the token after it:
    until the run ends, its bytes may still become one character, or U+FFFD each.
    """

    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] | None = None  # None until the prompt, which generate puts first, has gone by
        self.written = ""

    def put(self, value) -> None:
        if self.ids is None:
            self.ids = []
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i != self.tokenizer.eos_token_id]
        tokens = self.tokenizer.convert_ids_to_tokens(self.ids)
        settled = len(tokens)
        while settled and BYTE_TOKEN.fullmatch(tokens[settled - 1]):
            settled -= 1
        self._write(self.tokenizer.decode(self.ids[:settled], skip_special_tokens=True))

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids or [], skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text.startswith(self.written):  # more settled tokens only append to the text
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text


def module_generator(module):
    """`generate(ids, out)` for `ChatSession`: one prompt through predict's `generate`, streamed to `out` if given."""
    import torch

    from lima_lightning.generation import generate

    def run(ids: list[int], out: TextIO | None) -> dict:
        input_ids = torch.tensor([ids], device=module.device)
        streamer = Streamer(module.tokenizer, out) if out is not None else None
        return generate(module.model, module.tokenizer, input_ids, torch.ones_like(input_ids), module.generation, streamer=streamer)[0]

    return run


def describe(model: dict, data, device) -> str:
    settings = model["generation"]
    sampling = f"sampling (temperature {settings['temperature']}, top_k {settings.get('top_k', 50)}, top_p {settings['top_p']})"
    decoding = "greedy" if not settings["do_sample"] else sampling
    adapter = f" + adapter {model['adapter_path']}" if model.get("adapter_path") else " (base model, no adapter)"
    return (
        f"chat: {model['base_model']}{adapter} on {device}; data.template={data.template}, {decoding}, "
        f"max_new_tokens {settings['max_new_tokens']}; /reset starts over, /exit or Ctrl-D ends"
    )


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args, fit_args = parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt: is empty; give the message to answer, e.g. --prompt 'What is 2 + 3?'")
    try:
        import torch

        from lima_lightning.cli import parse_fit_config  # quiet: no seed line, no warning that `args` differ

        config = parse_fit_config(fit_args)
        model_options = config.model.as_dict()
        device = chat_device(config.trainer.accelerator)
        module = load_module(model_options, device)
        if args.prompt is None:  # after loading: a mistake found while loading stays one line on stderr
            print(describe(model_options, config.data, device), file=stderr, flush=True)
        torch.manual_seed(module.generation.seed)
        session = ChatSession(
            module_generator(module),
            module.tokenizer,
            config.data.template,
            config.data.max_seq_length,
            module.generation.max_new_tokens,
            system=args.system,
        )
        if args.prompt is not None:
            session.ask(args.prompt, stdout, stderr)
        else:
            converse(session, read_lines(stdin, stdout), stdout, stderr)
    except KeyboardInterrupt:  # Ctrl-C ends the session, wherever it is: no traceback, exit status 0
        print(file=stdout, flush=True)
