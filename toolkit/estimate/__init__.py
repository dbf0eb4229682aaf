"""Estimate: the memory a model needs for a task on a machine, and which model to pick (no torch).
`catalog` (architecture facts), `formulas` (pure, sourced terms), `planner` (`estimate`), `pick` (by memory and time),
`budget` (--vram / --gpu / detected), `gguf_header` and `llamacpp_report` (exact llama.cpp sizes).
"""
