"""Megatron checkpoints written by megatron-core itself, for tests/test_checkpoints.py.

    python megatron_worker.py logits SRC OUT.pt              # 1 process: GPTModel TP1 forward
    torchrun --nproc-per-node 4 megatron_worker.py dist SRC DST 2 2     # reshard SRC -> TP2PP2 torch_dist
    torchrun --nproc-per-node 2 megatron_worker.py legacy SRC DST 2     # -> legacy mp_rank_0X (TP2)
SRC is a torch_dist checkpoint (from `seesaw-mc convert`); megatron-core's dist_checkpointing
reshards it into the GPTModel built for the target TP/PP, which then saves itself.
"""
import os
import random
import sys
import warnings

warnings.filterwarnings("ignore")


def load_gpt(src, tp, pp):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from seesaw_mc.checkpoints.detect import iteration_dir
    from seesaw_mc.checkpoints.megatron_args import allowed_globals, load_pt, model_args_from_megatron
    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    d = iteration_dir(src)
    common = load_pt(os.path.join(d, "common.pt"))
    args, _, _ = model_args_from_megatron(common["args"], d)
    mc.init_megatron_parallel(tp, pp)
    model = mc.megatron_gpt_model(args)
    with mc.cpu_device_shim(), allowed_globals():  # common.pt holds the args (argparse.Namespace)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    model.load_state_dict(state["model"], strict=False)
    return args, model, dist


def main():
    import numpy as np
    import torch

    mode, src = sys.argv[1], sys.argv[2]
    if mode == "logits":
        args, model, _ = load_gpt(src, 1, 1)
        from seesaw_mc.parallel import megatron_adapter as mc

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, args.vocab_size - 3, (1, 17), generator=g)
        torch.save({"ids": ids, "logits": mc.megatron_gpt_logits(model, ids)}, sys.argv[3])
        return
    dst, tp = sys.argv[3], int(sys.argv[4])
    pp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    args, model, dist = load_gpt(src, tp, pp)
    from megatron.core import parallel_state

    from seesaw_mc.checkpoints.megatron_args import args_namespace
    from seesaw_mc.checkpoints.torch_dist import save_megatron

    if mode == "dist":
        save_megatron(dst, model, args, iteration=7, tp=tp, pp=pp)
        return
    # legacy: what Megatron-LM's save_checkpoint writes per rank (no optimizer here), rng state included
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
    d = os.path.join(dst, "iter_0000003", name)
    os.makedirs(d, exist_ok=True)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    torch.save({"model": model.state_dict(), "args": args_namespace(args, tp, pp), "checkpoint_version": 3.0,
                "iteration": 3, "rng_state": [rng]}, os.path.join(d, "model_optim_rng.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")


if __name__ == "__main__":
    main()
