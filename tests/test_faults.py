"""Faults and misuse end in clear errors, never in hangs: dead tensor-parallel workers (killed idle
and mid-run), engines of every size pair in one process, threads, Ctrl-C, calls after shutdown,
a missing tokenizer, odd inputs, bench.py's small sizes.

Whatever could hang runs in a subprocess with a timeout (this file run as a script: `python
tests/test_faults.py SCENARIO CHECKPOINT`), so a regression fails the test instead of stalling CI.
One scenario shares its tensor-parallel engines among several checks: each start costs seconds.
"""
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from fixtures.checkpoints import ENGINE_ARGS  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9]]
SCENARIO_TIMEOUT_S = 420


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


# ---- scenarios, run in a subprocess --------------------------------------------------------

def _error_of(call) -> dict:
    start = time.monotonic()
    try:
        call()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


def _kill_worker(llm: LLM):
    """SIGKILL rank 1, leaving its reaping to the executor (as when something else killed it)."""
    os.kill(llm.llm_engine.executor.workers[0].pid, signal.SIGKILL)


def scenario_engines(path: str) -> dict:
    """Engines of sizes 1, 2, 2, 1 made in that order; threads; workers killed idle and mid-run."""
    import multiprocessing
    report = {}
    a = LLM(path, **ENGINE_ARGS)
    b = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    c = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    d = LLM(path, **ENGINE_ARGS)
    reference = tokens(a)
    report["same_tokens"] = [tokens(engine) == reference for engine in (b, c, d, a)]

    # Four threads on one tp=1 engine and four on one tp=2 engine, all at once.
    expected = {i: tokens(a, [[i + 1, 2, 3]]) for i in range(4)}
    results = {}

    def run(name, engine, i):
        results[f"{name}{i}"] = tokens(engine, [[i + 1, 2, 3]])
    threads = [threading.Thread(target=run, args=(name, engine, i), daemon=True)
               for i in range(4) for name, engine in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    report["threads_hung"] = sum(thread.is_alive() for thread in threads)
    report["threads_match"] = all(results.get(f"{n}{i}") == expected[i] for i in range(4) for n in "ab")

    _kill_worker(b)  # idle
    time.sleep(1.0)
    report["idle_kill"] = _error_of(lambda: tokens(b))
    report["idle_kill_again"] = _error_of(lambda: tokens(b))
    report["others_unaffected"] = tokens(c) == reference and tokens(a) == reference

    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    threading.Timer(0.5, _kill_worker, (c,)).start()  # lands in one of the repeated generates
    report["busy_kill"] = _error_of(lambda: [tokens(c, [[1, 2, 3]] * 4, long) for _ in range(1000)])

    start = time.monotonic()
    for engine in (a, b, c, d):
        engine.shutdown()
    report["shutdown_s"] = time.monotonic() - start
    report["children_left"] = len(multiprocessing.active_children())
    e = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    report["new_engine_works"] = tokens(e) == reference
    e.shutdown()
    return report


def scenario_interrupted(path: str) -> dict:
    """A tp=2 engine that prints READY and its workers' pids, generates until Ctrl-C, then tries
    once more and shuts down."""
    llm = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    print("READY", json.dumps([w.pid for w in llm.llm_engine.executor.workers]), flush=True)
    try:
        while True:
            tokens(llm, [[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    except KeyboardInterrupt:
        pass
    report = {"after_interrupt": _error_of(lambda: tokens(llm))}
    start = time.monotonic()
    llm.shutdown()
    report["shutdown_s"] = time.monotonic() - start
    return report


def scenario_generate_once(path: str) -> dict:
    llm = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    return {"tokens": tokens(llm), "workers": [w.pid for w in llm.llm_engine.executor.workers]}


def _run_scenario(name: str, path: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, __file__, name, path], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _report(name: str, path: str) -> dict:
    process = _run_scenario(name, path)
    try:
        stdout, stderr = process.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"scenario {name} hung: {process.communicate()[1][-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    assert "leaked" not in stderr, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _gone(pids: list[int], pid_of_parent: int, timeout_s: float = 10) -> bool:
    """Whether the processes `pids` have exited and `pid_of_parent` left no shared memory behind."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
                 "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
        if not alive and not glob.glob(f"/dev/shm/nanovllm_{pid_of_parent}_*"):
            return True
        time.sleep(0.2)
    return False


# ---- tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines_report(qwen3_tied) -> dict:
    return _report("engines", qwen3_tied)


def test_engines_of_any_sizes_share_a_process(engines_report):
    assert engines_report["same_tokens"] == [True] * 4
    assert engines_report["new_engine_works"]


def test_threads_on_one_engine_run_one_after_another(engines_report):
    assert engines_report["threads_hung"] == 0
    assert engines_report["threads_match"]


@pytest.mark.parametrize("case", ["idle_kill", "idle_kill_again", "busy_kill"])
def test_a_dead_worker_is_named_within_seconds(engines_report, case):
    error = engines_report[case]
    assert error["type"] == "RuntimeError", error
    assert "worker rank 1" in error["message"] and "SIGKILL" in error["message"], error
    assert "create a new LLM" in error["message"]
    assert error["seconds"] < 10 or case == "busy_kill", error  # busy: the 0.5 s timer, then the step


def test_a_dead_worker_spares_the_other_engines_and_shutdown_cleans_up(engines_report):
    assert engines_report["others_unaffected"]
    assert engines_report["shutdown_s"] < 30
    assert engines_report["children_left"] == 0


def test_ctrl_c_during_generate_then_a_clear_state_and_a_retry_works(qwen3_tied):
    process = _run_scenario("interrupted", qwen3_tied, start_new_session=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("READY"), process.stderr.read()[-3000:]
        workers = json.loads(line.split(None, 1)[1])
        time.sleep(1.0)  # inside a generate
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0 and "leaked" not in stderr, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    after = report["after_interrupt"]  # interrupted between steps: it works; inside one: the ranks are out of step
    assert after["type"] is None or (after["type"] == "RuntimeError" and "out of step" in after["message"]), after
    assert report["shutdown_s"] < 30
    assert _gone(workers, process.pid)
    retry = _run_scenario("generate_once", qwen3_tied)
    stdout, stderr = retry.communicate(timeout=SCENARIO_TIMEOUT_S)
    assert retry.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) == 2 and _gone(report["workers"], retry.pid)


def test_every_call_after_shutdown_raises(qwen3_tied):
    llm = LLM(qwen3_tied, **ENGINE_ARGS)
    engine = llm.llm_engine
    llm.shutdown()
    calls = [lambda: llm.generate([[1, 2]]), lambda: llm.chat([{"role": "user", "content": "hi"}]),
             lambda: engine.add_request("x", [1, 2], GREEDY), engine.step, lambda: engine.abort_request("x"),
             engine.has_unfinished_requests]
    for call in calls:
        with pytest.raises(RuntimeError, match="has been shut down"):
            call()
    llm.shutdown()  # idempotent


def test_a_folder_without_tokenizer_fails_at_construction(qwen3_tied, tmp_path):
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(qwen3_tied, name), tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(f"no tokenizer was found in '{tmp_path}'") + ".*tokenizer.json"):
        LLM(str(tmp_path), **ENGINE_ARGS)
    for options in (dict(skip_tokenizer_init=True), dict(tokenizer=qwen3_tied)):
        llm = LLM(str(tmp_path), **ENGINE_ARGS, **options)
        try:
            assert len(tokens(llm)[0]) == 8
        finally:
            llm.shutdown()


def test_odd_inputs_get_clear_errors_or_work(llm):
    with pytest.raises(TypeError, match="request_id must be a str.*NoneType"):
        llm.llm_engine.abort_request(None)
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode text .*'\\ud800'"):
        llm.generate("\ud800", use_tqdm=False)
    with pytest.raises(ValueError, match="rendered conversation is not valid Unicode"):
        llm.chat([{"role": "user", "content": "a\udc00"}], use_tqdm=False)
    numpy_ids = [list(np.array(p)) for p in PROMPTS]  # numpy integers, as a vLLM script may pass
    assert isinstance(numpy_ids[0][0], np.integer)
    assert tokens(llm, numpy_ids) == tokens(llm) == tokens(llm, [np.array(p).tolist() for p in PROMPTS])


def _bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_runs_any_small_size_and_removes_its_folder(qwen3_tied, tmp_path, monkeypatch, capsys):
    bench = _bench()
    with open(os.path.join(qwen3_tied, "config.json")) as f:
        monkeypatch.setitem(bench.DUMMY_CONFIGS, "Qwen3-0.6B", json.load(f))  # tiny stand-in
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--num-seqs", "2", "--max-input-len", "1",
                                      "--max-output-len", "1", "--max-model-len", "64"])
    bench.main()
    out = capsys.readouterr().out
    assert "Throughput" in out and ("No GPU" in out) == (not torch.cuda.is_available())
    assert not os.listdir(tmp_path)


def test_bench_shared_workload_counts_every_decode_token(qwen3_tied, monkeypatch, capsys):
    """--workload's figures come from LLM.generate's rounds: every sequence's tokens after its first (which its
    prefill step gives) in the decode count, and the engine's loop unpatched afterwards."""
    bench = _bench()
    params = SamplingParams(n=3, temperature=0.6, ignore_eos=True, max_tokens=6)
    monkeypatch.setattr(bench, "shared_workload", lambda name, num_seqs: ([[7] * 40, [9] * 33], params))
    # async scheduling: the loop's last round only reads the last step's tokens
    llm = LLM(qwen3_tied, enable_cascade_attention=True, async_scheduling=True, **ENGINE_ARGS)
    try:
        bench.shared_throughput(llm, bench.parse_args(["--workload", "n-samples"]))
        assert "_step" not in vars(llm.llm_engine) and "schedule" not in vars(llm.llm_engine.scheduler)
        out = capsys.readouterr().out
        assert re.search(r"\[n-samples, cascade on\] decode: 30tok in \d+ steps, ", out), out
        assert llm.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # still serves
    finally:
        llm.shutdown()


if __name__ == "__main__":
    scenario, checkpoint = sys.argv[1:3]
    result = globals()[f"scenario_{scenario}"](checkpoint)
    print(json.dumps(result), flush=True)
