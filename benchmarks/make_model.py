"""Random Llama checkpoints for the benchmarks (no hub access: built with transformers itself).

    python benchmarks/make_model.py --preset llama-57m --output .cache/models/random-llama-57m
    python benchmarks/make_model.py --preset llama-wide-222m --output .cache/models/random-llama-wide-222m
    python benchmarks/make_model.py --preset llama-30m --output .cache/models/random-llama-30m

llama-57m        8 layers, hidden 512, 8/4 heads, vocab 32000 (the default CPU benchmark model).
llama-30m        llama-57m's layers with vocab 8192 (32M parameters): the model of the vLLM comparison
                 (benchmarks/vs_vllm.py), where the small vocabulary keeps the time in the layers.
llama-wide-222m  4 layers, hidden 2048, 16/8 heads, ffn 5632, vocab 8192. For the rate-limited test bed:
                 what decides Seesaw's regime is the ratio of all-reduce bytes to FLOPs (hidden/dtype
                 bytes, see seesaw_mc/planner/) and of per-layer time to all-reduce latency; a wide,
                 shallow model keeps both nearer a 13B-class model on PCIe GPUs than a narrow, deep one.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {
    "llama-57m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4),
    "llama-30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4),
    "llama-wide-222m": dict(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                            num_attention_heads=16, num_key_value_heads=8),
}


def build(preset: str, path: str) -> str:
    import torch
    import transformers as tf

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from tiny_models import build_tokenizer

    os.makedirs(path, exist_ok=True)
    build_tokenizer(path)
    cfg = tf.LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **PRESETS[preset])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-57m")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    print(build(a.preset, a.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
