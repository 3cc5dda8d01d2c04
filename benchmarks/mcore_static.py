"""Baseline: megatron-core's own static inference engine (StaticInferenceEngine, legacy path)
on the same ranks, at one TP x PP layout, from a torch_dist checkpoint of the same model.

megatron-core 0.16's inference code assumes CUDA in a few places the engine's own adapter does
not reach (tensor.cuda(), torch.cuda.Event timing, a causal mask allocated on "cuda", an
is_cuda assertion before pipeline broadcasts). `cpu_shims()` stands in for each on CPU-only
hosts, for this baseline only. Greedy output equals HF generate at TP1, TP2 and PP2 (checked by
tests/test_planner.py::test_mcore_static_baseline_matches_hf).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time


@contextlib.contextmanager
def cpu_shims():
    import torch

    from seesaw_mc.parallel import megatron_adapter as mc

    if mc.HAS_CUDA:
        yield
        return
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.inference.communication_utils as comm_utils

    class Event:  # torch.cuda.Event for the controller's per-step timing
        def __init__(self, **_):
            self.t = 0.0

        def record(self, *_):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    saved = (torch.Tensor.cuda, torch.cuda.Event, fused_softmax.get_default_causal_mask, comm_utils._is_cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.Event = Event
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    comm_utils._is_cuda = lambda tensor: None
    try:
        with mc.cpu_device_shim():
            yield
    finally:
        torch.Tensor.cuda, torch.cuda.Event, fused_softmax.get_default_causal_mask, comm_utils._is_cuda = saved


def ensure_checkpoint(hf_dir: str, out_dir: str) -> str:
    """HF folder -> torch_dist (seesaw-mc convert) once; rank 0 converts, the others wait."""
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(os.path.join(out_dir, "latest_checkpointed_iteration.txt")):
        r = subprocess.run([sys.executable, "-m", "seesaw_mc", "convert", "--input", hf_dir, "--output", out_dir],
                           capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                             "MASTER_ADDR", "MASTER_PORT")})
        if r.returncode:
            raise RuntimeError(f"convert {hf_dir}: {r.stderr.strip().splitlines()[-1]}")
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def build(ckpt: str, tp: int, pp: int, max_batch_size: int, max_seq_len: int):
    """(StaticInferenceEngine, ModelArgs) on this rank, weights loaded by dist_checkpointing."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.text_generation_controllers.text_generation_controller import \
        TextGenerationController

    from seesaw_mc.checkpoints.detect import iteration_dir
    from seesaw_mc.checkpoints.megatron_args import allowed_globals, load_pt, model_args_from_megatron
    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    d = iteration_dir(ckpt)
    args, _, _ = model_args_from_megatron(load_pt(os.path.join(d, "common.pt"))["args"], d)
    mc.init_megatron_parallel(tp, pp)
    model = mc.megatron_gpt_model(args)
    with cpu_shims(), allowed_globals():  # common.pt holds the args (argparse.Namespace)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    model.load_state_dict(state["model"], strict=False)

    class TokenIds:  # prompts arrive as token ids; nothing to detokenize for a throughput run
        bos, eod, vocab_size = None, -1, args.vocab_size

        def tokenize(self, ids):
            return list(ids)

        def detokenize(self, ids, **_):
            return ""

    with cpu_shims():
        cfg = InferenceWrapperConfig(hidden_size=args.hidden_size, params_dtype=torch.float32,
                                     inference_batch_times_seqlen_threshold=-1, padded_vocab_size=args.vocab_size,
                                     inference_max_requests=max_batch_size, inference_max_seq_length=max_seq_len)
        controller = TextGenerationController(GPTInferenceWrapper(model, cfg), TokenIds())
        engine = StaticInferenceEngine(controller, max_batch_size=max_batch_size, legacy=True)
    return engine, args


def generate(engine, prompts, output_lens) -> list:
    """Greedy (top_k 1), every request to exactly its length (no termination id)."""
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import SamplingParams

    reqs = [InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(p),
                             sampling_params=SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=n,
                                                            termination_id=-1))
            for i, (p, n) in enumerate(zip(prompts, output_lens))]
    with cpu_shims():
        done = engine.generate(inference_requests=reqs)
    return [list(map(int, r.generated_tokens))[:n] for r, n in zip(done, output_lens)]


def main() -> int:
    """Greedy tokens of a few prompts through megatron-core's static engine, as JSON on rank 0:
    torchrun --nproc-per-node 2 benchmarks/mcore_static.py MODEL CKPT pp2 8 '[[5,6,7],[9,10]]'"""
    import json

    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from seesaw_mc.config import Layout
    from seesaw_mc.parallel import megatron_adapter as mc

    model, ckpt, layout, n, prompts = sys.argv[1], sys.argv[2], Layout.parse(sys.argv[3]), int(sys.argv[4]), \
        json.loads(sys.argv[5])
    mc.init_distributed()
    ensure_checkpoint(model, ckpt)
    engine, _ = build(ckpt, layout.tp, layout.pp, len(prompts), max(map(len, prompts)) + n)
    out = generate(engine, prompts, [n] * len(prompts))
    if dist.get_rank() == 0:
        print("TOKENS " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    raise SystemExit(main())
