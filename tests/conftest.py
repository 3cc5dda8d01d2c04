import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (still run in CI)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random tiny checkpoints of each supported family, built with transformers."""
    from tiny_models import build_model

    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_model("llama", str(root / "llama"), layers=5, seed=1),
        "mistral": build_model("mistral", str(root / "mistral"), seed=2),
        # Qwen2 with QKV bias and tied embeddings (SmolLM2-style), GQA 6/2. Five layers:
        # pipeline splits over 2 and 4 stages are uneven.
        "qwen2": build_model("qwen2", str(root / "qwen2"), layers=5, heads=6, kv_heads=2, hidden=96, tied=True, seed=3),
        # GPT-2: LayerNorm, GELU (tanh), biases everywhere, learned positions, tied; 6 heads of 12,
        # a 200-wide MLP (not 4x), an odd vocabulary (TP pads it), 3 layers (uneven pp2).
        "gpt2": build_model("gpt2", str(root / "gpt2"), layers=3, hidden=72, heads=6, ffn=200, vocab_size=331,
                            tied=True, max_pos=256, seed=4),
        # Qwen3: q/k RMSNorm, head_dim 24 (not 64/4), GQA 4/2, untied, odd vocabulary (prompts use ids < 320).
        "qwen3": build_model("qwen3", str(root / "qwen3"), layers=3, hidden=64, heads=4, kv_heads=2, head_dim=24,
                             ffn=96, vocab_size=325, seed=5),
    }


@pytest.fixture(scope="session")
def demo_model():
    path = os.environ.get("SEESAW_DEMO_MODEL") or os.path.join(REPO, ".cache/models/SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(path, "config.json")):
        if os.environ.get("SEESAW_DEMO_MODEL"):
            pytest.fail(f"demo model missing at {path} (make model)")
        pytest.skip("demo model not prepared (run `make model`)")
    return path
