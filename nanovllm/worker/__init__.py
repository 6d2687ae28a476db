"""Running the model: the executor (rank 0 and its worker processes), the per-rank model runner,
step inputs and CUDA graphs."""
