"""`ChatStudio`: a LangChain chat model over a model loaded in this process, with an adapter or
none, served by the same continuous-batching engine as the app (core.serving).

    from core.loading import load_model
    from core.langchain_chat import ChatStudio
    chat = ChatStudio.of(load_model("smollm2"), temperature=0)
    chat.invoke("What is the capital of France?").content

It needs `langchain-core` (pip install langchain-core), which the rest of the studio does not: this
module is the only one that imports it. For a studio running elsewhere, LangChain's own
`ChatOpenAI(base_url="http://HOST:7860/v1", api_key=...)` talks to its OpenAI-compatible API.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from core.chat_format import render
from core.generation import model_sampling
from core.serving import ChatEngine, Reply, chat_setup

ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class ChatStudio(BaseChatModel):
    """Chat through `engine` (its model) and `adapter`; sampling defaults to the model's own."""
    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: ChatEngine
    adapter: Any = None  # core.adapter.Adapter, or None for the base model
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 256
    seed: int | None = None

    @classmethod
    def of(cls, lm, adapter=None, **options) -> "ChatStudio":
        """A chat model with an engine of its own for `lm` (core.loading.LoadedModel)."""
        return cls(engine=ChatEngine(lm), adapter=adapter, **options)

    @property
    def _llm_type(self) -> str:
        return "llama-adapter-studio"

    def _submit(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs) -> Reply:
        lm = self.engine.lm
        fmt, default_system, stops = chat_setup(lm, self.adapter)
        system, turns = None, []
        for m in messages:
            role = ROLES.get(m.type)
            if role is None:
                raise ValueError(f"message type {m.type!r}; accepted: system, human, ai")
            text = m.content if isinstance(m.content, str) else "".join(
                p.get("text", "") for p in m.content if isinstance(p, dict) and p.get("type") == "text")
            if role == "system":
                system = text
            else:
                turns.append({"role": role, "content": text})
        ids = lm.tokenizer.encode(render(fmt, turns, system if system is not None else default_system))
        asked = {k: kwargs.get(k, getattr(self, k)) for k in ("temperature", "top_p", "seed")}
        params = model_sampling(lm, **asked, max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                                stop=stops + (stop or []))
        return self.engine.submit(ids, params, adapter=self.adapter)

    @staticmethod
    def _last(reply: Reply) -> ChatGenerationChunk:
        """The closing chunk: no text, the counts and why it ended."""
        usage = {"input_tokens": len(reply.ids), "output_tokens": reply.tokens,
                 "total_tokens": len(reply.ids) + reply.tokens}
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage,
                                                          response_metadata={"finish_reason": reply.finish_reason}),
                                   generation_info={"finish_reason": reply.finish_reason})

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        reply = self._submit(messages, stop, **kwargs)
        for delta in reply:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last(reply)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        reply = self._submit(messages, stop, **kwargs)
        text = "".join(reply)
        last = self._last(reply).message
        return ChatResult(generations=[ChatGeneration(
            message=AIMessage(content=text, usage_metadata=last.usage_metadata, response_metadata=last.response_metadata),
            generation_info={"finish_reason": reply.finish_reason})])

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        reply = self._submit(messages, stop, **kwargs)
        deltas, done = iter(reply), object()
        while (delta := await asyncio.to_thread(next, deltas, done)) is not done:  # the engine's queue blocks
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last(reply)

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        text, last = "", None
        async for chunk in self._astream(messages, stop, run_manager, **kwargs):
            text += chunk.message.content
            last = chunk.message
        return ChatResult(generations=[ChatGeneration(
            message=AIMessage(content=text, usage_metadata=last.usage_metadata, response_metadata=last.response_metadata),
            generation_info=last.response_metadata)])
