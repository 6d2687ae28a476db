"""Step inputs (worker/inputs.py) built from scheduled sequences, exactly: slot mapping across
blocks, cu_seqlens of a prefill with a cached prefix and a chunked prompt, decode rows. What
travels to the worker processes is plain lists: no sequence, no sampling state. The CUDA graphs'
staging of block-table rows (worker/cuda_graph.TableRows) writes only what changed and stages what
a full write would."""
import pickle
import random

import numpy as np

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.cuda_graph import TableRows
from nanovllm.worker.inputs import prepare_step


def _seq(seq_id: int, num_tokens: int, block_table: list[int], cached: int, scheduled: int) -> Sequence:
    seq = Sequence(seq_id, list(range(100, 100 + num_tokens)), SamplingParams(presence_penalty=1.0, seed=3))
    seq.block_table, seq.num_cached_tokens, seq.num_scheduled_tokens = block_table, cached, scheduled
    return seq


def test_prefill_with_cached_prefix_and_chunk():
    a = _seq(0, 6, [7, 2], cached=4, scheduled=2)    # block size 4: prefix of one block cached, completes
    b = _seq(1, 10, [5, 1, 9], cached=0, scheduled=5)  # chunked: 5 of 10 tokens, no logits row
    step = prepare_step([a, b], is_prefill=True, block_size=4)
    assert step.input_ids == [104, 105, 100, 101, 102, 103, 104]
    assert step.positions == [4, 5, 0, 1, 2, 3, 4]
    assert step.slot_mapping == [2 * 4 + 0, 2 * 4 + 1, 5 * 4, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 1 * 4]
    assert step.cu_seqlens_q == [0, 2, 7] and step.cu_seqlens_k == [0, 6, 11]
    assert step.logits_indices == [1]
    assert step.block_tables == [[7, 2], [5, 1, 9]]  # a cached prefix: attend through the tables


def test_decode_rows_and_no_tables_without_a_cached_prefix():
    step = prepare_step([_seq(0, 3, [4], cached=0, scheduled=3)], is_prefill=True, block_size=4)
    assert step.block_tables is None and step.logits_indices == [2]
    a, b = _seq(0, 9, [3, 8, 6], cached=8, scheduled=1), _seq(1, 4, [2], cached=3, scheduled=1)
    step = prepare_step([a, b], is_prefill=False, block_size=4)
    assert step.input_ids == [108, 103] and step.positions == [8, 3]
    assert step.slot_mapping == [6 * 4, 2 * 4 + 3] and step.context_lens == [9, 4]
    assert step.logits_indices == [0, 1]


def test_step_input_carries_no_sequence():
    a = _seq(0, 9, [3, 8, 6], cached=8, scheduled=1)
    a.sampling_state = object()  # rank 0's sampler state must never travel
    data = pickle.dumps(prepare_step([a], is_prefill=False, block_size=4))
    assert b"Sequence" not in data and b"SamplingParams" not in data


def test_uploaded_lists_keep_their_values_and_start_16_byte_aligned():
    """Odd lengths, an empty list: every slice starts on a 16-byte boundary (Triton specializes on
    pointer alignment, so a step whose lengths shifted a slice would compile another variant)."""
    import torch

    from nanovllm.worker.inputs import upload_ints
    arrays = [[1, 2, 3], [], [4], [5, 6], list(range(7))]
    slices = upload_ints(torch.device("cpu"), *arrays)
    assert [t.tolist() for t in slices] == arrays
    assert all(t.dtype == torch.int64 and t.data_ptr() % 16 == 0 for t in slices)


def test_table_rows_stage_what_a_full_write_stages():
    rng = random.Random(0)
    live = [[rng.randrange(100) for _ in range(rng.randint(1, 5))] for _ in range(8)]
    staged, rows = np.full((8, 16), -1, dtype=np.int32), TableRows(8)
    for step in range(80):
        for i, table in enumerate(live):  # the block manager's changes: appends, and new lists
            if rng.random() < 0.3 and len(table) < 16:
                table.append(rng.randrange(100))
            elif rng.random() < 0.1:
                live[i] = [rng.randrange(100) for _ in range(rng.randint(1, 5))]
        batch = rng.sample(live, rng.randint(1, 8))  # finished rows leave, the others move up
        starts = [rng.randint(0, len(t) - 1) if rng.random() < 0.2 else 0 for t in batch] if step % 3 else None
        rows.fill(staged, batch, starts)
        for row, table in enumerate(batch):
            start = starts[row] if starts else 0
            assert staged[row, :len(table) - start].tolist() == table[start:], f"step {step}, row {row}"
        staged.flags.writeable = False  # the same step again: nothing to write (a write would raise)
        rows.fill(staged, batch, starts)
        staged.flags.writeable = True
