"""prefer_skinny's choice between the one-row Triton linear and the layer's usual kernel (layers/skinny_gemm.py),
with the GPU timing replaced: measured once per weight shape and dtype, never during CUDA-graph capture (the
usual kernel until measured), the skinny kernel only when it is at least MIN_GAIN faster (or, with a prologue
to run, at most MAX_LOSS_WITH_PROLOGUE slower), and never for more than one row or off CUDA."""
from types import SimpleNamespace

import pytest
import torch

from nanovllm.layers import skinny_gemm


class FakeCudaRow(SimpleNamespace):
    """What prefer_skinny reads of a CUDA activation, without a GPU."""

    def __init__(self, rows: int, k: int, dtype=torch.bfloat16):
        super().__init__(is_cuda=True, shape=(rows, k), dtype=dtype, device="cuda:0")

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@pytest.fixture
def timings(monkeypatch):
    """Replace the GPU timing: skinny_ms / default_ms per call, and count the measurements."""
    state = SimpleNamespace(skinny_ms=1.0, default_ms=2.0, measured=0, capturing=False)

    def fake_time(fn):
        state.measured += 1
        return fn()

    monkeypatch.setattr(skinny_gemm, "_time_ms", fake_time)
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda *args, **kwargs: state.skinny_ms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    monkeypatch.setattr(skinny_gemm, "_ratios", {})
    if skinny_gemm.triton is None:
        pytest.skip("needs Triton")
    return state


def prefer(timings, x, weight, scale=None, prologue=False) -> bool:
    return skinny_gemm.prefer_skinny(x, weight, scale, lambda: timings.default_ms, prologue)


def test_measured_once_per_shape_and_kept(timings):
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    assert prefer(timings, FakeCudaRow(1, 128), weight) and timings.measured == 2
    timings.skinny_ms = 10.0  # a later call does not measure again
    assert prefer(timings, FakeCudaRow(1, 128), weight) and timings.measured == 2
    other = torch.empty(128, 128, dtype=torch.bfloat16)
    assert not prefer(timings, FakeCudaRow(1, 128), other) and timings.measured == 4


def test_needs_the_margin(timings):
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    timings.skinny_ms, timings.default_ms = 1.0, 1.05  # faster, but by less than MIN_GAIN
    assert skinny_gemm.MIN_GAIN > 1.05
    assert not prefer(timings, FakeCudaRow(1, 128), weight)


def test_no_measuring_while_capturing(timings):
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    timings.capturing = True
    assert not prefer(timings, FakeCudaRow(1, 128), weight) and timings.measured == 0
    timings.capturing = False
    assert prefer(timings, FakeCudaRow(1, 128), weight) and timings.measured == 2


def test_fp8_weights_are_a_separate_choice(timings):
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    assert prefer(timings, FakeCudaRow(1, 128), weight)
    timings.skinny_ms = 10.0
    assert not prefer(timings, FakeCudaRow(1, 128), weight, scale=torch.ones(1, 1)) and timings.measured == 4


def test_only_one_row_on_cuda(timings):
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    assert not prefer(timings, FakeCudaRow(2, 128), weight)
    assert not prefer(timings, torch.empty(1, 128, dtype=torch.bfloat16), weight)  # a CPU tensor
    assert timings.measured == 0


def test_a_prologue_may_cost_a_little(timings):
    """With a norm or activation to fuse (a launch saved), the skinny kernel may be a bit slower, not much."""
    weight = torch.empty(64, 128, dtype=torch.bfloat16)
    timings.skinny_ms, timings.default_ms = 1.05, 1.0
    assert not prefer(timings, FakeCudaRow(1, 128), weight) and prefer(timings, FakeCudaRow(1, 128), weight, None, True)
    assert timings.measured == 2  # one measurement serves both
    other = torch.empty(128, 128, dtype=torch.bfloat16)
    timings.skinny_ms = skinny_gemm.MAX_LOSS_WITH_PROLOGUE * 1.01
    assert not prefer(timings, FakeCudaRow(1, 128), other, None, True)
