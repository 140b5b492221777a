"""An Ollama ``Modelfile`` for a GGUF artifact (Ollama's Modelfile reference: ``FROM``, ``TEMPLATE`` as a Go template
over ``.Messages``/``.Role``/``.Content``, ``PARAMETER stop``, ``PARAMETER num_ctx``), with the model's Jinja chat
template converted to Go where the conversion reproduces a rendered conversation exactly.

Written by hand: no library converts Jinja chat templates to Ollama's Go templates.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELFILE = "Modelfile"


def write_modelfile(model_dir: Path, src: Path, tok, template: str | None, n_ctx: int,
                    gguf_file: str) -> dict:
    """An Ollama ``Modelfile`` beside the GGUF: ``FROM``, the chat template as a Go ``TEMPLATE`` where it
    converts exactly, stop tokens and ``num_ctx``. Returns what it wrote."""
    go = go_template(tok, template) if template else None
    stops = []
    for tid in _eos_ids(src, tok):
        text = tok.convert_ids_to_tokens(tid)
        if text and text not in stops:
            stops.append(text)
    lines = ["# Ollama Modelfile written by quantship: `ollama create NAME -f Modelfile` in this folder.",
             f"FROM ./{gguf_file}"]
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    elif template:
        lines.append("# The Jinja chat template (inside the GGUF as tokenizer.chat_template, and in "
                     "chat_template.jinja) did not convert to a Go template exactly; Ollama falls back to its own.")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {n_ctx}")
    (model_dir / MODELFILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"file": MODELFILE, "template": "go (converted, verified by rendering)" if go else None, "stop": stops}


def _eos_ids(src: Path, tok) -> list[int]:
    from pipeline.engines.base import serving_files

    eos = serving_files(src)["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return eos or ([tok.eos_token_id] if tok.eos_token_id is not None else [])


_ROLES = ("system", "user", "assistant")


def go_template(tok, template: str) -> str | None:
    """The Jinja chat template as an Ollama Go template, or None when it is not a per-message template.

    Found by probing, not parsing: the template is rendered with marker contents, the text before the messages,
    each role's segment and the generation prompt are cut out, and the Go template rebuilt from them is
    accepted only if it reproduces a four-message render exactly.
    """
    def render(msgs, gen):
        return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    mark = "\x02{}\x03".format
    try:
        one = render([{"role": "user", "content": mark(0)}], False)
        segs = {}
        for role in _ROLES:
            full = render([{"role": "user", "content": mark(0)}, {"role": role, "content": mark(1)}], False)
            if not full.startswith(one):
                return None
            segs[role] = full[len(one):]
        gen = render([{"role": "user", "content": mark(0)}], True)[len(one):]
        user0 = segs["user"].replace(mark(1), mark(0))
        if not one.endswith(user0):
            return None
        prefix = one[: len(one) - len(user0)]
        convo = [("system", 0), ("user", 1), ("assistant", 2), ("user", 3)]
        expect = render([{"role": r, "content": mark(i)} for r, i in convo], True)
    except Exception:  # a template that refuses these conversations (e.g. strict role order): no conversion
        return None
    rebuilt = prefix + "".join(segs[r].replace(mark(1), mark(i)) for r, i in convo) + gen
    literal = prefix + gen + "".join(segs.values())
    if rebuilt != expect or any(segs[r].count(mark(1)) != 1 for r in _ROLES) or "{{" in literal \
            or "}}" in literal or '"""' in literal or "\x02" in prefix + gen:
        return None
    body = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{segs[r].replace(mark(1), "{{ .Content }}")}'
                   for i, r in enumerate(_ROLES))
    return f"{prefix}{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{gen}"
