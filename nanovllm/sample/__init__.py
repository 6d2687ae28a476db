"""Next-token sampling on the device: the Sampler pipeline and its stages."""
