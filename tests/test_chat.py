"""`lima-lightning chat`: each turn feeds the model exactly the training ids of the conversation so far, the history
fits data.max_seq_length, /reset, /exit, end of input and Ctrl-C end cleanly; checked in-process and in real processes."""

from __future__ import annotations

import io
import os
import select
import signal
import time

import pytest

from lima_lightning.cli import parse_fit_config
from lima_lightning.commands import chat
from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, encode_prompt
from lima_lightning.errors import UserError
from tests.conftest import REPO
from tests.reliability_helpers import lima_subprocess
from tests.test_templates import ZEPHYR

DEMO = str(REPO / "configs" / "demo.yaml")
QUESTION = "What is 2 + 3?"
MAX_NEW_TOKENS = "8"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy CPU each op then waits for the others (25x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir):
    """An adapter directory as fit leaves it (PEFT format, tokenizer, the run's config.yaml); random, far from zero."""
    from tests.test_export import make_run

    return make_run(tmp_path_factory.mktemp("run"), tiny_dir, "none")


def chat_args(adapter, *extra: str) -> list[str]:
    return ["--config", DEMO, "--model.adapter_path", str(adapter), "--model.generation.max_new_tokens", MAX_NEW_TOKENS, *extra]


@pytest.fixture(scope="module")
def module(adapter):
    """The demo config's model with the adapter, loaded as chat loads it (greedy: the demo config)."""
    config = parse_fit_config(chat_args(adapter))
    return chat.load_module(config.model.as_dict(), chat.chat_device(config.trainer.accelerator))


class Recorder:
    """`generate` for a ChatSession: the module's own, recording the ids each turn feeds the model and its result."""

    def __init__(self, module) -> None:
        self.generate = chat.module_generator(module)
        self.calls: list[tuple[list[int], dict]] = []

    def __call__(self, ids: list[int], out) -> dict:
        result = self.generate(ids, out)
        self.calls.append((list(ids), result))
        return result


def answer_start(example: dict) -> int:
    """Where the last answer starts: the first position of the last run of trained positions."""
    trained = [label != IGNORE_INDEX for label in example["labels"]]
    end = len(trained) - trained[::-1].index(True)
    return end - trained[:end][::-1].index(False)


@pytest.mark.parametrize("template, system", [("llama2-chat", None), ("llama2-chat", "Be brief."), ("lima", None), ("tokenizer", "S")])
def test_turn_k_feeds_the_training_ids_of_the_k_turn_conversation(template, system, module):
    """At turn k the model gets the ids training has for the conversation so far (earlier questions, the answers the
    model gave, this question, this answer) up to where this answer starts; /reset starts over, /exit stops reading."""
    tokenizer = module.tokenizer
    before = tokenizer.chat_template
    tokenizer.chat_template = ZEPHYR  # data.template=tokenizer: the tiny tokenizer has no chat_template of its own
    try:
        recorder = Recorder(module)
        session = chat.ChatSession(recorder, tokenizer, template, max_seq_length=4096, max_new_tokens=8, system=system)
        out = io.StringIO()
        lines = [QUESTION, "And 4 + 4?", "  and 1 + 1?  ", "/reset", "Hi", "Again?", "/exit", "never read"]
        chat.converse(session, iter(lines), out, io.StringIO())
        calls, history = iter(recorder.calls), []
        for line in lines[: lines.index("/exit")]:
            if line == "/reset":
                history = []
                continue
            fed, result = next(calls)
            example = encode_conversation(Conversation((*history, line, result["response"]), system), tokenizer, template)
            assert fed == example["input_ids"][: answer_start(example)], (template, line)
            assert f"assistant> {result['response']}\n" in out.getvalue()  # streamed as generated, the same text
            history += [line, result["response"]]
        assert next(calls, None) is None and len(recorder.calls) == 5  # nothing after /exit
    finally:
        tokenizer.chat_template = before


def test_history_drops_the_oldest_exchanges_to_fit_max_seq_length(tiny_tokenizer):
    """Each prompt plus max_new_tokens fits data.max_seq_length with as few of the oldest exchanges dropped as that
    needs (one more would not fit), the rest fed as training encodes it; what is dropped is said."""
    tok, fed = tiny_tokenizer, []

    def generate(ids, out):
        fed.append(ids)
        return {"response": "An answer of some length.", "finish_reason": "eos", "new_tokens": 26}

    max_seq_length, max_new_tokens = 200, 60
    session = chat.ChatSession(generate, tok, "llama2-chat", max_seq_length, max_new_tokens)
    notes, everything = io.StringIO(), []  # everything: the whole conversation, nothing dropped
    for i in range(6):
        question = f"Question number {i}?"
        session.ask(question, None, notes)
        kept = len(session.turns) // 2 - 1  # earlier exchanges the prompt was built from
        assert fed[-1] == encode_prompt(Conversation((*session.turns[:-2], question)), tok)
        assert len(fed[-1]) <= max_seq_length - max_new_tokens
        if kept < len(everything) // 2:  # something was dropped: one exchange more would not have fitted
            one_more = Conversation((*everything[-2 * kept - 2 :], question))
            assert len(encode_prompt(one_more, tok)) > max_seq_length - max_new_tokens
        everything += [question, "An answer of some length."]
    assert len(session.turns) < len(everything)
    assert (
        "(dropped the oldest 1 exchange of the conversation: the prompt plus max_new_tokens=60 must fit data.max_seq_length=200)"
        in notes.getvalue()
    )
    session.reset()
    session.ask("x" * 300, None, notes)  # too long alone: answered anyway, and said
    assert "this prompt is" in notes.getvalue() and "answering anyway" in notes.getvalue() and len(fed[-1]) > 140


def test_commands_and_the_end_of_input(tiny_tokenizer):
    asked = []

    def generate(ids, out):
        asked.append(ids)
        return {"response": "ok", "finish_reason": "length", "new_tokens": 8}

    session = chat.ChatSession(generate, tiny_tokenizer, "llama2-chat", 256, 8)
    out, notes = io.StringIO(), io.StringIO()
    chat.converse(session, chat.read_lines(io.StringIO("\n/help\n/nope\n/etc is a folder?\n"), out), out, notes)
    assert len(asked) == 1 and session.turns == ["/etc is a folder?", "ok"]  # a line with a space is a message
    assert "(/reset: start a new conversation; /exit: end the session; /help: list these commands)" in notes.getvalue()
    assert "(unknown command /nope;" in notes.getvalue() and "(stopped after max_new_tokens=8 tokens, before EOS)" in notes.getvalue()
    assert out.getvalue().splitlines()[:3] == ["you> ", "you> /help", "you> /nope"]


def test_main_in_process_ends_at_end_of_input_exit_and_ctrl_c(adapter):
    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    out, err = io.StringIO(), io.StringIO()
    assert chat.main(chat_args(adapter), stdin=io.StringIO(f"{QUESTION}\n"), stdout=out, stderr=err) is None  # end of input
    assert out.getvalue().startswith(f"you> {QUESTION}\nassistant> ") and err.getvalue().startswith("chat: ")
    out = io.StringIO()
    chat.main(chat_args(adapter), stdin=io.StringIO(f"/exit\n{QUESTION}\n"), stdout=out, stderr=io.StringIO())
    assert out.getvalue() == "you> /exit\n"
    out = io.StringIO()
    try:
        chat.main(chat_args(adapter), stdin=CtrlC(), stdout=out, stderr=io.StringIO())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped chat.main")
    assert out.getvalue() == "\n"


def test_bad_device_or_prompt_is_one_line(monkeypatch, adapter):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert chat.chat_device("auto").type == chat.chat_device("cpu").type == "cpu"
    with pytest.raises(
        UserError, match=r"^trainer.accelerator=gpu: no CUDA GPU is visible; chat on the CPU with --trainer.accelerator cpu$"
    ):
        chat.chat_device("gpu")
    with pytest.raises(UserError, match=r"^trainer.accelerator=mps: chat runs on the CPU or one CUDA GPU"):
        chat.chat_device("mps")
    with pytest.raises(UserError, match=r"^--prompt: is empty"):
        chat.main([*chat_args(adapter), "--prompt", " "])


def read_until(process, text: str, timeout: float = 120) -> str:
    """What the process wrote to stdout until it contains `text` (the pipe is read raw, without waiting for EOF)."""
    seen, deadline = "", time.monotonic() + timeout
    fd = process.stdout.fileno()
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 4096).decode()
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.slow  # two real processes, each ~10 s of CPU importing torch, Lightning, transformers and bitsandbytes
def test_chat_through_real_processes(adapter, module):
    """`python -m lima_lightning chat` fed on stdin, /reset, then Ctrl-C while it waits for the next line; and `--prompt`
    once. Exit status 0, no traceback. The answers are the in-process module's greedy answer to the training ids of the
    question: the process feeds what training would, and after /reset the same ids again."""
    import torch

    ids = torch.tensor([encode_prompt(Conversation((QUESTION,)), module.tokenizer)])
    expected = module.generate(ids, torch.ones_like(ids))[0]["response"]
    args, env = ["chat", *chat_args(adapter)], {"OMP_NUM_THREADS": "1"}  # see one_thread
    session = lima_subprocess(*args, stdin=-1, bufsize=0, env=env)  # -1: subprocess.PIPE
    once = lima_subprocess(*args, "--prompt", QUESTION, env=env)
    session.stdin.write(f"{QUESTION}\n/reset\n{QUESTION}\n")
    transcript = f"you> {QUESTION}\nassistant> {expected}\nyou> /reset\nyou> {QUESTION}\nassistant> {expected}\n"
    seen = read_until(session, transcript)
    session.send_signal(signal.SIGINT)  # waiting for the next line, as a person pressing Ctrl-C would
    rest, session_err = session.communicate(timeout=60)
    once_out, once_err = once.communicate(timeout=300)

    assert seen == transcript and rest == "\n" and session.returncode == 0, session_err[-2000:]
    assert session_err.startswith("chat: tiny + adapter ") and "(new conversation)" in session_err
    assert once.returncode == 0 and once_out == f"{expected}\n", once_err[-2000:]
    for err in (session_err, once_err):
        assert "Traceback" not in err and "Error" not in err, err
