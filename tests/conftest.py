"""Small real models built offline (random init, fixed seeds) and their calibration data."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*is in train mode.*")


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return ((reference.float() - approx.float()).pow(2).sum() / reference.float().pow(2).sum()).item()


def logits(output):
    return output.logits if hasattr(output, "logits") else output


def call(model, batch):
    if isinstance(batch, dict):
        return logits(model(**batch))
    if isinstance(batch, (tuple, list)):
        return logits(model(*batch))
    return logits(model(batch))


def _timm(name, **kwargs):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(size, batches=(4, 2)):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, size, size, generator=generator) for b in batches]


def _tokens(vocab, shapes=((2, 16), (3, 11)), mask=True):
    generator = torch.Generator().manual_seed(2)
    batches = []
    for b, s in shapes:
        batch = {"input_ids": torch.randint(vocab, (b, s), generator=generator)}
        if mask:
            batch["attention_mask"] = torch.ones(b, s, dtype=torch.long)
        batches.append(batch)
    return batches


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class UserNet(torch.nn.Module):
    """A plain user module: conv stem, a residual pair of convs, a matmul with a parameter, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv_a = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.projection = torch.nn.Parameter(torch.randn(16, 32) / 4)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv_b(torch.relu(self.conv_a(x))))
        x = x.mean(dim=(2, 3)) @ self.projection
        return self.head(torch.relu(x))


def user_net():
    torch.manual_seed(0)
    return UserNet().eval()


# name -> (factory, calibration batches); every model the spine must support.
MODELS = {
    "resnet18": (lambda: _timm("resnet18"), lambda: _images(64)),
    "mobilenetv3_small_100": (lambda: _timm("mobilenetv3_small_100"), lambda: _images(64)),
    "vit_tiny_patch16_224": (lambda: _timm("vit_tiny_patch16_224"), lambda: _images(224, (2, 1))),
    "convnext_atto": (lambda: _timm("convnext_atto"), lambda: _images(64)),
    "llama": (llama, lambda: _tokens(256)),
    "gpt2": (gpt2, lambda: _tokens(256, mask=False)),
    "user_net": (user_net, lambda: _images(16)),
}


@pytest.fixture(params=sorted(MODELS))
def model_and_calib(request):
    factory, calib = MODELS[request.param]
    return request.param, factory(), calib()
