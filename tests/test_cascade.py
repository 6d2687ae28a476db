"""Cascade (shared-prefix) decode attention: the grouping and cost rule (worker/cascade.py) exactly, the
step's cascade metadata, the torch backend and the Triton kernels against the plain decode reference
(the kernels under Triton's interpreter; compiled on a GPU), and end to end: greedy tokens with cascade on
equal those with it off, on the CPU (torch backend) and on a GPU (Triton backend, eager and with graphs)."""
import random

import pytest
import torch

import nanovllm.worker.cascade as cascade_module
from fixtures.checkpoints import ENGINE_ARGS
from kernel_checks import run_interpreted
from kernel_checks.attention import decode_reference
from kernel_checks.cascade import cascade_case
from nanovllm import LLM, SamplingParams
from nanovllm.attention import AttentionMetadata
from nanovllm.attention.torch_backend import TorchBackend
from nanovllm.worker.cascade import CascadeGroup, CascadePlanner, CascadePolicy, Hints, plan_cascade
from nanovllm.worker.inputs import StepInput, eager_inputs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ANY = CascadePolicy(min_group_saved_tokens=0, min_step_saved_tokens=0)  # every shared block counts


# ---------------------------------------------------------------- grouping and the cost rule

def test_groups_by_shared_leading_blocks_rows_anywhere_in_the_batch():
    tables = [[1, 2, 3, 40], [7, 8, 50], [1, 2, 3, 41, 42], [9], [7, 8, 51], [1, 2, 3, 43]]
    lens = [61, 40, 70, 10, 33, 50]  # block 4: whole blocks of keys per row 15, 10, 17, 2, 8, 12
    plan = plan_cascade(tables, lens, 4, ANY)
    assert plan.groups == [CascadeGroup([0, 2, 5], 3), CascadeGroup([1, 4], 2)]
    assert plan.saved_blocks == 3 * 2 + 2 * 1 and plan.block_size == 4


def test_no_sharing_or_less_than_a_block_is_a_plain_step():
    assert plan_cascade([[1, 2], [3, 4], [5]], [8, 8, 3], 4, ANY) is None
    # rows 0 and 1 share block 1, but row 1 holds only 3 keys: not a whole block of its context
    assert plan_cascade([[1, 2], [1]], [8, 3], 4, ANY) is None


def test_prefix_capped_by_the_shortest_context_in_the_group():
    # both tables start 1, 2, 3 but row 1 has 9 keys: two whole blocks
    assert plan_cascade([[1, 2, 3, 4], [1, 2, 3]], [16, 9], 4, ANY).groups == [CascadeGroup([0, 1], 2)]


def test_nested_sharing_picks_the_partition_that_saves_most():
    system = [1, 2]
    # two prompts behind one system prompt, three samples each: groups per prompt save (2+3) x 2 x 2 = 20
    # blocks; one group of all six on the system prompt saves 2 x 5 = 10
    tables = [system + [10, 11, 12, 100 + i] for i in range(3)] + [system + [20, 21, 22, 200 + i] for i in range(3)]
    plan = plan_cascade(tables, [24] * 6, 4, ANY)
    assert plan.groups == [CascadeGroup([0, 1, 2], 5), CascadeGroup([3, 4, 5], 5)]
    # many prompts with one sample each: the system prompt shared by all is the better choice
    tables = [system + [10 + i, 50 + i] for i in range(6)] + [system + [10, 11, 12], system + [10, 11, 13]]
    plan = plan_cascade(tables, [16] * 8, 4, ANY)
    assert plan.groups == [CascadeGroup(list(range(8)), 2)]


def test_cost_rule_thresholds():
    tables = [[1, 2, 9], [1, 2, 8], [5, 6, 7, 3], [5, 6, 7, 4], [5, 6, 7, 2]]
    lens = [12, 12, 16, 16, 16]
    # group (0, 1) saves 2 blocks = 8 tokens, group (2, 3, 4) saves 3 x 2 = 6 blocks = 24 tokens
    assert plan_cascade(tables, lens, 4, CascadePolicy(9, 0)).groups == [CascadeGroup([2, 3, 4], 3)]
    assert len(plan_cascade(tables, lens, 4, CascadePolicy(8, 32)).groups) == 2  # 32 saved tokens in all
    assert plan_cascade(tables, lens, 4, CascadePolicy(8, 33)) is None
    assert plan_cascade(tables, lens, 4, CascadePolicy(0, 0, min_group_rows=4)) is None  # groups of 2 and 3


def _reference_groups(tables, caps, rows, shared, min_saved, min_rows):
    """plan_cascade's rule written plainly: the common run of `rows` block by block, every child explored."""
    limit = min(caps[r] for r in rows)
    while shared < limit and len({tables[r][shared] for r in rows}) == 1:
        shared += 1
    here = shared * (len(rows) - 1)
    best = (here, [CascadeGroup(sorted(rows), shared)]) if here >= min_saved and len(rows) >= min_rows else (0, [])
    children: dict[int, list[int]] = {}
    for r in rows:
        if caps[r] > shared:
            children.setdefault(tables[r][shared], []).append(r)
    below = [_reference_groups(tables, caps, c, shared + 1, min_saved, min_rows) for c in children.values()
             if len(c) >= max(2, min_rows)]
    saved = sum(b[0] for b in below)
    return (saved, [g for b in below for g in b[1]]) if saved > best[0] else best


def test_plans_are_the_plain_rules_on_random_batches():
    """plan_cascade (its shortcuts: a node of min_group_rows rows is not split further, hints, binary searches)
    against the rule written plainly, on random forests of shared runs, group sizes and policies."""
    rng = random.Random(1)
    for trial in range(300):
        block_size, next_block, tables = 4, 1000, []
        for _ in range(rng.randint(1, 4)):  # trees of tables forking off one another
            tree = [[rng.randrange(100) for _ in range(rng.randint(1, 3))]]
            for _ in range(rng.randint(1, 12)):
                parent = rng.choice(tree)
                tree.append(parent[:rng.randint(1, len(parent))] + list(range(next_block, next_block + rng.randint(0, 3))))
                next_block += 3
            tables += tree
        rng.shuffle(tables)
        tables = [t for t in tables if t]
        lens = [max(1, block_size * len(t) - rng.randrange(block_size + 2)) for t in tables]
        policy = CascadePolicy(rng.choice([0, 4, 8]), 0, rng.choice([2, 3, 4, 16]))
        caps = [min(len(t), n // block_size) for t, n in zip(tables, lens)]
        by_first: dict[int, list[int]] = {}
        for row, table in enumerate(tables):
            if caps[row]:
                by_first.setdefault(table[0], []).append(row)
        want = sorted(g for rows in by_first.values() if len(rows) >= max(2, policy.min_group_rows)
                      for g in _reference_groups(tables, caps, rows, 1, policy.min_group_saved_tokens / block_size,
                                                 policy.min_group_rows)[1])
        plan = plan_cascade(tables, lens, block_size, policy)
        assert (plan.groups if plan else []) == want, f"trial {trial}"


def test_planner_hints_never_change_the_plan():
    """CascadePlanner tries the last step's shared lengths first: over steps that append blocks, drop and
    reorder rows, change a table in place (a preempted and re-filled sequence) and fork new rows, its plans are
    plan_cascade's; a hint that is too short, too long or out of range is not taken."""
    rng = random.Random(0)
    planner = CascadePlanner(ANY)
    system = [1, 2, 3]
    tables = [system + [10 + g, 20 + g] + [1000 + 10 * g + i] for g in range(3) for i in range(4)]
    next_block = 2000
    for step in range(40):
        lens = [4 * len(t) - rng.randrange(4) for t in tables]
        assert planner.plan(tables, lens, 4) == plan_cascade(tables, lens, 4, ANY), f"step {step}"
        for t in tables:  # every row appends a block now and then
            if rng.random() < 0.3:
                t.append(next_block)
                next_block += 1
        if step % 7 == 3:
            tables.pop(rng.randrange(len(tables)))
        if step % 9 == 4:
            rng.shuffle(tables)
        if step % 11 == 5:
            tables[0][3:] = [next_block, next_block + 1]  # re-filled: shares only the system prompt now
            next_block += 2
        if step % 13 == 6:
            tables.append(list(tables[-1][:5]) + [next_block])  # a fork: a longer shared run than before
            next_block += 1
    # hints keyed by a node's last block (1: the first block's node): too short, beyond the limit, too long
    tables = [[1, 2, 3, 10, 7], [1, 2, 3, 10, 8], [1, 2, 3, 11, 9]]
    assert plan_cascade(tables, [20] * 3, 4, ANY, Hints({1: 2, 10: 99}, {})) == plan_cascade(tables, [20] * 3, 4, ANY)
    tables = [[1, 2, 3, 10, 7, 5], [1, 2, 3, 10, 8, 6]]
    assert plan_cascade(tables, [24] * 2, 4, ANY, Hints({1: 5}, {})).groups == [CascadeGroup([0, 1], 4)]


def test_policy_follows_config_and_backend(qwen3_tied):
    from nanovllm.config import Config
    from nanovllm.worker.cascade import cascade_policy
    policy = cascade_policy(Config(qwen3_tied, enable_cascade_attention=True, **ENGINE_ARGS))
    assert policy == CascadePolicy(cascade_module.MIN_GROUP_SAVED_BLOCKS * 16, 0)  # CPU: groups from two rows
    assert cascade_policy(Config(qwen3_tied, enable_cascade_attention=False, **ENGINE_ARGS)) is None
    assert Config(qwen3_tied, **ENGINE_ARGS).enable_cascade_attention is False  # None: off on the CPU
    with pytest.raises(ValueError, match="enable_cascade_attention must be True, False or None, got 'yes'"):
        Config(qwen3_tied, enable_cascade_attention="yes", **ENGINE_ARGS)


def test_step_cascade_metadata():
    tables = [[7, 1, 2], [3, 4], [7, 1, 5, 6]]
    step = StepInput(is_prefill=False, input_ids=[1, 2, 3], positions=[9, 5, 13], slot_mapping=[10, 11, 12],
                     block_tables=tables, context_lens=[10, 6, 14], logits_indices=[0, 1, 2],
                     cascade=plan_cascade(tables, [10, 6, 14], 4, ANY))
    _, _, meta = eager_inputs(step, torch.device("cpu"))
    c = meta.cascade
    assert meta.block_tables is None and meta.context_lens is None
    assert c.prefix_block_tables.tolist() == [[7, 1]] and c.prefix_lens.tolist() == [8]
    assert c.group_rows.tolist() == [0, 2] and c.cu_group_rows.tolist() == [0, 2]
    assert c.seq_prefix_lens.tolist() == [8, 0, 8] and c.suffix_lens.tolist() == [2, 6, 6]
    assert c.suffix_block_tables.tolist() == [[2, 0], [3, 4], [5, 6]]
    assert (c.num_groups, c.max_prefix_len) == (1, 8)


def test_graph_inputs_of_a_cascade_step_attend_as_the_eager_ones():
    """A cascade step staged for a larger CUDA graph (padded rows, room for more groups, stale entries in the
    buffer) gives the eager step's attention, through the torch backend."""
    import numpy as np
    from nanovllm.attention import LayerKVCache
    from nanovllm.worker.cuda_graph import GraphInputs
    tables = [[7, 1, 2], [3, 4], [7, 1, 5, 6], [3, 4, 8], [9], [7, 1, 0]]
    lens = [10, 6, 14, 9, 3, 12]
    plan = plan_cascade(tables, lens, 4, ANY)
    assert len(plan.groups) == 2
    step = StepInput(is_prefill=False, input_ids=[1] * 6, positions=[n - 1 for n in lens], slot_mapping=[0] * 6,
                     block_tables=tables, context_lens=lens, logits_indices=list(range(6)), cascade=plan)
    layout = GraphInputs(max_bs=16, width=5, block_size=4, cascade_min_rows=2)
    host = np.full(sum(layout.parts32), 9, dtype=np.int32)  # what earlier steps left (the torch backend reads
    # table entries past a row's length, masked: they must be block ids, as the engine's always are)
    layout.stage32(step, host, graph_bs=8)
    graph_meta = layout.cascade_metadata(torch.from_numpy(host), 8)
    assert graph_meta.cascade.num_groups == 4
    _, _, eager_meta = eager_inputs(step, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    cache = LayerKVCache(torch.randn(10, 4, 2, 16, generator=g), torch.randn(10, 4, 2, 16, generator=g))
    q = torch.randn(8, 4, 16, generator=g)
    eager = TorchBackend().forward(q[:6], None, None, cache, eager_meta, 0.25)
    graph = TorchBackend().forward(q, None, None, cache, graph_meta, 0.25)
    torch.testing.assert_close(graph[:6], eager)
    assert not graph[6:].any()  # padded rows attend over nothing


@pytest.mark.parametrize("graph_bs", [1, 2, 8, 16])
def test_graph_copies_cover_what_the_graph_reads(graph_bs):
    """The ranges of the int32 buffer copied for a graph (GraphInputs.ranges32) hold every element its
    attention metadata views, plain and cascade."""
    from nanovllm.worker.cuda_graph import GraphInputs
    layout = GraphInputs(max_bs=16, width=5, block_size=4, cascade_min_rows=2)
    index = torch.arange(sum(layout.parts32), dtype=torch.int32)  # each element holds its own offset
    for cascade in (False, True):
        meta = (layout.cascade_metadata if cascade else layout.plain_metadata)(index, graph_bs)
        views = [meta.slot_mapping, meta.context_lens, meta.block_tables] if not cascade else [
            meta.slot_mapping, *(getattr(meta.cascade, f) for f in ("prefix_block_tables", "prefix_lens", "group_rows",
                                                                   "cu_group_rows", "seq_prefix_lens",
                                                                   "suffix_block_tables", "suffix_lens"))]
        read = set(torch.cat([v.flatten() for v in views]).tolist())
        copied = {i for start, end in layout.ranges32(graph_bs, cascade) for i in range(start, end)}
        assert read <= copied, sorted(read - copied)


# ---------------------------------------------------------------- attention against the plain reference

@pytest.mark.parametrize("dtype, group", [(torch.float32, 2), (torch.bfloat16, 3)])
def test_torch_backend_cascade_equals_plain_decode(dtype, group):
    q, k_cache, v_cache, _, _, meta, full, lens = cascade_case("cpu", 16, 64, group, dtype, dtype)
    # the torch backend reads padded rows, masked (the engine's CPU cache is zeroed): no NaN there
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref = decode_reference(q, k_cache, v_cache, full, lens, 0.125)
    from nanovllm.attention import LayerKVCache
    out = TorchBackend().forward(q, None, None, LayerKVCache(k_cache, v_cache),
                                 AttentionMetadata(is_prefill=False, slot_mapping=None, cascade=meta), 0.125)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_cascade_kernels_interpreted():
    # prefix_config BLOCK_M 16: groups of 10 rows span two row tiles; BLOCK_N 32 spans two 16-token pages;
    # merge_chunk 1: prefix and suffix splits merged one per step, rescaled as the max grows
    run_interpreted("cascade", block_sizes=[16, 64], head_dims=[64, 128], groups=[1, 2, 3],
                    prefix_config=[16, 32, 4, 1], merge_chunk=1)


@pytest.mark.gpu
@gpu
def test_cascade_kernels_gpu():
    from kernel_checks.cascade import check
    check("cuda", block_sizes=(16, 32, 256), head_dims=(64, 128, 256), groups=(1, 2, 4, 8, 7),
          query_dtypes=("float16", "float32"))


# ---------------------------------------------------------------- end to end

def _workload(seed: int = 0, scale: int = 1):
    """Prompts behind shared prefixes of several lengths (whole blocks and not, shorter than a block;
    `scale` times longer), interleaved with unrelated prompts, and max_tokens that end sequences at
    different steps."""
    rng = random.Random(seed)
    words = lambda n: [rng.randint(10, 3000) for _ in range(n)]  # noqa: E731
    prefixes = [words(70 * scale), words(48 * scale), words(9), words(33 * scale)]  # 4.4, 3, 0.6, 2.1 blocks
    prompts = [prefixes[i % 4] + words(rng.randint(1, 40)) for i in range(14)] + [words(25), words(60)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=rng.randint(6, 30)) for _ in prompts]
    return prompts, params


def _generate(path, prompts, params, **options) -> list[list[list[int]]]:
    llm = LLM(path, **{**ENGINE_ARGS, **options})
    try:
        outputs = llm.generate([dict(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[c.token_ids for c in o.outputs] for o in outputs], llm.llm_engine.scheduler.num_preemptions
    finally:
        llm.shutdown()


@pytest.fixture
def cascade_plans(monkeypatch) -> list:
    """The plans of every decode step (None: a plain step)."""
    plans = []

    plan = cascade_module.CascadePlanner.plan

    def recording(*args):
        plans.append(plan(*args))
        return plans[-1]
    monkeypatch.setattr(cascade_module.CascadePlanner, "plan", recording)
    return plans


@pytest.mark.parametrize("options", [dict(), dict(num_gpu_blocks_override=24, max_model_len=384)],
                         ids=["roomy", "preempting"])
def test_cpu_engine_same_tokens_with_and_without_cascade(qwen3_tied, cascade_plans, options):
    prompts, params = _workload()
    on, preempted = _generate(qwen3_tied, prompts, params, enable_cascade_attention=True, **options)
    used = [p for p in cascade_plans if p is not None]
    assert used, "cascade never ran"
    if options:
        assert preempted > 0
    else:
        assert any(len({g.num_prefix_blocks for g in p.groups}) > 1 for p in used), "no step had two prefixes"
    cascade_plans.clear()
    off, _ = _generate(qwen3_tied, prompts, params, enable_cascade_attention=False, **options)
    assert not cascade_plans
    assert on == off


def test_cpu_engine_tensor_parallel_cascade(qwen3_tied, cascade_plans):
    """tp=2: the plan travels with the step; every rank attends through it, and the tokens are the plain path's."""
    prompts, params = _workload()
    on, _ = _generate(qwen3_tied, prompts, params, enable_cascade_attention=True, tensor_parallel_size=2)
    assert any(p is not None for p in cascade_plans)
    off, _ = _generate(qwen3_tied, prompts, params, enable_cascade_attention=False, tensor_parallel_size=2)
    assert on == off


def test_cpu_engine_n_samples_share_their_prompt(qwen3_tied, cascade_plans):
    rng = random.Random(1)
    prompts = [[rng.randint(10, 3000) for _ in range(n)] for n in (50, 90, 20)]
    params = SamplingParams(n=4, temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    on, _ = _generate(qwen3_tied, prompts, params, enable_cascade_attention=True)
    assert any(p is not None and max(len(g.rows) for g in p.groups) >= 4 for p in cascade_plans)
    off, _ = _generate(qwen3_tied, prompts, params, enable_cascade_attention=False)
    assert on == off


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("eager", [True, False])
def test_gpu_engine_same_tokens_with_and_without_cascade(tmp_path, monkeypatch, cascade_plans, eager):
    """Triton backend, bf16: eager steps, or CUDA graphs with the cascade steps replaying graphs of their own
    (groups from two rows)."""
    from fixtures.checkpoints import write_tiny_qwen3
    from test_gpu import assert_greedy_close
    path = write_tiny_qwen3(tmp_path, num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=128, intermediate_size=1024, dtype=torch.bfloat16, seed=3)
    monkeypatch.setattr(cascade_module, "MIN_GROUP_ROWS_CUDA", 2)
    from nanovllm.worker.cuda_graph import GraphInputs
    replays, real = [], GraphInputs.stage32

    def staging(layout, step, *args):
        replays.append(step.cascade is not None)
        return real(layout, step, *args)
    monkeypatch.setattr(GraphInputs, "stage32", staging)
    prompts, params = _workload(scale=8)
    options = dict(attention_backend="triton", dtype="bfloat16", enforce_eager=eager, device="cuda",
                   cpu_kvcache_space_gib=1.0, max_model_len=2048)
    on, _ = _generate(path, prompts, params, enable_cascade_attention=True, **options)
    assert any(p is not None for p in cascade_plans)
    assert eager or any(replays), "no cascade step replayed a graph"
    off, _ = _generate(path, prompts, params, enable_cascade_attention=False, **options)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    assert_greedy_close(hf, prompts, [o[0] for o in on], [o[0] for o in off])


def test_warmup_step_takes_the_cascade_path_and_writes_nothing(qwen3_tied, monkeypatch):
    """The start-up step that compiles the cascade kernels on CUDA (ModelRunner._warmup_cascade), here on
    the CPU: every layer attends through the cascade path, and the KV cache is left as it was."""
    import nanovllm.attention.torch_backend as torch_backend
    llm = LLM(qwen3_tied, enable_cascade_attention=True, **ENGINE_ARGS)
    try:
        runner = llm.llm_engine.executor.runner
        calls, real = [], torch_backend._cascade_decode
        monkeypatch.setattr(torch_backend, "_cascade_decode", lambda *args: calls.append(1) or real(*args))
        runner.kv_cache.normal_()
        before = runner.kv_cache.clone()
        runner._warmup_cascade()
        assert len(calls) == len(runner.attention_layers)
        assert torch.equal(runner.kv_cache, before)
    finally:
        llm.shutdown()


@pytest.mark.gpu
@gpu
def test_gpu_engine_compiles_the_cascade_kernels_at_start(tmp_path):
    """With cascade on, the engine's start-up compiles the cascade kernels, so the first step that
    shares a prefix does not (seconds on an H200, inside the run)."""
    from fixtures.checkpoints import write_tiny_qwen3
    from nanovllm.attention import triton_cascade
    path = write_tiny_qwen3(tmp_path, num_hidden_layers=2, hidden_size=512, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=128, intermediate_size=1024, dtype=torch.bfloat16, seed=3)
    kernels = (triton_cascade._prefix_kernel, triton_cascade._decode_kernel)
    for kernel in kernels:
        kernel.device_caches.clear()  # compiled by earlier tests of this process
    llm = LLM(path, enable_cascade_attention=True, attention_backend="triton", dtype="bfloat16", device="cuda",
              max_model_len=2048, skip_tokenizer_init=True)
    try:
        # the prefix pass; the decode kernel as a plain decode and as the cascade's suffix pass
        for kernel, variants in zip(kernels, (1, 2)):
            assert sum(len(cache[0]) for cache in kernel.device_caches.values()) >= variants, kernel
    finally:
        llm.shutdown()
