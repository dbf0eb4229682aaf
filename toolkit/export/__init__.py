"""Export: a run folder (or any HF model) to verified GGUF files for llama.cpp, Ollama and LM Studio.
`pipeline` (merge -> convert -> quantize -> verify -> publish), `convert` (llama.cpp's converter and
quantizer), `verify` + `verify_text` (metadata, round trip, chat turn), `modelfile`, `report`.
"""
