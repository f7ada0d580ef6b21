"""moe_client.hf.attach on the five families' tiny models (fixtures/generate.py's definitions),
with a FAKE client that computes each MoE block with the block's own transformers code: the
attached model must compute exactly what the plain one does, send the right decoder-layer
indices, leave dense layers alone, and detach cleanly. Needs torch + transformers (skipped
without them); the real worker is exercised by scripts/parity."""

import sys
import unittest
from pathlib import Path

try:
    import torch
    import transformers  # noqa: F401

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "fixtures"))
    import generate as fixtures
except ImportError:  # pragma: no cover - the client itself needs neither
    torch = None

import moe_client.hf as hf

FAMILIES = {
    "qwen3_moe": [1, 2],
    "qwen2_moe": [1, 3],
    "mixtral": [0, 1],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
}


class BlockComputingClient:
    """FAKE expert tier: runs the model's own MoE block class (the unpatched method)."""

    def __init__(self, model):
        self.blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers)}
        self.calls = []

    def forward(self, layer, hidden_states, topk_ids=None, topk_weights=None):
        self.calls.append((layer, tuple(hidden_states.shape), topk_ids is not None))
        block = self.blocks[layer]
        out = type(block).forward(block, hidden_states)
        if topk_ids is not None:  # the router ran on the caller's side: check what it sent
            _, w, ids = block.gate(hidden_states.reshape(-1, hidden_states.shape[-1]))
            assert torch.equal(ids, topk_ids) and torch.equal(w, topk_weights)
        return out


@unittest.skipIf(torch is None, "torch/transformers not installed")
class Attach(unittest.TestCase):
    def model(self, name):
        case = next(c for c in fixtures.CASES if c.name == name)
        model, _ = fixtures.build_model(case)
        return model

    def test_families(self):
        for name, moe_layers in FAMILIES.items():
            with self.subTest(family=name):
                model = self.model(name)
                ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
                with torch.no_grad():
                    want = model(ids).logits
                client = BlockComputingClient(model)
                attachment = hf.attach(model, client)
                self.assertEqual(attachment.layers, moe_layers)
                with torch.no_grad():
                    got = model(ids).logits
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                self.assertEqual(sorted({c[0] for c in client.calls}), moe_layers)
                self.assertTrue(all(c[1] == (2, 5, model.config.hidden_size) for c in client.calls))
                with self.assertRaisesRegex(hf.UnsupportedModelError, "already attached"):
                    hf.attach(model, client)
                attachment.detach()
                client.calls.clear()
                with torch.no_grad():
                    model(ids)
                self.assertEqual(client.calls, [])
                with hf.attach(model, client, routing="local"):
                    with torch.no_grad():
                        got = model(ids).logits
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                self.assertTrue(all(c[2] for c in client.calls))

    def test_other_families_are_refused(self):
        config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with self.assertRaisesRegex(hf.UnsupportedModelError, r"model_type 'llama' .* supported are deepseek_v2"):
            hf.attach(model, object())
        with self.assertRaisesRegex(ValueError, "routing"):
            hf.attach(self.model("mixtral"), object(), routing="both")


if __name__ == "__main__":
    unittest.main()
