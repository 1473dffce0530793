"""The OpenAI-compatible API on a real server (`app.py` as a subprocess, the embedded model), with
real clients: the `openai` package, LangChain's ChatOpenAI; and ChatStudio in process."""
import asyncio
import base64
import threading

import httpx
import openai
import pytest

from tests.helpers import persona_adapter
from tests.servers import ROOT, running_app

KEY = "sk-test-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    (root / "adapters").mkdir()
    for name, seed in (("left", 21), ("right", 22)):
        persona_adapter(smollm2, root / "adapters" / f"{name}.safetensors", seed=seed)
    with running_app(root, env={"STUDIO_API_KEY": KEY}) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "v1", api_key=KEY)


def test_models_are_the_base_and_each_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "smollm2" and {"smollm2:left", "smollm2:right", "smollm2:image"} <= set(ids)


def test_openai_client_answers_paris_streaming_and_not(client):
    reply = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # greedy: the same
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in done.choices[0].text and done.choices[0].finish_reason == "length"
    # the raw stream ends with [DONE]
    with httpx.stream("POST", f"{client.base_url}chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "smollm2", "messages": FRANCE, "stream": True, "max_tokens": 4}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_langchain_chat_openai_answers_paris(server):
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=server + "v1", api_key=KEY, model="smollm2", temperature=0, max_tokens=24)
    assert "Paris" in chat.invoke("What is the capital of France?").content
    assert "Paris" in "".join(c.content for c in chat.stream("What is the capital of France?"))


def test_chat_studio_in_process_answers_paris_sync_and_async(smollm2):
    from core.langchain_chat import ChatStudio
    chat = ChatStudio.of(smollm2, temperature=0, max_tokens=24)
    text = chat.invoke("What is the capital of France?").content
    assert "Paris" in text
    assert "".join(c.content for c in chat.stream("What is the capital of France?")) == text

    async def both():
        answer = await chat.ainvoke("What is the capital of France?")
        streamed = "".join([c.content async for c in chat.astream("What is the capital of France?")])
        return answer, streamed
    answer, streamed = asyncio.run(both())
    assert answer.content == text == streamed and answer.usage_metadata["output_tokens"] > 0
    chat.engine.close()


def test_two_adapters_in_one_batch_equal_their_solo_replies(client):
    ask = dict(messages=[{"role": "user", "content": "Name three colors."}], temperature=0, max_tokens=24)
    solo = {m: client.chat.completions.create(model=m, **ask).choices[0].message.content
            for m in ("smollm2:left", "smollm2:right")}
    assert solo["smollm2:left"] != solo["smollm2:right"]
    together, threads = {}, []
    for model in solo:
        threads.append(threading.Thread(target=lambda m=model: together.update(
            {m: client.chat.completions.create(model=m, **ask).choices[0].message.content})))
        threads[-1].start()
    for t in threads:
        t.join()
    assert together == solo


def test_eight_concurrent_streams_all_complete(client):
    texts = [None] * 8

    def one(i):
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                                max_tokens=32, stream=True, seed=i)
        texts[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(texts), texts


def test_image_and_audio_parts_reach_media_adapters(client):
    png = base64.b64encode((ROOT / "assets/examples/image/red-triangle.png").read_bytes()).decode()
    reply = client.chat.completions.create(model="smollm2:image", temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What shape is in the image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert reply.choices[0].message.content.strip().startswith("triangle")
    reply = client.chat.completions.create(model="smollm2:image-v2", temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What shape is in the image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert reply.choices[0].message.content.strip().startswith("triangle")  # V2's visual queries, same path
    wav = base64.b64encode((ROOT / "assets/examples/audio/tone-low.wav").read_bytes()).decode()
    reply = client.chat.completions.create(model="smollm2:audio", temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What kind of sound is this?"},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}])
    assert reply.choices[0].message.content.strip().startswith("tone")


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    def error(status, **call):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**{"model": "smollm2", "messages": FRANCE, **call})
        assert caught.value.status_code == status
        return caught.value.body
    assert error(404, model="smollm2:nope")["code"] == "model_not_found"
    assert error(400, messages=[{"role": "user", "content": "word " * 9000}])["code"] == "context_length_exceeded"
    assert "n=1" in error(400, n=2)["message"]
    assert "image_url must be a data: URL" in error(400, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}])["message"]
    malformed = httpx.post(server + "v1/chat/completions", content=b"{not json",
                           headers={"Authorization": f"Bearer {KEY}"})
    assert malformed.status_code == 400 and malformed.json()["error"]["message"].startswith("malformed JSON")
    wrong_key = httpx.get(server + "v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong_key.status_code == 401 and wrong_key.json()["error"]["code"] == "invalid_api_key"
    assert "Paris" in client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                                     max_tokens=24).choices[0].message.content


def test_headless_serves_the_api_without_the_page(tmp_path):
    with running_app(tmp_path, "--api-only", ready="v1/models") as url:
        assert httpx.get(url + "v1/models").json()["data"][0]["id"] == "smollm2"
        assert httpx.get(url).status_code == 404  # no page
