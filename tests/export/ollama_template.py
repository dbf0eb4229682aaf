"""What Ollama makes of a Modelfile, for the tests: its prompt for a chat request, from the
Modelfile's TEMPLATE / SYSTEM, by Ollama's rules. Ollama itself (a Go server) cannot run here.

The rules, from Ollama's server (routes.go ChatHandler, template.go Execute / collate):
- a Modelfile SYSTEM is put in front of the messages as a system message when the request has none;
- `.System` is the request's system messages joined by "\\n\\n"; `.Messages` keeps every message
  (system ones included) with `.Role` / `.Content`;
- the prompt is tokenized with the GGUF's `add_bos_token`, so the BOS is Ollama's to add.

Only the Go-template subset `toolkit.export.modelfile.go_template` writes is understood:
text, `{{ .Field }}`, `{{ if X }}`, `{{ else if X }}`, `{{ else }}`, `{{ end }}`, `{{ range .Messages }}`,
with X a field or `eq .Field "literal"`. Anything else is an error, never a guess.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _parse(template: str):
    pos, root = 0, []
    stack = [("root", root)]  # (kind, node list being filled)
    for m in _ACTION.finditer(template):
        if m.group(1) or m.group(3):
            raise ValueError("trim markers are not in the subset")
        stack[-1][1].append(("text", template[pos:m.start()]))
        pos = m.end()
        act = m.group(2)
        if act.startswith("if "):
            node = {"branches": [(act[3:], [])], "else": None}
            stack[-1][1].append(("if", node))
            stack.append(("if", node["branches"][0][1], node))
        elif act.startswith("else if "):
            node = stack[-1][2]
            node["branches"].append((act[8:], []))
            stack[-1] = ("if", node["branches"][-1][1], node)
        elif act == "else":
            node = stack[-1][2]
            node["else"] = []
            stack[-1] = ("if", node["else"], node)
        elif act.startswith("range "):
            body = []
            stack[-1][1].append(("range", (act[6:], body)))
            stack.append(("range", body))
        elif act == "end":
            stack.pop()
        elif re.fullmatch(r"\.\w+", act):
            stack[-1][1].append(("field", act[1:]))
        else:
            raise ValueError(f"action {act!r} is not in the subset")
    if len(stack) != 1:
        raise ValueError("unclosed block")
    root.append(("text", template[pos:]))
    return root


def _cond(expr: str, dot: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "([^"]*)"', expr)
    if m:
        return dot[m.group(1)] == m.group(2)
    if re.fullmatch(r"\.\w+", expr):
        return bool(dot[expr[1:]])
    raise ValueError(f"condition {expr!r} is not in the subset")


def _run(nodes, dot: dict, out: list[str]) -> None:
    for kind, val in nodes:
        if kind == "text":
            out.append(val)
        elif kind == "field":
            out.append(str(dot[val]))
        elif kind == "if":
            for expr, body in val["branches"]:
                if _cond(expr, dot):
                    _run(body, dot, out)
                    break
            else:
                if val["else"] is not None:
                    _run(val["else"], dot, out)
        elif kind == "range":
            field, body = val
            for item in dot[field.lstrip(".")]:
                _run(body, item, out)


def modelfile_parts(modelfile: str) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM or None) of a Modelfile's text."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    if template is None:
        raise ValueError("the Modelfile has no TEMPLATE")
    return template.group(1), system.group(1) if system else None


def ollama_prompt(modelfile: str, messages: list[dict], bos: str | None) -> str:
    """The text Ollama's tokenizer sees for a chat request, with the BOS it adds (`bos`, or None
    when the GGUF does not add one) written in front."""
    template, default_system = modelfile_parts(modelfile)
    msgs = list(messages)
    if default_system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": default_system})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    dot = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]}
    out: list[str] = []
    _run(_parse(template), dot, out)
    return (bos or "") + "".join(out)
