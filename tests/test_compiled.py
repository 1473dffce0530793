"""The compiled decode step (core.compiled) on a tiny random model (math: it must give the eager
step's tokens, alone and in the engine's batches), and its fallback when compiling really fails
(no C++ compiler: CXX points at /bin/false, with an empty inductor cache), in a subprocess; the
pass that turns one-row products into multiply-sums, on random weights."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from core.compiled import compile_decode, one_row_matmuls
from core.generation import SamplingParams, generate_tokens
from core.loading import load_model
from core.serving import ChatEngine
from tests.helpers import open_adapter

ROOT = Path(__file__).resolve().parents[1]


def greedy_ids(model, prompts, n):
    return [step for step in generate_tokens(model, prompts, SamplingParams(max_new_tokens=n, ignore_eos=True), set())]


def test_compiled_step_tiny_random_model_gives_the_eager_tokens(tiny_dir):
    lm = load_model(str(tiny_dir), "float32", "cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (9, 17)]  # unequal: padded rows
    eager_one, eager_two = greedy_ids(lm.model, prompts[:1], 12), greedy_ids(lm.model, prompts, 12)
    engine = ChatEngine(lm)
    try:
        eager_engine = [engine.submit(p, SamplingParams(max_new_tokens=8, ignore_eos=True)) for p in prompts]
        eager_engine = ["".join(r) for r in eager_engine]
        adapter = open_adapter(lm, 1, prompt_len=4, layers=2)
        eager_adapted = "".join(engine.submit(prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True),
                                              adapter=adapter))
        assert eager_adapted != eager_engine[0]
        counters.clear()
        compile_decode(lm.model)
        tensor_guards = spy_on_tensor_guards(lm.model.decode_step)
        engine.warm_up()
        assert counters["stats"]["unique_graphs"] == 3  # the engine's: one row, one row among free slots, several
        assert greedy_ids(lm.model, prompts[:1], 12) == eager_one
        assert greedy_ids(lm.model, prompts, 12) == eager_two
        replies = [engine.submit(p, SamplingParams(max_new_tokens=8, ignore_eos=True)) for p in prompts]
        assert ["".join(r) for r in replies] == eager_engine
        # other lengths and batches reuse the graphs: longer prompts and replies, alone and in the engine
        greedy_ids(lm.model, [prompts[1] * 3], 30)
        replies = [engine.submit(prompts[i % 2] * (i + 2), SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True))
                   for i in range(3)]
        assert all("".join(r) for r in replies)
        assert counters["stats"]["unique_graphs"] == 5  # and plain decoding's two: one row, several
        # rows with an adapter are one more graph, whole (each row's prompt heads are fixed sizes),
        # and the base model's graphs still hold after it (the prompt slot is where it was)
        adapted = "".join(engine.submit(prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True), adapter=adapter))
        assert counters["stats"]["unique_graphs"] == 6 and not counters["graph_break"]
        assert adapted == eager_adapted
        assert "".join(engine.submit(prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True))) == eager_engine[0]
        assert counters["stats"]["unique_graphs"] == 6
    finally:
        engine.close()
    assert not lm.model.decode_step.failed
    # the base's weights are not checked before each step (they are fixed once it is compiled); the
    # tokens, the KV caches and the adapter's tensors are
    fused = [t for layer in lm.model.layers for t in (layer.attention.wqkv, layer.feed_forward.w13)]  # the float layout's
    weights = {id(t) for t in (*lm.model.parameters(), *lm.model.buffers(), *fused)}
    kept = {name for name, value, keep in tensor_guards if keep}
    assert {id(value) for name, value, keep in tensor_guards if not keep} == weights
    assert not {id(value) for name, value, keep in tensor_guards if keep} & weights
    assert "tokens" in kept and any("kv_cache" in name for name in kept), kept
    assert any("prompt" in name for name in kept), kept


def spy_on_tensor_guards(step) -> list:
    """(name, tensor, kept) of each tensor guard dynamo offers the compiled step, as it compiles."""
    seen, choose = [], step.guards

    def guards(entries):
        keep = choose(entries)
        seen.extend((e.name, e.value, k) for e, k in zip(entries, keep) if e.guard_type == "TENSOR_MATCH")
        return keep
    step.guards = guards
    return seen


def test_every_kv_cache_length_is_one_symbol_of_the_tiny_random_models_step(tiny_dir):
    """Plain decoding's step takes the caches' common length as one integer input, not one per
    cache (each was converted and checked before every token; docs/quantization.md), and a new
    prompt length reuses the graph."""
    lm = load_model(str(tiny_dir), "float32", "cpu")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sorted({str(n.meta["example_value"]) for n in gm.graph.nodes
                              if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)}))
        return gm
    torch._dynamo.reset()
    lm.model.decode_step = torch.compile(lm.model.forward, backend=backend, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for n in (9, 17):
        greedy_ids(lm.model, [torch.randint(5, 250, (n,), generator=g).tolist()], 4)
    assert len(graphs) == 1 and len(graphs[0]) == 2, graphs  # the position and the caches' length


def test_an_attached_adapter_compiles_whole_and_gives_the_eager_tokens_on_the_tiny_random_model(tiny_dir):
    """A plain attach (the CLI's --adapter) decodes through one graph per kind, with no break at each
    adapted layer (the prompts' cache key read data_ptr(), which dynamo cannot trace)."""
    lm = load_model(str(tiny_dir), "float32", "cpu")
    adapter = open_adapter(lm, 1, prompt_len=4, layers=2)
    adapter.attach(lm.model)
    try:
        prompts = [list(range(5, 14)), list(range(20, 37))]
        eager = greedy_ids(lm.model, prompts, 8)
        torch._dynamo.reset()
        counters.clear()
        compile_decode(lm.model)
        assert greedy_ids(lm.model, prompts, 8) == eager
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1  # several rows; the prompts' projection inside it
    finally:
        adapter.detach()


def test_compile_failure_decodes_eagerly_with_one_notice(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "core.generate", "--model", str(tiny_dir), "--prompt", "the fox and",
           "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CXX": "/bin/false"}
    eager = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    broken = subprocess.run(cmd + ["--compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert eager.returncode == 0 and broken.returncode == 0, broken.stderr[-2000:]
    assert broken.stdout == eager.stdout and eager.stdout.strip()
    notices = [line for line in broken.stderr.splitlines() if "compiled decode step failed" in line]
    assert len(notices) == 1 and notices[0].endswith("decoding eagerly"), broken.stderr[-2000:]


def test_compiled_kernels_are_cached_in_the_studios_cache_unless_the_user_chose_a_place(tiny_dir, tmp_path):
    """torch sets its /tmp default as soon as torch._dynamo is imported (a model's loading does);
    compile_decode still moves the cache to STUDIO_CACHE/inductor, and keeps a place the user set."""
    code = ("import os, torch._dynamo; from core.loading import load_model; from core.compiled import compile_decode; "
            f"compile_decode(load_model({str(tiny_dir)!r}, 'float32', 'cpu').model); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    ours = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "STUDIO_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    theirs = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "STUDIO_CACHE": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")})
    assert ours.stdout.split() == [str(tmp_path / "inductor")], ours.stderr[-2000:]
    assert theirs.stdout.split() == [str(tmp_path / "mine")], theirs.stderr[-2000:]


def test_one_row_products_become_multiply_sums_on_random_weights():
    """F.linear's products with one row (fp32 and bf16 weights) are rewritten (counted) and agree
    with the eager ones; several rows stay matrix products, and the int8 kernel is left alone."""
    import torch.nn.functional as F
    from core.quantize import Int8Linear
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    w16, int8 = w.bfloat16(), Int8Linear.from_float(w)

    def products(x):
        return F.linear(x, w), F.linear(x.bfloat16(), w16), int8(x)
    step = torch.compile(products, dynamic=False, options={"post_grad_custom_post_pass": one_row_matmuls(),
                                                           "fx_graph_cache": False})
    counters.clear()
    for rows, rewritten in ((1, 2), (3, 0)):
        x = torch.randn(rows, 64, generator=g)
        before = counters["inductor"]["one_row_matmuls"]
        compiled, eager = step(x), products(x)
        assert counters["inductor"]["one_row_matmuls"] - before == rewritten
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled[1], eager[1], rtol=1e-2, atol=3e-2)  # bf16 out, another summation order
        torch.testing.assert_close(compiled[2], eager[2], rtol=0, atol=0)
