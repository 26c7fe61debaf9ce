"""Chat templates (`data.template`): how a conversation is laid out as text segments around BOS and EOS ids.

A text template turns a conversation into `Segment`s: a text that is tokenized on its own, whether it is
trained, and whether a BOS id goes before it and an EOS id after it. Answers are segments of their own, so
the boundary between trained and untrained ids is exact (see `tokenization.py`). Every turn is stripped of
surrounding whitespace. Templates:

- `llama2-chat` (default): Meta's Llama-2 chat format, per exchange `<s>[INST] user [/INST] answer</s>`; a
  system prompt goes in `<<SYS>>` inside the first `[INST]`.
- `lima`: the LIMA paper's plain style (`lima_segments`).
- `tokenizer`: the base tokenizer's own `chat_template`, rendered by `tokenizer.apply_chat_template`; it has
  no text segments here: `tokenization.py` derives its ids and mask from renderings of prefix conversations.

`CHAT_TEMPLATES` holds, for each text template, a Jinja `chat_template` for Hugging Face tokenizers that
renders exactly the same ids (`lima-lightning export` writes it into the exported tokenizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lima_lightning.data.conversations import Conversation

TemplateName = Literal["llama2-chat", "lima", "tokenizer"]


@dataclass(frozen=True)
class Segment:
    """A text tokenized on its own (`add_special_tokens=False`), with a BOS id before it and an EOS id after it."""

    text: str
    trained: bool
    bos: bool = False
    eos: bool = False


def llama2_chat_prompt(user: str, system: str | None = None) -> str:
    """Meta's Llama-2 chat format: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]`.

    BOS before and EOS after the assistant turn are added as token ids, never as text.
    """
    if system:
        return f"[INST] <<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user.strip()} [/INST]"
    return f"[INST] {user.strip()} [/INST]"


def llama2_chat_segments(conversation: Conversation) -> Iterator[Segment]:
    """`[BOS] [INST] user [/INST]` (not trained), then `answer [EOS]` (trained), per exchange."""
    turns = conversation.turns
    for i in range(0, len(turns), 2):
        yield Segment(llama2_chat_prompt(turns[i], conversation.system if i == 0 else None), trained=False, bos=True)
        if i + 1 < len(turns):
            yield Segment(turns[i + 1].strip(), trained=True, eos=True)


def lima_segments(conversation: Conversation) -> Iterator[Segment]:
    """The LIMA paper's format: the utterances one after another, each ended by an end-of-turn token.

    Zhou et al. 2023 (LIMA, section 3) add no role markers: "To differentiate between each speaker (user and
    assistant), we introduce a special end-of-turn token (EOT) at the end of each utterance; this token plays the
    same role as EOS of halting generation". We keep that layout and use Llama-2's own `</s>` as the EOT rather than
    a new token (a new token's embedding would be untrained and would have to be saved with every adapter):

        <s> user_1 </s> answer_1 </s> user_2 </s> answer_2 </s>

    one BOS at the start; each answer and the EOS after it are trained, a user turn and its EOS are not. The paper
    has no system prompt; a system prompt here is written before the first user turn, separated by a blank line,
    inside the same utterance.
    """
    turns = conversation.turns
    for i, text in enumerate(turns):
        if i == 0 and conversation.system:
            text = f"{conversation.system.strip()}\n\n{text.strip()}"
        yield Segment(text.strip(), trained=i % 2 == 1, bos=i == 0, eos=True)


TEXT_TEMPLATES = {"llama2-chat": llama2_chat_segments, "lima": lima_segments}

# Jinja chat templates rendering the segments above as one string. With a Llama-2 tokenizer (`legacy: false`), text
# that follows a special token gets no word-boundary prefix of its own, so a space is written after each <s> and
# </s> where the segment's separate tokenization starts with one ("▁[INST]", "▁answer"). `add_generation_prompt`
# adds nothing: the prompt ends where the answer starts. Verified on every LIMA conversation by tests/test_templates.py,
# and on sample conversations by `tokenization.set_chat_template` before an export writes one.
LLAMA2_CHAT_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'].strip() -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('llama2-chat: roles must be an optional system first, then user and assistant alternating') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' and loop.first and system -%}"
    "{{ bos_token + ' [INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'].strip() + ' [/INST]' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ bos_token + ' [INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + message['content'].strip() + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
LIMA_JINJA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'].strip() -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('lima: roles must be an optional system first, then user and assistant alternating') }}"
    "{%- endif -%}"
    "{%- if loop.first and ns.system -%}"
    "{{ ' ' + ns.system + '\\n\\n' + message['content'].strip() + eos_token }}"
    "{%- else -%}"
    "{{ ' ' + message['content'].strip() + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
CHAT_TEMPLATES = {"llama2-chat": LLAMA2_CHAT_JINJA, "lima": LIMA_JINJA}
