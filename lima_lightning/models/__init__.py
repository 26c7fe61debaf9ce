"""Models: the built-in tiny Llama, and loading of bases, tokenizers and LoRA adapters."""
