"""What lets the served model run the same elsewhere: the exact llama-server command line the check
chose, and an Ollama Modelfile with the GGUF's own chat template, stop tokens and the sampling the
student was evaluated with."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from distill.errors import DistillError

SYSTEM, PROMPT = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def gguf_chat(gguf_path: Path) -> dict[str, Any]:
    """The chat template, BOS/EOS/end-of-turn token texts and add-BOS flag stored in the GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    if not template:
        raise DistillError(f"{gguf_path}: no tokenizer.chat_template in the GGUF; re-run `distill export --overwrite`")
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = field(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens.contents(int(index))

    return {
        "template": template,
        "bos": token("bos") or "",
        "eos": token("eos"),
        "eot": token("eot"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token")),
    }


def ollama_template(chat: dict[str, Any]) -> str:
    """Translate the Jinja chat template into Ollama's Go template by rendering it with placeholders:
    one single-turn prompt, with and without a system message (the shape the student was trained on)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat["template"])

    def render(messages: list[dict[str, str]]) -> str:
        text = jinja.render(messages=messages, add_generation_prompt=True, bos_token=chat["bos"], eos_token=chat["eos"])
        # llama.cpp and Ollama add BOS themselves when the GGUF says so: it must not appear twice.
        if chat["add_bos"] and chat["bos"] and text.startswith(chat["bos"]):
            text = text[len(chat["bos"]) :]
        return text.replace(SYSTEM, "{{ .System }}").replace(PROMPT, "{{ .Prompt }}")

    with_system = render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}])
    plain = render([{"role": "user", "content": PROMPT}])
    if "{{ .Prompt }}" not in plain:
        raise DistillError("export: the chat template drops the user's message; cannot write an Ollama Modelfile")
    if "{{ .System }}" not in with_system:
        return plain
    return "{{ if .System }}" + with_system + "{{ else }}" + plain + "{{ end }}"


def modelfile(gguf_path: Path, folder: Path, sampling: dict[str, Any]) -> str:
    """An Ollama Modelfile beside `folder`, pointing at the GGUF by a relative path."""
    chat = gguf_chat(gguf_path)
    lines = [
        "# Ollama Modelfile written by `distill serve`: the GGUF's chat template and stop tokens, and the",
        "# sampling the student was evaluated with.  ollama create student -f Modelfile",
        f"FROM {os.path.relpath(gguf_path, folder)}",
        f'TEMPLATE """{ollama_template(chat)}"""',
    ]
    for stop in dict.fromkeys(t for t in (chat["eot"], chat["eos"]) if t):
        lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER {key} {value}" for key, value in sampling.items()]
    return "\n".join(lines) + "\n"


def launch_script(command: list[str], model: Path, folder: Path, note: str) -> str:
    """The chosen command line as a shell script: the model by a path relative to the script, the
    binary and port overridable (LLAMA_SERVER, PORT)."""
    args = list(command)
    args[0] = '"${LLAMA_SERVER:-llama-server}"'
    args[args.index("--model") + 1] = '"$here/' + os.path.relpath(model, folder) + '"'
    args[args.index("--port") + 1] = '"${PORT:-8080}"'
    lines: list[str] = []
    for arg in args:
        word = arg if arg.startswith('"') else shlex.quote(arg)
        if lines and not arg.startswith("-"):
            lines[-1] += " " + word  # an option's value stays on its line
        else:
            lines.append(word)
    body = " \\\n    ".join(lines)
    return f'#!/bin/sh\n# {note}\nhere="$(cd "$(dirname "$0")" && pwd)"\nexec {body}\n'
