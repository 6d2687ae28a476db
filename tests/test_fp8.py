"""FP8 weights on the CPU, against transformers on the dequantized weights (float32).

A tiny Qwen3 (hidden 256, intermediate 512, 2 layers, 2 heads / 2 KV heads of 128) is written
twice: in the published FP8 layout (float8_e4m3fn weights, `weight_scale_inv` per 128x128 block,
`quantization_config` in config.json) and as the float32 checkpoint of its dequantized weights.
Each block's scale is a power of two and holds a +-448, so quantizing the float32 checkpoint on
the fly gives back the same FP8 weights exactly. Checked: greedy tokens of the FP8 checkpoint at
tp=1 and tp=2 and of on-the-fly quantization equal transformers'; on-the-fly quantization of
arbitrary weights is within half an FP8 step of each block; ignored modules stay unquantized;
refused configs name the field; dummy weights load. The Triton kernels run under the interpreter
(and compiled on a GPU, marked gpu).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config

from fixtures.checkpoints import write_tiny_decoder
from kernel_checks import run_interpreted
from test_gpu import hf_greedy as hf_greedy_batch, worst_relative_gap
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.layers.quantization.config import Fp8Config, resolve_quant_config
from nanovllm.layers.quantization.fp8 import quantize_weight_blockwise
from nanovllm.models import get_model_class
from nanovllm.models.loader import load_model

BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, head_dim=128, max_position_embeddings=512, tie_word_embeddings=False)
ENGINE_ARGS = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256,
                   skip_tokenizer_init=True, cpu_kvcache_space_gib=0.05)  # on the CPU on a GPU machine too
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT_LENS = [5, 23, 1]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, SHAPE["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS]


def write_float32(path, **overrides) -> str:
    return write_tiny_decoder(path, "Qwen3ForCausalLM", **{**SHAPE, **overrides})


def fp8_blocks(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 weight (each 128x128 block holding a +-448) and power-of-two block scales."""
    n, k = shape
    q = (torch.randn(n, k, generator=gen) * 96).clamp(-448, 448)
    q[::BLOCK, ::BLOCK] = 448.0
    scale = 2.0 ** -torch.randint(10, 12, (-(-n // BLOCK), -(-k // BLOCK)), generator=gen).float()
    return q.to(torch.float8_e4m3fn), scale


def write_fp8_pair(root, ignored: tuple[str, ...] = (), **overrides) -> tuple[str, str]:
    """(FP8 checkpoint, float32 checkpoint of its dequantized weights); projections named by
    `ignored` (as `modules_to_not_convert`) keep their float32 weights in both."""
    fp32 = write_float32(os.path.join(root, "fp32"), **overrides)
    fp8 = os.path.join(root, "fp8")
    os.makedirs(fp8)
    tensors, quantized = load_file(os.path.join(fp32, "model.safetensors")), {}
    gen = torch.Generator().manual_seed(1)
    for name, tensor in list(tensors.items()):
        module = name.removesuffix(".weight")
        if not name.endswith("_proj.weight") or any(f".{i}." in f".{module}." for i in ignored):
            quantized[name] = tensor
            continue
        q, scale = fp8_blocks(tuple(tensor.shape), gen)
        quantized[name], quantized[f"{module}.weight_scale_inv"] = q, scale
        expanded = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:q.shape[0], :q.shape[1]]
        tensors[name] = q.float() * expanded
    save_file(tensors, os.path.join(fp32, "model.safetensors"), metadata={"format": "pt"})
    save_file(quantized, os.path.join(fp8, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(fp32, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = dict(FP8_CONFIG, modules_to_not_convert=["lm_head", *ignored])
    with open(os.path.join(fp8, "config.json"), "w") as f:
        json.dump(config, f)
    return fp8, fp32


def hf_greedy(path: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = []
    for prompt in prompts():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(GREEDY.max_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
        result.append(ids[0, len(prompt):].tolist())
    return result


def greedy(path: str, **options) -> list[list[int]]:
    llm = LLM(path, **ENGINE_ARGS, **options)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def build(path: str, quantization: str | None = None) -> torch.nn.Module:
    config = Config(path, quantization=quantization, **ENGINE_ARGS)
    model = get_model_class(config.hf_config)(config.hf_config, config.quant_config)
    load_model(model, path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    return write_fp8_pair(str(tmp_path_factory.mktemp("fp8")))


@pytest.fixture(scope="module")
def reference(pair) -> list[list[int]]:
    tokens = hf_greedy(pair[1])
    assert len({t for seq in tokens for t in seq}) > 4  # the random weights give varied tokens
    return tokens


# ---- end to end ----------------------------------------------------------------------------------

def test_fp8_checkpoint_matches_its_dequantized_weights(pair, reference):
    assert greedy(pair[0]) == reference


def test_fp8_checkpoint_tp2(pair, reference):
    assert greedy(pair[0], tensor_parallel_size=2) == reference


def test_on_the_fly_quantization_of_representable_weights(pair, reference):
    assert greedy(pair[1], quantization="fp8") == reference


def test_on_the_fly_quantization_is_blockwise(tmp_path):
    path = write_float32(tmp_path, intermediate_size=320)  # a partial block at the edge
    original = build(path).model.layers[0].mlp.down_proj.weight.detach()
    quantized = build(path, quantization="fp8").model.layers[0].mlp.down_proj.weight.detach()
    assert quantized.dtype == torch.float32 and quantized.shape == original.shape == (256, 320)
    assert not torch.equal(quantized, original)
    for rows in (slice(0, 128), slice(128, 256)):
        for cols in (slice(0, 128), slice(128, 256), slice(256, 320)):
            block, got = original[rows, cols], quantized[rows, cols]
            scale = block.abs().max() / 448
            # round to nearest FP8: half a step, 2^-4 relative (normal) or 2^-10 * scale (subnormal)
            assert ((got - block).abs() <= block.abs() / 16 + scale / 1024 + 1e-7).all()
            assert got.abs().max().item() == pytest.approx(block.abs().max().item(), rel=1e-6)


def test_ignored_modules_stay_unquantized(tmp_path):
    fp8, fp32 = write_fp8_pair(str(tmp_path), ignored=("model.layers.1.mlp",))
    model = build(fp8)
    assert model.model.layers[1].mlp.gate_up_proj.quant_config is None
    assert model.model.layers[1].self_attn.qkv_proj.quant_config is not None
    assert greedy(fp8) == hf_greedy(fp32)


def test_dummy_weights_with_fp8(pair):
    for path, options in ((pair[0], {}), (pair[1], dict(quantization="fp8"))):  # FP8 params; bf16 quantized
        llm = LLM(path, load_format="dummy", **ENGINE_ARGS, **options)
        try:
            out = llm.generate(prompts(), GREEDY, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in out)
        finally:
            llm.shutdown()


# ---- refused configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("quant_method", "awq"), ("fmt", "e5m2"), ("activation_scheme", "static"),
                                          ("weight_block_size", [64, 64]), ("weight_block_size", None)])
def test_unsupported_quantization_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"quantization_config\.{field} .* is not supported; supported"):
        resolve_quant_config(None, dict(FP8_CONFIG, **{field: value}))


def test_quantization_option(pair):
    with pytest.raises(ValueError, match="quantization must be None or one of \\['fp8'\\], got 'int8'"):
        LLM(pair[1], quantization="int8", **ENGINE_ARGS)
    assert resolve_quant_config(None, None) is None
    assert resolve_quant_config("fp8", None) == Fp8Config(is_checkpoint_fp8_serialized=False)
    fp8 = Config(pair[0], **ENGINE_ARGS).quant_config
    assert fp8 == Fp8Config((128, 128), True, ("lm_head",))
    assert Config(pair[0], quantization="fp8", **ENGINE_ARGS).quant_config == fp8
    with pytest.raises(ValueError, match=r"ignores \['model.layers.0.self_attn.q_proj'\] but not"):
        Fp8Config(ignored_layers=("layers.0.self_attn.q_proj",)).for_layer(
            ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    assert Fp8Config(ignored_layers=("layers.1",)).for_layer(["model.layers.10.mlp.down_proj"]) is not None


def test_blocks_straddling_packed_shards_are_refused():
    config = Qwen3Config(architectures=["Qwen3ForCausalLM"], **{**SHAPE, "head_dim": 64, "num_attention_heads": 4,
                                                                 "num_key_value_heads": 1})  # k, v: 64 rows
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.qkv_proj: 64 output features per rank and "
                                         r"packed shard \(tensor_parallel_size=1\) is not a multiple of the FP8 "
                                         r"block size 128"):
        get_model_class(config)(config, Fp8Config(is_checkpoint_fp8_serialized=True))
    get_model_class(config)(config, Fp8Config())  # quantized at load time: blocks are cut per rank, per matrix


def test_blocks_straddling_ranks_are_refused(tmp_path):
    fp8, _ = write_fp8_pair(str(tmp_path), intermediate_size=384)  # 192 rows per rank at tp=2
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_up_proj: 192 output features per rank and "
                                         r"packed shard \(tensor_parallel_size=2\)"):
        LLM(fp8, tensor_parallel_size=2, **ENGINE_ARGS)


def test_quantize_weight_blockwise_reference():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.0]])
    q, scale = quantize_weight_blockwise(w, (BLOCK, BLOCK))
    assert scale.shape == (1, 1) and scale.item() == pytest.approx(3.0 / 448)
    assert q.float()[0, 1].item() == -448.0 and q.float()[1, 1].item() == 0.0
    zero_q, zero_scale = quantize_weight_blockwise(torch.zeros(3, 3), (BLOCK, BLOCK))
    assert torch.isfinite(zero_scale).all() and (zero_q.float() == 0).all()


# ---- kernels -------------------------------------------------------------------------------------

def test_fp8_kernels_interpreted():
    run_interpreted("fp8_gemm", M=5, N=192, K=320, configs=[[16, 64, 1], [16, 64, 2], [32, 128, 3], [16, 256, 5]])
    run_interpreted("fp8_gemm", M=1, N=130, K=256, few_rows_configs=[[16, 1], [64, 2]])
    # 10 groups: two quantization programs, the second partial; few rows: 3 splits of 4, 4, 2 blocks
    run_interpreted("fp8_gemm", M=2, N=128, K=1200, few_rows_configs=[[32, 3], [128, 10]])


def test_the_few_rows_kernel_takes_few_rows_with_few_output_tiles():
    """fp8_few_rows.use_few_rows: at most 16 rows, and output tiles of 64 features fewer than twice the SMs (off the
    GPU, 4 SMs are assumed: fewer than 8 tiles); the FP8 GEMM path takes the rest."""
    from nanovllm.layers.quantization.fp8_few_rows import use_few_rows
    cpu = torch.device("cpu")
    assert use_few_rows(1, 7 * 64, cpu) and use_few_rows(16, 1, cpu)
    assert not use_few_rows(17, 64, cpu) and not use_few_rows(1, 7 * 64 + 1, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_kernels_gpu():
    from kernel_checks.fp8_gemm import check
    for M in (1, 16, 100, 300):
        check("cuda", M=M, N=6144, K=4096, configs=[[16, 64, 4], [64, 128, 1], [128, 128, 1]],
              few_rows_configs=[[16, 1], [64, 8], [128, 32]])
    check("cuda", M=7, N=200, K=330, configs=[[16, 64, 2], [16, 128, 3]], few_rows_configs=[[32, 2], [16, 3]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cublas_found_under_the_loaders_default_dtype():
    """sm_90 with CUDA >= 12.9 has cuBLAS's block-scaled FP8 GEMM, and the check for it finds it while
    the model loader's default dtype is bfloat16 (where it runs in the engine)."""
    from nanovllm.layers.quantization.fp8_kernels import cublas_supported
    cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if torch.cuda.get_device_capability() != (9, 0) or cuda < (12, 9):
        pytest.skip("cuBLAS's block-scaled FP8 GEMM needs sm_90 and CUDA >= 12.9")
    cublas_supported.cache_clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert cublas_supported(torch.device("cuda", 0))
    finally:
        torch.set_default_dtype(default)
        cublas_supported.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_gpu_close_to_dequantized_float32(pair):
    """bf16 activations quantized per token and 128 columns: close to, not equal to, float32. Measured on
    an H200: worst relative gap 0.141 (transformers' bf16 run: 0.007); the bound leaves 40% above that."""
    hf = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).cuda().eval()
    batch, params = prompts() * 4, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = {}
    for name, path, options in (("fp8 checkpoint", pair[0], {}), ("eager", pair[0], dict(enforce_eager=True)),
                                ("on the fly", pair[1], dict(quantization="fp8"))):
        llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=256, **options)
        try:
            outputs[name] = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert outputs["on the fly"] == outputs["fp8 checkpoint"]  # the same FP8 weights, the same kernels
    hf_bf16 = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.bfloat16).cuda().eval()
    baseline = worst_relative_gap(hf, batch, hf_greedy_batch(hf_bf16, batch, params.max_tokens))
    for name, out in outputs.items():
        gap = worst_relative_gap(hf, batch, out)
        print(f"{name}: worst relative gap {gap:.4f}, transformers bf16 {baseline:.4f}")
        assert gap <= 0.2, name
