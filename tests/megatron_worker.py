"""Megatron checkpoints written by megatron-core itself, for tests/test_checkpoints.py.

    python megatron_worker.py logits SRC OUT.pt              # 1 process: GPTModel TP1 forward
    torchrun --nproc-per-node 4 megatron_worker.py dist SRC DST 2 2     # reshard SRC -> TP2PP2 torch_dist
    torchrun --nproc-per-node 4 megatron_worker.py dist+legacy SRC DST 2 2 LEGACY_DST   # both formats
    torchrun --nproc-per-node 2 megatron_worker.py legacy SRC DST 2     # -> legacy mp_rank_0X (TP2)
    torchrun --nproc-per-node 2 megatron_worker.py classic LEGACY DIST  # a classic GPT, fresh, TP2: both formats
    python megatron_worker.py classic_greedy DIST OUT.pt     # its greedy tokens by megatron-core's forward
SRC is a torch_dist checkpoint (from `seesaw-mc convert`); megatron-core's dist_checkpointing
reshards it into the GPTModel built for the target TP/PP, which then saves itself.
"""
import argparse
import os
import random
import sys
import warnings
import zlib

warnings.filterwarnings("ignore")


def load_gpt(src, tp, pp, build=None):
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
    model = build(common["args"]) if build else mc.megatron_gpt_model(args)
    with mc.cpu_device_shim(), allowed_globals():  # common.pt holds the args (argparse.Namespace)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    model.load_state_dict(state["model"], strict=False)
    return args, model, dist


# -- Megatron's classic GPT (pretrain_gpt.py without the Llama flags) ---------------------------
def classic_args(tp):
    """What Megatron-LM saves for a classic GPT: its defaults (LayerNorm, erf GELU, biases, learned
    positions, tied), num_query_groups=1 without group_query_attention, a vocabulary of 320
    padded to a multiple of 128 x tp."""
    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, kv_channels=16,
        group_query_attention=False, num_query_groups=1, normalization="LayerNorm", norm_epsilon=1e-5, swiglu=False,
        openai_gelu=False, squared_relu=False, add_bias_linear=True, add_qkv_bias=False, qk_layernorm=False,
        position_embedding_type="learned_absolute", rotary_percent=1.0, untie_embeddings_and_output_weights=False,
        max_position_embeddings=128, seq_length=128, vocab_size=320, padded_vocab_size=512, num_experts=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, bf16=False, fp16=False)


def classic_gpt(ns):
    """A GPTModel on megatron-core's own defaults, which are the classic recipe (not our switch
    table: this is the reference the table is checked against)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seesaw_mc.parallel import megatron_adapter as mc

    torch.manual_seed(1234)  # CPU initialisation draws each full tensor, then takes this rank's slice
    cfg = TransformerConfig(num_layers=ns.num_layers, hidden_size=ns.hidden_size, ffn_hidden_size=ns.ffn_hidden_size,
                            num_attention_heads=ns.num_attention_heads, init_method_std=0.15,
                            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    with mc.cpu_device_shim():
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=ns.padded_vocab_size,
                         max_sequence_length=ns.max_position_embeddings, share_embeddings_and_output_weights=True)
    return model.eval()


def randomize_biases_and_norms(model, tp_rank):
    """megatron-core initialises biases to 0 and LayerNorm to (1, 0); random values make a bias or
    norm in the wrong place visible. A TP-split bias draws per rank, a replicated one alike on all."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            split = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (1000 * tp_rank if split else 0))
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("layernorm.weight") else 0.0))


def classic(leg_dst, dist_dst):
    from megatron.core import parallel_state

    from seesaw_mc.checkpoints.torch_dist import save_megatron
    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    mc.init_megatron_parallel(2, 1)
    ns = classic_args(2)
    model = classic_gpt(ns)
    randomize_biases_and_norms(model, parallel_state.get_tensor_model_parallel_rank())
    save_legacy(leg_dst, model, ns, parallel_state.get_tensor_model_parallel_rank(), 0, 1)
    save_megatron(dist_dst, model, ns, iteration=5)


def classic_greedy(src, out, n=4, new=10):
    """megatron-core's forward (TP1, dist_checkpointing reshards the TP2 save), full recompute per
    token, greedy."""
    import torch

    from seesaw_mc.parallel import megatron_adapter as mc

    _, model, _ = load_gpt(src, 1, 1, build=classic_gpt)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 317) for _ in range(rng.randint(3, 30))] for _ in range(n)]
    outs, first_logits = [], None
    for p in prompts:
        ids = torch.tensor([p])
        for _ in range(new):
            logits = mc.megatron_gpt_logits(model, ids)
            first_logits = logits if first_logits is None else first_logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        outs.append(ids[0, len(p):].tolist())
    torch.save({"prompts": prompts, "tokens": outs, "ids": torch.tensor([prompts[0]]), "logits": first_logits}, out)


def save_legacy(dst, model, ns, t, p, pp):
    """What Megatron-LM's save_checkpoint writes per rank (no optimizer here), rng state included."""
    import numpy as np
    import torch
    import torch.distributed as dist

    name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
    d = os.path.join(dst, "iter_0000003", name)
    os.makedirs(d, exist_ok=True)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    torch.save({"model": model.state_dict(), "args": ns, "checkpoint_version": 3.0, "iteration": 3,
                "rng_state": [rng]}, os.path.join(d, "model_optim_rng.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")


def main():
    import torch

    mode, src = sys.argv[1], sys.argv[2]
    if mode == "classic":
        return classic(src, sys.argv[3])
    if mode == "classic_greedy":
        return classic_greedy(src, sys.argv[3])
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

    if mode in ("dist", "dist+legacy"):
        save_megatron(dst, model, args, iteration=7, tp=tp, pp=pp)
        if mode == "dist":
            return
        dst = sys.argv[6]  # dist+legacy: the same loaded model in both formats, one launch
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    save_legacy(dst, model, args_namespace(args, tp, pp), t, p, pp)


if __name__ == "__main__":
    main()
