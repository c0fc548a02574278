"""The Ollama Modelfile's TEMPLATE for every family: the pieces read off the run's chat format
write exactly what the Jinja template writes, system prompt placed the family's way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.families import FAMILIES, family_tokenizer
from tests.helpers import REQUIRE_TOOLS
from tunewise.deploy import ollama
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat

CHATS = [
    [{"role": "user", "content": "Package: vim"}],
    [{"role": "system", "content": "Answer with the section."}, {"role": "user", "content": "Package: vim"},
     {"role": "assistant", "content": "editors"}, {"role": "user", "content": "Package: gcc"}],
]


@pytest.mark.parametrize("template", [True, False], ids=["own-template", "base-model-default"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_template_pieces_reproduce_the_chat_template(name, template, tokenizer):
    chat = ChatFormat.build(family_tokenizer(name, tokenizer, template=template), model=name)
    pieces = ollama.pieces(chat, add_bos=False)
    for messages in CHATS:  # Ollama sends the system prompt as its own message: unfolded
        assert ollama.render_like_ollama(pieces, messages) == chat.prompt(messages)
    text = ollama.modelfile(chat, "m.gguf", add_bos=False, system="Answer with the section.")
    assert f'PARAMETER stop "{chat.end_of_turn[0]}"' in text
    assert text.count("PARAMETER stop") == len(set(chat.stop_ids)) + len(chat.stop_strings)
    assert 'SYSTEM """Answer with the section."""' in text and text.startswith("FROM ./m.gguf\n")


def test_bos_comes_off_where_llama_cpp_adds_it(tokenizer):
    chat = ChatFormat.build(family_tokenizer("gemma-3", tokenizer), model="gemma-3")
    assert chat.prompt(CHATS[0]).startswith("<bos>")
    pieces = ollama.pieces(chat, add_bos=True)
    assert pieces.begin["user"] == "<start_of_turn>user\n" and "<bos>" not in ollama.go_template(pieces)
    assert "<bos>" + ollama.render_like_ollama(pieces, CHATS[1]) == chat.prompt(CHATS[1])


def test_a_template_that_writes_turns_by_position_is_refused(tokenizer):
    tok = family_tokenizer("smollm2", tokenizer)
    numbered = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ loop.index }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = ChatFormat.build(tok, model="numbered", template=numbered)
    with pytest.raises(TunewiseError, match="by position"):
        ollama.modelfile(chat, "m.gguf", add_bos=False, system=None)


def test_go_template_escapes_quotes_and_newlines():
    pieces = ollama.Pieces(begin={"user": 'say "hi"\n', "system": "S\n"}, between={"system>user": "\n\n",
                           "user>assistant": "\nA: ", "assistant>user": "\nU: "}, tail="\nA: ", fold_system=False)
    text = ollama.go_template(pieces)
    assert '{{ "say \\"hi\\"\\n" }}' in text and "\n\n" not in text.split("range")[1].split("{{ .Content }}")[0]


# --- the TEMPLATE executed by Go's text/template, as Ollama executes it ----------------------------

GO_PROGRAM = Path(__file__).parents[1] / "fixtures" / "gotemplate" / "main.go"


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """A function rendering [(template, messages)] with Go's text/template (the Go toolchain is the
    Debian package golang-go: `make gotemplate`)."""
    go = shutil.which("go")
    if go is None:
        if REQUIRE_TOOLS:  # make test installs it: missing there is a failure, not a skip
            pytest.fail("Go is not installed: make gotemplate (Debian golang-go)")
        pytest.skip("Go is not installed: make gotemplate")
    folder = tmp_path_factory.mktemp("go")
    binary = folder / "render"
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "build", "-o", str(binary), str(GO_PROGRAM)], check=True, env=env, capture_output=True)

    def render(cases: list[tuple[str, list[dict]]]) -> list[str]:
        payload = json.dumps([{"template": t, "messages": m} for t, m in cases])
        done = subprocess.run([str(binary)], input=payload, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


def template_of(modelfile: str) -> str:
    return modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def test_go_executes_every_familys_template_into_the_trained_prompt(go_render, tokenizer):
    cases, wanted = [], []
    for name in FAMILIES:
        for template in (True, False):
            chat = ChatFormat.build(family_tokenizer(name, tokenizer, template=template), model=name)
            for add_bos in (False, True):
                text = template_of(ollama.modelfile(chat, "m.gguf", add_bos=add_bos, system=CHATS[1][0]["content"]))
                bos = chat.tokenizer.bos_token or ""
                for messages in CHATS:  # Ollama sends SYSTEM as the first message
                    want = chat.prompt(messages)
                    cases.append((text, messages))
                    wanted.append(want[len(bos):] if add_bos and bos and want.startswith(bos) else want)
    assert go_render(cases) == wanted
