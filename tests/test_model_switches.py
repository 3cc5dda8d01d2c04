"""The switch table (model_switches.py): every family reads from HF config.json and from
Megatron-LM's saved args into the same ModelArgs and back, megatron-core's GPTModel built from it
has exactly the tensor table's tensors, and what cannot run is refused with one line that names
the field."""
import json
import os
import shutil
from dataclasses import replace

import pytest

from seesaw_mc import model_switches as switches
from seesaw_mc.checkpoints.megatron_args import args_namespace, model_args_from_megatron
from seesaw_mc.errors import ConfigError, ModelError
from seesaw_mc.model_spec import load_model_args, megatron_tensor_shapes

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_lm_args_round_trip(tiny_models, family):
    args = load_model_args(tiny_models[family])
    back, tp, pp = model_args_from_megatron(args_namespace(args, 2, 1), "ckpt")
    # Megatron-LM has no sliding window or EOS; Mistral without a window is a Llama.
    arch = "LlamaForCausalLM" if family == "mistral" else args.architecture
    assert back == replace(args, architecture=arch, sliding_window=None, eos_token_ids=()) and (tp, pp) == (2, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(tiny_models, family, tmp_path):
    from seesaw_mc.checkpoints.hf_export import hf_config

    args = load_model_args(tiny_models[family])
    hf_config(args).save_pretrained(str(tmp_path))
    back = switches.from_hf(json.load(open(tmp_path / "config.json")), "x")
    assert back == {k: v for k, v in vars(args).items() if k in back}


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_table_is_megatron_cores(tiny_models, family):
    """megatron-core's GPTModel, built from the table's switches, holds exactly the tensors (and
    shapes) the tensor table lists: biases, LayerNorm biases, q/k norms, learned positions."""
    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    mc.init_megatron_parallel(1, 1)
    args = load_model_args(tiny_models[family])
    model = mc.megatron_gpt_model(args)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if "_extra_state" not in k}
    assert got == megatron_tensor_shapes(args)


def _patched(src, tmp_path, **changes):
    dst = str(tmp_path / "m")
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return dst


@pytest.mark.parametrize("family,changes,fragment", [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "unsupported rope_parameters type 'llama3'"),
    ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ("qwen3", {"architectures": ["Qwen3MoeForCausalLM"]}, "unsupported architecture 'Qwen3MoeForCausalLM'"),
    ("qwen3", {"attention_bias": True}, "unsupported attention_bias=True"),
    ("llama", {"attention_bias": True, "mlp_bias": False}, "unsupported mlp_bias=False"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "unsupported scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", {"activation_function": "relu"}, "unsupported activation_function 'relu'"),
    ("gpt2", {"n_head": 5}, "hidden size 72 is not a multiple of num_attention_heads 5"),
])
def test_unsupported_hf_configs_name_the_field(tiny_models, tmp_path, family, changes, fragment):
    with pytest.raises(ModelError) as e:
        load_model_args(_patched(tiny_models[family], tmp_path, **changes))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_sliding_window_caps_the_context(tiny_models, tmp_path):
    """Beyond the window the model attends differently: serving stops at the window."""
    from seesaw_mc.preflight import context_limit

    for family, changes in (("mistral", {"sliding_window": 64}),
                            ("qwen3", {"use_sliding_window": True, "sliding_window": 64})):
        args = load_model_args(_patched(tiny_models[family], tmp_path / family, **changes))
        assert context_limit(args, None) == 64
        with pytest.raises(ConfigError, match="exceeds the model's context of 64 tokens"):
            context_limit(args, 100)


@pytest.mark.parametrize("changes,fragment", [
    ({"num_experts": 8}, "mixture of experts (8 experts) (num_experts=8)"),
    ({"position_embedding_type": "yarn"}, "position embedding (position_embedding_type='yarn')"),
    ({"window_size": (64, 0)}, "sliding-window attention (window_size=(64, 0))"),
    ({"squared_relu": True}, "squared-ReLU MLP (squared_relu=True)"),
    ({"normalization": "L2Norm"}, "normalization (normalization='L2Norm')"),
    ({"rotary_percent": 0.5}, "partial rotary (rotary_percent=0.5)"),
    ({"swiglu": False}, "no HF architecture has this structure (closest: LlamaForCausalLM, which differs in "
                        "swiglu=False)"),
])
def test_unsupported_megatron_args_name_the_field(tiny_models, changes, fragment):
    ns = args_namespace(load_model_args(tiny_models["llama"]))
    vars(ns).update(changes)
    with pytest.raises(ModelError) as e:
        model_args_from_megatron(ns, "ckpt")
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family,biases", [("gpt2", True), ("qwen3", False), ("llama", True)])
def test_tp_split_and_merge_are_inverse(tiny_models, family, biases):
    """Every tensor of the table (biases, norms, q/k norms, positions) has a TP rule; merging the
    shards gives the tensor back; a gated fc1 (and its bias) stored interleaved for the engine's
    views shards exactly like the plain [gate; up] split."""
    import torch

    from seesaw_mc.model.sharding import interleave_fc1, merge_tp, shard_tensor, tp_rule

    args = replace(load_model_args(tiny_models[family]), linear_bias=biases)
    g = torch.Generator().manual_seed(0)
    for name, shape in megatron_tensor_shapes(args).items():
        assert tp_rule(name, args.gated_mlp) is not None, name
        full = torch.randn(shape, generator=g)
        if "word_embeddings" in name or "output_layer" in name:
            full = full[: shape[0] - shape[0] % 2]  # the vocab split pads; its merge is checked elsewhere
        shards = [shard_tensor(name, full, r, 2, args.num_kv_heads, 1, args.gated_mlp) for r in range(2)]
        assert torch.equal(merge_tp(name, shards, "x", args.gated_mlp), full), name
        if args.gated_mlp and ".linear_fc1." in name:
            inter = interleave_fc1(full, 2)
            for r in range(2):
                assert torch.equal(shard_tensor(name, inter, r, 2, args.num_kv_heads, 2), shards[r]), name
