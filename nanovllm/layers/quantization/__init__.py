"""Weight quantization: the scheme (`config`), the FP8 linear method (`fp8`) and its Triton
kernels (`fp8_kernels`)."""
