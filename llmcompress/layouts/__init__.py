"""The serving formats' tensor layouts (compressed-tensors, GPTQ v1) as pure functions on packed
tensors: the exporters write them and the checkpoint loader reads them back, so they sit below both."""
