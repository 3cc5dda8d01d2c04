"""Tiny random checkpoints built with transformers itself (no downloads)."""
from __future__ import annotations

import os
import random

import torch

CORPUS_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hum tunes about "
    "paris london berlin rome madrid summary abstract method result table figure model data "
    "throughput latency memory cache token prefill decode tensor pipeline parallel layout"
).split()


def build_tokenizer(out_dir: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(out_dir)
    return fast


def build_model(kind: str, out_dir: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                tied: bool = False, seed: int = 0, vocab_size: int = 320, max_pos: int = 512, head_dim: int = 0,
                ffn: int = 0, initializer_range: float = 0.15, device: str = "cpu",
                save_dtype: torch.dtype = None) -> str:
    """Save a random HF model of the given family (llama | mistral | qwen2 | qwen3 | gpt2) plus
    tokenizer. head_dim/ffn: 0 = the family's default (hidden/heads; 2x hidden, GPT-2 4x);
    device: where the weights are drawn (a GPU draws a 1B model in a blink); save_dtype: the
    checkpoint's dtype (default fp32). The tokenizer keeps its small vocabulary even when
    vocab_size is larger."""
    import transformers as tf

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir, min(vocab_size, 320))
    # A larger init than the default 0.02 gives peaked logits: greedy ties between nearly equal
    # logits would make a token-exact comparison flaky.
    common = dict(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id, initializer_range=initializer_range, tie_word_embeddings=tied)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn or None, n_positions=max_pos,
                            activation_function="gelu_new", **common)
        model_cls = tf.GPT2LMHeadModel
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[kind]
        kw = dict(hidden_size=hidden, intermediate_size=ffn or 2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                  rope_theta=1000000.0 if kind.startswith("qwen") else 10000.0, **common)
        if head_dim:
            kw["head_dim"] = head_dim
        if kind == "mistral":
            kw["sliding_window"] = max_pos
        cfg, model_cls = cls[0](**kw), cls[1]
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(cfg).eval()
    if kind in ("gpt2", "qwen3"):
        _randomize_biases_and_norms(model)
    if save_dtype is not None:
        model.to(save_dtype)
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def _randomize_biases_and_norms(model) -> None:
    """transformers initialises biases to 0 and norm weights to 1, which would leave a wrongly
    placed bias or q/k norm unnoticed: give every one of them random values."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.normal_(0.0, 0.2)
        elif p.dim() == 1:  # LayerNorm / RMSNorm weights (q_norm, k_norm included)
            p.normal_(1.0, 0.2)


def hf_greedy(model_dir: str, prompts, max_new_tokens: int, dtype=torch.float32, device="cpu"):
    """Reference: HF transformers generate, one prompt at a time (no padding), greedy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            y = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                               temperature=None, pad_token_id=model.config.eos_token_id)
            outs.append(y[0, len(ids):].tolist())
    return outs
