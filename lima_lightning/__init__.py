"""lima-lightning: instruction-tune Llama-2 on LIMA with QLoRA or LoRA, with PyTorch Lightning."""

__version__ = "0.1.0"
