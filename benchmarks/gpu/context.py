"""What every check shares: the device, the sizes of this run (an H200, or tiny ones for the
CPU dry run), the models (built once per process) and our engines (kept between checks: an
engine start converts the weights again)."""
from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for _p in (REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

# A Llama-3.2-1B-like shape (untied, vocab 32000): 1.10e9 parameters, 2.2 GB in bf16.
BIG_1B = dict(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8, vocab_size=32000, max_pos=4096)

GPU_SIZES = dict(
    prompts=4, new_tokens=32, big=BIG_1B,
    roof_batches=(1, 16, 128), roof_prompt=512, roof_steps=64,
    prefill_batch=16, prefill_len=1024,
    copy_bytes=1 << 30, matmul_n=8192, tier_blocks=2048,  # 2048 blocks of the 1B's KV: 1 GiB
    attn=dict(batch=64, max_len=2048, heads=32, kv_heads=8, head_dim=128, reps=20),
    # 64 sharegpt-like requests at half length: HF runs 1533 padded steps in 2 batches of 32.
    throughput=dict(num_prompts=64, scale=0.5, hf_batch=32),
    kv_bytes=8 << 30, tiny_kv_bytes=256 << 20,
)
DRY_SIZES = dict(
    prompts=3, new_tokens=8, big=None,  # the dry run stands the tiny Llama in for the 1B
    roof_batches=(1, 4), roof_prompt=24, roof_steps=6,
    prefill_batch=2, prefill_len=48,
    copy_bytes=8 << 20, matmul_n=128, tier_blocks=32,
    attn=dict(batch=5, max_len=70, heads=4, kv_heads=2, head_dim=16, reps=2),
    throughput=dict(num_prompts=4, scale=0.05, hf_batch=4),
    kv_bytes=64 << 20, tiny_kv_bytes=64 << 20,
)
# The test models of tests/conftest.py, same shapes and seeds.
TINY = {
    "llama": dict(layers=5, seed=1),
    "mistral": dict(seed=2),
    "qwen2": dict(layers=5, heads=6, kv_heads=2, hidden=96, tied=True, seed=3),
}


class Ctx:
    def __init__(self, dry_run: bool, workdir=None):
        self.dry_run = dry_run
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --dry-run")
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES
        self.workdir = workdir or tempfile.mkdtemp(prefix="seesaw-gpu-check-")
        os.makedirs(self.workdir, exist_ok=True)
        if workdir is None:
            atexit.register(shutil.rmtree, self.workdir, True)
        self._models = {}
        self._llms = {}
        self.facts = {}  # what one check learned that a later one uses (e.g. the kernels that load)

    def describe(self) -> dict:
        d = {"device": str(self.device), "dry_run": self.dry_run, "workdir": self.workdir}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            d.update(name=props.name, memory_GiB=round(props.total_memory / 2**30, 1),
                     capability=".".join(map(str, torch.cuda.get_device_capability(self.device))),
                     sms=props.multi_processor_count, cuda=torch.version.cuda)
        import seesaw_mc

        d["seesaw_mc"] = os.path.dirname(seesaw_mc.__file__)
        return d

    def tiny_model(self, family: str) -> str:
        from tiny_models import build_model

        if family not in self._models:
            self._models[family] = build_model(family, os.path.join(self.workdir, family), **TINY[family])
        return self._models[family]

    def big_model(self) -> str:
        """The ~1B Llama, drawn on the GPU (random init, std 0.02 as Llama's config says) and
        saved in bf16; in the dry run, the tiny Llama."""
        from tiny_models import build_model

        spec = self.sizes["big"]
        if spec is None:
            return self.tiny_model("llama")
        if "big" not in self._models:
            s = dict(spec)
            self._models["big"] = build_model(
                "llama", os.path.join(self.workdir, "llama-1b"), layers=s["layers"], hidden=s["hidden"],
                ffn=s["ffn"], heads=s["heads"], kv_heads=s["kv_heads"], vocab_size=s["vocab_size"],
                max_pos=s["max_pos"], initializer_range=0.02, device=str(self.device), save_dtype=torch.bfloat16)
        return self._models["big"]

    def is_big(self, path: str) -> bool:
        return path == self._models.get("big" if self.sizes["big"] is not None else "llama")

    def llm(self, path: str, dtype: str, kernels: str = "torch"):
        """Our engine on `path` (one per model and dtype, kept). Kernels default to torch's
        RMSNorm, as HF computes it: the kernels check measures the others."""
        from seesaw_mc import LLM

        key = (path, dtype, kernels)
        if key not in self._llms:
            kv = self.sizes["kv_bytes" if self.is_big(path) else "tiny_kv_bytes"]
            self._llms[key] = LLM(path, dtype=dtype, kernels=kernels, kv_cache_memory_bytes=kv)
        return self._llms[key]

    def drop_llms(self, path=None) -> None:
        for key in [k for k in self._llms if path is None or k[0] == path]:
            del self._llms[key]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def dtype(self, name: str) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
