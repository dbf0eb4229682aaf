"""Local LLM toolkit: estimate memory, QLoRA fine-tune, decode and chat, export to GGUF.

Importing this package is free of side effects and heavy imports; torch, transformers, gradio
and llama_cpp are imported inside the functions that need them.
"""

__version__ = "0.1.0"
