"""Weight-quantization algorithms on plain tensors and decoder blocks (GPTQ, AWQ, learned
rounding, AdaDim); the passes in ``passes/`` wire them to graphs and calibration."""
