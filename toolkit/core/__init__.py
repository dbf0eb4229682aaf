"""Core: what every capability stands on; nothing here imports another capability.
`errors` (UserError: one line, exit 2), `hardware` (device, dtype, memory), `models` (the one
model-spec resolver, loading), `chat_tokens` (end-of-turn/pad rule), `progress` (stderr), `units`.
"""
