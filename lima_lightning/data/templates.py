"""Chat templates: how a user turn (and the system prompt) is written around the text.

A template renders only the *prompt* side of a turn; the assistant text follows as its own
segment so that the label mask boundary is exact (see `tokenization.py`).
"""

from __future__ import annotations

from typing import Literal

TemplateName = Literal["llama2-chat"]


def llama2_chat_prompt(user: str, system: str | None = None) -> str:
    """Meta's Llama-2 chat format: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]`.

    BOS before and EOS after the assistant turn are added as token ids, never as text.
    """
    if system:
        return f"[INST] <<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user.strip()} [/INST]"
    return f"[INST] {user.strip()} [/INST]"


TEMPLATES = {"llama2-chat": llama2_chat_prompt}
