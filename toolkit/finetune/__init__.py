"""Fine-tune: a recipe in, a run folder out (adapter, run.json, metrics, report).
`recipe` (the one recipe reader), `data` (formats -> tokens + loss masks), `plan` (recipe -> planner
inputs), `base_model`, `trainer` (TRL + PEFT + bitsandbytes; Unsloth), `callbacks`, `trl_compat`, `report`.
"""
