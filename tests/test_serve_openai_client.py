"""`synthtune serve` driven by the official `openai` client, as users drive it (issue #16).

One real `synthtune serve` process (tiny-llama, loopback, behind a key) serves the whole module. The
base model is served under a hub-style id with a slash, which the client percent-encodes in
``models.retrieve``. Every response is also validated against the client's own pydantic types
(the client builds its objects without validation, so a wrong field type would otherwise pass).

    PYTHONPATH=$PWD python -m pytest tests/test_serve_openai_client.py -q
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))
from server_helpers import KEY_ENV, http_json, start_servers  # noqa: E402

pytestmark = pytest.mark.integration  # spawns a synthtune serve process

KEY = "sk-openai-client-test-7f2e"
#: an id such as the hub's: the client sends it percent-encoded (/v1/models/acme%2Ftiny-llama)
NAME = "acme/tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "openai_client.log"
    (proc,) = start_servers([(log, ["--served-model-name", NAME, "--api-key-env", KEY_ENV])],
                            env={**os.environ, KEY_ENV: KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    # no retries: a failure shows at once, and a test never waits out a backoff
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def encode():
    """Text -> the token ids serve itself makes of a completions prompt (what lm-eval sends)."""
    from synthtune.formats import add_special_tokens
    from synthtune.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("tiny-llama"))
    return lambda text: tok(text, add_special_tokens=add_special_tokens("plain"))["input_ids"]


def test_models_list_and_retrieve(client, server):
    from openai.types import Model

    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    model = client.models.retrieve(NAME)
    assert Model.model_validate(model.model_dump()) == model
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "synthtune") and model.created > 0
    # clients that put the id in the path as it is (two segments) get the same object
    raw = client.models.with_raw_response.retrieve(NAME).http_response.json()
    assert http_json(f"{server.url}/models/{NAME}", key=KEY) == (200, raw) and raw["id"] == NAME
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("acme/no-such-model")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "acme/no-such-model" in err.value.message


def test_completions_with_text_and_token_id_prompts(client, encode):
    from openai.types import Completion

    texts = ["Problem: 2 + 3?\nAnswer:", "Tom has 4 apples and eats one."]
    raw = client.completions.with_raw_response.create(model=NAME, prompt=texts, max_tokens=6, temperature=0)
    by_text = Completion.model_validate(raw.http_response.json())
    assert [c.index for c in by_text.choices] == [0, 1]
    by_ids = client.completions.create(model=NAME, prompt=[encode(t) for t in texts], max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == sum(len(encode(t)) for t in texts)
    one = client.completions.create(model=NAME, prompt=encode(texts[0]), max_tokens=6, temperature=0)
    assert [c.text for c in one.choices] == [by_text.choices[0].text]
    # n > 1 with stop strings: every choice is cut before its stop string, and says which one
    out = client.completions.create(model=NAME, prompt=texts[0], n=4, max_tokens=12, temperature=1.0, seed=3,
                                    stop=["e", "\n"])
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert "e" not in c.text and "\n" not in c.text
        assert c.finish_reason in ("stop", "length")
    # no max_tokens: OpenAI's default of 16
    default = client.completions.create(model=NAME, prompt=encode(texts[0]), temperature=0)
    assert default.usage.completion_tokens <= 16
    assert default.choices[0].finish_reason == "stop" or default.usage.completion_tokens == 16


def test_chat_with_system_developer_and_user_messages(client):
    from openai.types.chat import ChatCompletion

    user = {"role": "user", "content": "Problem: 2 + 2?"}
    replies = []
    for first in ({"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Be brief."}):
        raw = client.chat.completions.with_raw_response.create(model=NAME, messages=[first, user], max_tokens=5,
                                                               temperature=0)
        reply = ChatCompletion.model_validate(raw.http_response.json())
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        replies.append(reply)
    system, developer = replies
    assert developer.choices[0].message.content == system.choices[0].message.content  # developer reads as system
    assert developer.usage == system.usage
    # max_completion_tokens, OpenAI's newer name, and a multi-turn conversation
    out = client.chat.completions.create(
        model=NAME, n=2, max_completion_tokens=3, temperature=1.0, seed=1,
        messages=[user, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}])
    assert len(out.choices) == 2 and out.usage.completion_tokens <= 6


def test_errors_come_back_as_the_clients_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=5)
    assert err.value.param == "temperature" and "temperature must be" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # a vLLM extension serve does not implement
        client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"repetition_penalty": 1.2})
    assert err.value.param == "repetition_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[1, 5000], max_tokens=2)
    assert err.value.param == "prompt" and "prompt[1] is 5000" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, max_tokens=2, messages=[
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"}])
    assert err.value.param == "messages" and "tools and function calling are not supported" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert err.value.code == "model_not_found"
    with openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0, timeout=30) as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert server.logged(r'"GET /v1/models/acme%2Ftiny-llama" 200')  # retrieve's id, percent-encoded
