"""Peak memory of block-by-block calibration does not grow with the number of layers.

Builds tiny random Llamas of the same width with 4 and 16 layers and runs the calibration
engine (with round-to-nearest as its algorithm) on each in a fresh subprocess, reporting the
growth of the peak resident set (VmHWM) over the resident set just before calibration. An engine that kept every block's activations would grow
by one activation set (samples x seq_len x hidden floats) per layer.

    .venv/bin/python samples/calibration_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
from qcompile.calibration.engine import BlockAlgorithm, run_block_calibration
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

class RoundToNearest(BlockAlgorithm):
    # the engine is what is measured, so the cheapest algorithm: RTN per block
    label = "RTN"
    def process(self, job):
        for name, linear in job.linears().items():
            q = quantize_weight(linear.weight, WeightQuantSpec(4, 64))
            linear.weight.data = q.dequantize()
            job.qweights[job.path(name)] = q

torch.set_num_threads(1)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

layers, hidden, samples, seq_len, spill = (int(a) for a in sys.argv[1:6])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                     max_position_embeddings=seq_len)
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(0, 256, (samples, seq_len))
with torch.no_grad():
    model(input_ids=ids[:8], use_cache=False)  # warm allocator and kernels once
try:  # restart the high-water mark here, so the warm-up forward's peak is not counted
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
except OSError:
    pass
before = status("VmRSS")
result = run_block_calibration(model, ids, RoundToNearest(), batch_size=8, spill=bool(spill))
print(json.dumps({"layers": layers, "rss_before": before, "peak": status("VmHWM"),
                  "growth": status("VmHWM") - before, "weights": len(result.qweights),
                  "activation_set_bytes": samples * seq_len * hidden * 4}))
"""


def measure(layers: int, hidden: int = 256, samples: int = 64, seq_len: int = 256,
            spill: bool = False) -> dict:
    """Peak-RSS growth of calibrating a tiny Llama with ``layers`` blocks (fresh process)."""
    # a fixed mmap threshold: glibc otherwise raises it as large blocks are freed, and then
    # serves activations from a heap that keeps freed pages, which reads as growth (+-30 MiB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(layers), str(hidden), str(samples), str(seq_len),
         str(int(spill))],
        check=True, capture_output=True, text=True, timeout=600, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = [measure(layers, spill=spill) for spill in (False, True) for layers in (4, 16)]
    print(f"{'layers':>6} {'spill':>5} {'RSS before':>12} {'peak growth':>12} "
          f"{'one activation set':>19}")
    for (spill, row) in zip((False, False, True, True), rows):
        print(f"{row['layers']:>6} {spill!s:>5} {row['rss_before'] / 2**20:>10.1f} M "
              f"{row['growth'] / 2**20:>10.1f} M {row['activation_set_bytes'] / 2**20:>17.1f} M")


if __name__ == "__main__":
    main()
