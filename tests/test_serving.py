"""The serving engine's continuous batching, on tiny random models (math and bookkeeping): rows
joining and leaving mid-batch, chunked prefill, an adapter and a condition per row in one
forward, the KV budget's line; then greedy batched replies on the real embedded model."""
import os
import threading
import time

import pytest
import torch

from core.errors import UserError
from core.generation import Generator, RepeatGuard, SamplingParams, model_sampling
from core.loading import load_model
from core.multimodal import conditioned
from core.runner import Row, Runner, SlotCache
from core.serving import ChatEngine, beside_engine, release_openmp_workers
from tests.helpers import open_adapter
from tests.servers import ROOT


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), "float32", "cpu")


def prompts(n, seed=0, low=3, high=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 250, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def solo(lm, ids, new_tokens, adapter=None, condition=None):
    """One sequence alone through the plain generation path: the reference."""
    if adapter is not None:
        adapter.attach(lm.model)
    try:
        with conditioned(lm.model, condition):
            return Generator(lm.model, lm.tokenizer, set()).generate([ids], SamplingParams(max_new_tokens=new_tokens))[0]
    finally:
        if adapter is not None:
            adapter.detach()


def test_tiny_random_rows_joining_and_leaving_mid_batch_equal_their_solo_replies(tiny):
    engine = ChatEngine(tiny, prefill_chunk=16)
    engine.lm = type("LM", (), {"tokenizer": tiny.tokenizer, "stop_ids": set()})()  # no stop token: full lengths
    asks = list(zip(prompts(6, seed=1), [30, 5, 18, 40, 9, 25]))
    expected = [solo(tiny, ids, n) for ids, n in asks]
    first = [engine.submit(ids, SamplingParams(max_new_tokens=n)) for ids, n in asks[:3]]
    stream = iter(first[0])
    head = next(stream)  # the first rows are decoding...
    later = [engine.submit(ids, SamplingParams(max_new_tokens=n)) for ids, n in asks[3:]]  # ...when these join
    got = [head + "".join(stream)] + ["".join(r) for r in first[1:] + later]
    assert got == expected
    assert [r.tokens for r in first + later] == [n for _, n in asks]
    assert not engine.runner.rows and engine.runner.caches[0].k.numel() == 0  # all left; the cache is freed
    engine.close()


def test_tiny_random_chunked_prefill_equals_one_pass_while_a_row_keeps_decoding(tiny):
    runner, chunk = Runner(tiny.model), 8
    decoding, long = prompts(1, seed=2)[0], prompts(1, seed=3, low=50, high=51)[0]

    def prefill_all(row, ids, step):
        own = runner.start(len(ids) + 1)
        logits = None
        for start in range(0, len(ids), step):
            logits = runner.prefill(row, own, ids[start:start + step], start)
        row.length = len(ids)
        return own, logits

    a = Row(None, None)
    own, logits = prefill_all(a, decoding, chunk)
    runner.join(a, own)
    a_tokens = [int(logits.argmax())]
    b = Row(None, None)
    own_b = runner.start(len(long) + 1)
    for start in range(0, len(long), chunk):  # b's prompt in chunks, a decoding between them
        logits_b = runner.prefill(b, own_b, long[start:start + chunk], start)
        a_tokens.append(int(runner.decode([a_tokens[-1]])[0].argmax()))
    b.length = len(long)
    one_pass = Runner(tiny.model).prefill(Row(None, None), runner.start(len(long) + 1), long, 0)
    assert torch.allclose(logits_b, one_pass, atol=1e-5), (logits_b - one_pass).abs().max()
    assert len(a_tokens) == 1 + 7  # a got a token at every chunk of b's
    assert tiny.tokenizer.decode(a_tokens) == solo(tiny, decoding, len(a_tokens))
    runner.join(b, own_b)
    b_next = [int(logits_b.argmax())]
    for _ in range(5):
        b_next.append(int(runner.decode([a_tokens[-1], b_next[-1]])[1].argmax()))
        a_tokens.append(0)  # a's input does not matter to b
    assert tiny.tokenizer.decode(b_next) == solo(tiny, long, 6)


def test_tiny_random_each_row_has_its_own_adapter_and_condition_in_one_forward(tiny):
    dim = tiny.model.args.dim
    kinds = {
        "prompts": open_adapter(tiny, 1, prompt_len=4, layers=2),
        "prompts, other K and L": open_adapter(tiny, 2, prompt_len=7, layers=3),
        "V2 bias, scale, norms": open_adapter(tiny, 3, prompt_len=3, layers=2, bias_scale=True, norm_tuning=True,
                                              final_norm=True),
        "LoRA": open_adapter(tiny, 4, prompt_len=2, layers=1, lora_rank=4),
    }
    torch.manual_seed(5)
    rows = [(None, None), *((a, None) for a in kinds.values()),
            (kinds["prompts"], torch.randn(1, dim)), (kinds["prompts"], torch.randn(1, dim))]
    asks = prompts(len(rows), seed=6)
    expected = [solo(tiny, ids, 12, a, c) for ids, (a, c) in zip(asks, rows)]
    assert len(set(expected)) == len(expected)  # every adapter and condition changes the reply
    engine = ChatEngine(tiny)
    engine.lm = type("LM", (), {"tokenizer": tiny.tokenizer, "stop_ids": set()})()
    replies = [engine.submit(ids, SamplingParams(max_new_tokens=12), adapter=a, condition=c)
               for ids, (a, c) in zip(asks, rows)]
    assert ["".join(r) for r in replies] == expected
    assert getattr(tiny.model, "adapter", None) is None and tiny.model.layers[-1].attention.prompt is None
    engine.close()


def test_tiny_random_requests_over_the_kv_budget_wait_in_line_and_never_fitting_ones_are_refused(tiny):
    # one row of up to 256 positions fits twice in 512; a third would double the slots
    engine = ChatEngine(tiny, kv_budget=512)
    engine.lm = type("LM", (), {"tokenizer": tiny.tokenizer, "stop_ids": set()})()
    asks = prompts(3, seed=7, low=10, high=20)
    replies = [engine.submit(ids, SamplingParams(max_new_tokens=200)) for ids in asks]
    seen_waiting = threading.Event()

    def watch():  # polls with a pause: a spinning Python thread starves the engine's of the GIL
        while not replies[2].tokens:
            if replies[2].position == 1 and len(engine.scheduler.running) == 2:
                seen_waiting.set()
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    texts = ["".join(r) for r in replies]
    watcher.join()
    assert seen_waiting.is_set() and replies[2].position is None  # it waited first in line, then ran
    assert texts == [solo(tiny, ids, 200) for ids in asks]
    assert SlotCache.tokens_for(3, 220) == 4 * 256
    engine.close()
    small = ChatEngine(tiny, kv_budget=200)  # less than one chunk of the cache: nothing could ever fit
    with pytest.raises(UserError, match="needs 256 cache positions; this server's KV budget is 200"):
        small.submit(asks[0], SamplingParams(max_new_tokens=20))
    small.close()


def threads() -> int:
    """The process's threads, counted by the kernel."""
    return len(os.listdir("/proc/self/task"))


def test_releasing_openmp_workers_ends_the_calling_threads_team():
    """The engine's constructor frees its caller's OpenMP workers (core.serving.release_openmp_workers):
    the process's threads, counted by the kernel, drop by that team's workers."""
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no team to free")
    torch.ones(1 << 24).sum()  # a parallel region: this thread's team exists
    with_team = threads()
    assert release_openmp_workers()
    deadline = time.time() + 5
    while threads() >= with_team and time.time() < deadline:
        time.sleep(0.01)
    assert threads() <= with_team - (torch.get_num_threads() - 1)
    torch.ones(1 << 24).sum()  # and torch still computes, with a new team
    assert threads() == with_team


def test_work_beside_the_engine_on_a_pool_thread_leaves_no_openmp_team_behind():
    """A request handler's thread lives on in its pool; torch work there (an encoder, an adapter
    loading: the studio's methods marked beside_engine) must not leave a second team beside the
    engine's, or every barrier of the engine's step sleeps (the server's one chat ran at 24 tok/s,
    50 with this)."""
    from concurrent.futures import ThreadPoolExecutor
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no team to leave")

    def work():
        return float(torch.ones(1 << 24).sum())  # a parallel region on the pool's thread
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        alone = threads()  # the pool's thread is up
        assert pool.submit(beside_engine(work)).result() == 1 << 24
        assert threads() == alone
        pool.submit(work).result()  # unmarked, the team stays: what the mark prevents
        assert threads() == alone + torch.get_num_threads() - 1
        pool.submit(release_openmp_workers).result()


def test_listing_adapters_on_a_request_thread_starts_no_openmp_team(smollm2, tmp_path):
    """The API's /v1/models and the page's refreshes list the adapters on request threads. Each
    entry is checked against the base's fingerprint, which the registry takes once when it is
    made: computed at a thread's first listing, it left a team there, and the server's one chat
    ran at 24-27 tok/s after a /v1/models call (47-54 with this; bench_serving waits on that call)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from core.registry import AdapterRegistry
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no team to leave")
    shutil.copy(ROOT / "assets" / "adapters" / "image.safetensors", tmp_path)
    registry = AdapterRegistry(tmp_path, smollm2.model)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        alone = threads()
        entries = pool.submit(registry.entries).result()
        assert [(e.name, e.problem) for e in entries] == [("image", None)] and entries[0].meta["base"]["fingerprint"]
        assert threads() == alone


def test_repeat_guard_bans_a_third_occurrence_of_an_ngram_only():
    guard = RepeatGuard(3)
    for t in [1, 2, 3, 1, 2, 3, 1, 2]:
        guard.push(t)
    assert guard.banned() == [3]  # "1 2 3" twice already
    guard = RepeatGuard(3)
    for t in [1, 2, 3, 1, 2]:
        guard.push(t)
    assert guard.banned() == []  # once: it may come back


def test_embedded_model_defaults_come_from_its_card_with_the_repetition_guard(smollm2):
    params = model_sampling(smollm2)
    assert (params.temperature, params.top_p, params.ngram_guard) == (0.2, 0.9, 6)
    assert model_sampling(smollm2, temperature=0.0).temperature == 0.0  # greedy: one setting away


def test_embedded_model_batched_greedy_replies_equal_solo_replies(smollm2):
    from core.chat_format import render
    questions = ["What is the capital of France?", "Name three colors.", "Write a short poem about the sea.",
                 "How do I make tea?", "What is 12 times 12?"]
    asks = [smollm2.tokenizer.encode(render(smollm2.chat_format, [{"role": "user", "content": q}],
                                            smollm2.system_prompt)) for q in questions]
    expected = [Generator(smollm2.model, smollm2.tokenizer, smollm2.stop_ids).generate(
        [ids], SamplingParams(max_new_tokens=32))[0] for ids in asks]
    engine = ChatEngine(smollm2)
    replies = [engine.submit(ids, SamplingParams(max_new_tokens=32)) for ids in asks]
    assert ["".join(r) for r in replies] == expected and "Paris" in expected[0]
    engine.close()


TEN_PROMPTS = ["Write a short poem about the sea.", "How do I make tea?", "Tell me a story about a dragon.",
               "Explain how rain forms.", "What are some tips for learning to cook?", "Describe your ideal weekend.",
               "Write a haiku about autumn.", "Why is the sky blue?", "List five fruits and what they taste like.",
               "Write a short letter to a friend about a trip to the mountains."]


def most_repeated_6gram(text: str) -> int:
    words = text.split()
    counts = {}
    for i in range(len(words) - 5):
        counts[tuple(words[i:i + 6])] = counts.get(tuple(words[i:i + 6]), 0) + 1
    return max(counts.values(), default=0)


def test_embedded_model_at_defaults_gives_ten_replies_without_a_6gram_three_times(smollm2):
    """The model's own sampling with the repetition guard, as the app, CLI and API use it (a seed
    each, so the check repeats): the sea poem looped 'a place where the sea is a place' before."""
    from core.chat_format import render
    engine = ChatEngine(smollm2)
    replies = [engine.submit(smollm2.tokenizer.encode(render(smollm2.chat_format, [{"role": "user", "content": q}],
                                                             smollm2.system_prompt)),
                             model_sampling(smollm2, max_new_tokens=200, seed=i))
               for i, q in enumerate(TEN_PROMPTS)]
    texts = ["".join(r) for r in replies]
    assert all(len(t.split()) > 20 for t in texts[:6]), texts
    assert max(most_repeated_6gram(t) for t in texts) < 3, texts
    engine.close()
