"""The model-zoo sweep: many architectures built offline from configs, each through the whole pipeline.

    python -m benchmarks.zoo_sweep [--only name,name] [--quick]

Per architecture (random weights, small configs so that the sweep runs on a 2-core CPU): capture →
partition → W4 round-to-nearest (asymmetric, per channel) → ONNX export → onnxruntime parity (fp32 MatMulNBits,
RMS relative error < 1e-4 against the PyTorch quantized model) → packed torch parity (``to_torch(packed=True)``,
relative squared error < 1e-8). A row records the stage that failed and the error; an ``InternalError`` (an
unexpected exception qcompile wrapped) is marked "internal" and any other non-``QCompileError`` "unhandled":
both are bugs to fix. Writes
``benchmarks/results/zoo_sweep.json`` and the table ``docs/zoo_sweep.md``. ``--quick`` runs ``QUICK`` (the CI
smoke subset, also run by tests/test_zoo_sweep.py).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import qcompile
from qcompile.errors import InternalError, QCompileError

from .common import write_results

PARITY_ONNX, PARITY_TORCH = 1e-4, 1e-8


def _images(size: int, batch: int = 2, channels: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, size, size, generator=generator) for _ in range(2)]


def _timm(name: str, size: int = 64, **kwargs) -> Callable:
    def build():
        import timm
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval(), _images(size)
    return build


def _tokens(vocab: int, mask: bool = True, types: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for batch, length in ((2, 12), (3, 9)):
        item = {"input_ids": torch.randint(vocab, (batch, length), generator=generator)}
        if mask:
            item["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        if types:
            item["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
        batches.append(item)
    return batches


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _hf(config_name: str, model_name: str, mask: bool = True, types: bool = False, vocab: int = 128,
        **overrides) -> Callable:
    def build():
        import transformers
        config_class = getattr(transformers, config_name)
        config = config_class(vocab_size=vocab, **overrides)
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config).eval()
        return model, _tokens(vocab, mask, types)
    return build


# name -> factory() returning (model in eval mode, calibration batches)
ZOO: dict[str, Callable] = {
    # timm CNNs
    "resnet18": _timm("resnet18"), "resnet50": _timm("resnet50"), "resnext26ts": _timm("resnext26ts"),
    "wide_resnet50_2": _timm("wide_resnet50_2"), "regnetx_002": _timm("regnetx_002"),
    "regnety_002": _timm("regnety_002"), "mobilenetv2_050": _timm("mobilenetv2_050"),
    "mobilenetv3_small_050": _timm("mobilenetv3_small_050"), "mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "efficientnet_b0": _timm("efficientnet_b0"), "efficientnet_lite0": _timm("efficientnet_lite0"),
    "convnext_atto": _timm("convnext_atto"), "convnextv2_atto": _timm("convnextv2_atto"),
    "densenet121": _timm("densenet121"), "ghostnet_050": _timm("ghostnet_050"), "mnasnet_050": _timm("mnasnet_050"),
    "dla34": _timm("dla34"), "repvgg_a0": _timm("repvgg_a0"), "vgg11": _timm("vgg11"),
    "res2net50_14w_8s": _timm("res2net50_14w_8s"), "cspresnet50": _timm("cspresnet50"),
    "rexnet_100": _timm("rexnet_100"), "mobilevit_xxs": _timm("mobilevit_xxs", size=64),
    "efficientformer_l1": _timm("efficientformer_l1", size=224),
    # timm transformers and MLPs (small depths / widths through model kwargs)
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", img_size=64, depth=2),
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", img_size=64, depth=2),
    "deit_tiny_distilled_patch16_224": _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=2),
    "swin_tiny_patch4_window7_224": _timm("swin_tiny_patch4_window7_224", size=224, embed_dim=32,
                                          depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    "beit_base_patch16_224": _timm("beit_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2),
    "mixer_s16_224": _timm("mixer_s16_224", img_size=64),
    "resmlp_12_224": _timm("resmlp_12_224", img_size=64),
    "cait_xxs24_224": _timm("cait_xxs24_224", img_size=64, depth=2),
    "pit_ti_224": _timm("pit_ti_224", size=224),
    "levit_128s": _timm("levit_128s", size=224),
    "poolformer_s12": _timm("poolformer_s12"),
    "coat_tiny": _timm("coat_tiny", size=224),
    # transformers: decoders
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", **SMALL, num_key_value_heads=2),
    "mistral": _hf("MistralConfig", "MistralForCausalLM", **SMALL, num_key_value_heads=2),
    "qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", **SMALL, num_key_value_heads=2),
    "qwen3": _hf("Qwen3Config", "Qwen3ForCausalLM", **SMALL, num_key_value_heads=2, head_dim=16),
    "gemma": _hf("GemmaConfig", "GemmaForCausalLM", **SMALL, num_key_value_heads=2, head_dim=16),
    "phi": _hf("PhiConfig", "PhiForCausalLM", **SMALL),
    "phi3": _hf("Phi3Config", "Phi3ForCausalLM", **SMALL, pad_token_id=0),
    "stablelm": _hf("StableLmConfig", "StableLmForCausalLM", **SMALL, num_key_value_heads=4),
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", mask=False, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **SMALL),
    "gptj": _hf("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
    "opt": _hf("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
    "bloom": _hf("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=4),
    "falcon": _hf("FalconConfig", "FalconForCausalLM", hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "codegen": _hf("CodeGenConfig", "CodeGenForCausalLM", n_embd=64, n_layer=2, n_head=4, n_positions=64,
                   rotary_dim=8),
    "gpt_bigcode": _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=64, n_layer=2, n_head=4, n_positions=64),
    # transformers: encoders
    "bert": _hf("BertConfig", "BertModel", types=True, **SMALL),
    "roberta": _hf("RobertaConfig", "RobertaModel", **{**SMALL, "max_position_embeddings": 80}),
    "distilbert": _hf("DistilBertConfig", "DistilBertModel", dim=64, hidden_dim=128, n_layers=2, n_heads=4),
    "albert": _hf("AlbertConfig", "AlbertModel", embedding_size=32, **SMALL),
    "electra": _hf("ElectraConfig", "ElectraModel", embedding_size=32, **SMALL),
    "deberta_v2": _hf("DebertaV2Config", "DebertaV2Model", **SMALL),
    "xlm_roberta": _hf("XLMRobertaConfig", "XLMRobertaModel", **{**SMALL, "max_position_embeddings": 80}),
    "t5_encoder": _hf("T5Config", "T5EncoderModel", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
    "bart": _hf("BartConfig", "BartModel", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64),
    "mpnet": _hf("MPNetConfig", "MPNetModel", **{**SMALL, "max_position_embeddings": 80}),
}
QUICK = ("resnet18", "vit_tiny_patch16_224", "llama", "bert", "dla34", "t5_encoder", "beit_base_patch16_224")


def _logits(output):
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0] if isinstance(output, (tuple, list)) else output


def _call(model, batch):
    return _logits(model(**batch) if isinstance(batch, dict) else model(batch))


def _onnx_feeds(session, batch) -> dict:
    names = [i.name for i in session.get_inputs()]
    if isinstance(batch, dict):
        return {k: v.numpy() for k, v in batch.items() if k in names}
    return {names[0]: batch.numpy()}


def sweep_one(name: str, factory: Callable) -> dict:
    """Run one architecture through every stage; the row says how far it got and why it stopped."""
    import onnxruntime as ort
    row = {"model": name, "stage": "build", "status": "fail", "error": None, "seconds": {}}
    stage_start = time.perf_counter()

    def finish(stage: str) -> None:
        nonlocal stage_start
        row["seconds"][stage] = round(time.perf_counter() - stage_start, 2)
        stage_start = time.perf_counter()

    try:
        model, calib = factory()
        finish("build")
        row["stage"] = "quantize"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qcompile.compile(model, calib, "w4a16-rtn", progress=False)
        report = qm.report()
        row["quantized_layers"] = sum(1 for r in report.layers if r.status == "quantized")
        row["float_layers"] = sum(1 for r in report.layers if r.status != "quantized")
        row["blocks"] = len(report.blocks)
        finish("quantize")
        row["stage"] = "onnx"
        with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(directory) / "model.onnx"
            qm.export_onnx(path)
            options = ort.SessionOptions()
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            errors = []
            for batch in calib:
                reference = _call(qm, batch).detach().double().numpy()
                value = session.run(None, _onnx_feeds(session, batch))[0].astype(np.float64)
                errors.append(float(np.sqrt(((reference - value) ** 2).mean() / max((reference ** 2).mean(), 1e-30))))
        row["onnx_error"] = max(errors)
        if row["onnx_error"] > PARITY_ONNX:
            raise AssertionError(f"onnxruntime parity: RMS relative error {row['onnx_error']:.2e} > {PARITY_ONNX}")
        finish("onnx")
        row["stage"] = "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = qm.to_torch(packed=True)
            errors = []
            for batch in calib:
                reference, value = _call(qm, batch).detach().double(), _call(packed, batch).detach().double()
                errors.append(float((reference - value).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)))
        row["torch_error"] = max(errors)
        if row["torch_error"] > PARITY_TORCH:
            raise AssertionError(f"packed torch parity: relative error {row['torch_error']:.2e} > {PARITY_TORCH}")
        finish("torch")
        row["stage"], row["status"] = "done", "pass"
    except Exception as error:  # noqa: BLE001 - the sweep records every failure
        row["status"] = ("internal" if isinstance(error, InternalError) else
                         "fail" if isinstance(error, (QCompileError, AssertionError)) else "unhandled")
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        row["traceback"] = traceback.format_exc(limit=-3)
    return row


def write_table(rows: list[dict], path: Path) -> None:
    passed = sum(row["status"] == "pass" for row in rows)
    lines = [f"# Model-zoo sweep ({time.strftime('%Y-%m-%d')})", "",
             "`python -m benchmarks.zoo_sweep` (see its docstring): capture → W4 RTN → ONNX + onnxruntime parity → "
             "packed torch parity, per architecture, random weights, small configs, 2-core CPU.", "",
             f"**{passed} / {len(rows)} pass end to end ({100 * passed / len(rows):.0f} %).**", "",
             "| model | result | stage reached | quantized / float layers | blocks | onnx err | torch err | seconds | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        layers = f"{row.get('quantized_layers', '-')} / {row.get('float_layers', '-')}"
        onnx_error, torch_error = (f"{row[key]:.1e}" if key in row else "-" for key in ("onnx_error", "torch_error"))
        error = (row["error"] or "").replace("|", "\\|")
        lines.append(f"| {row['model']} | {row['status']} | {row['stage']} | {layers} | {row.get('blocks', '-')} | "
                     f"{onnx_error} | {torch_error} | {sum(row['seconds'].values()):.1f} | {error} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(QUICK) if args.quick else list(ZOO)
    rows = []
    for name in names:
        row = sweep_one(name, ZOO[name])
        rows.append(row)
        print(f"{name:<34} {row['status']:<9} {row['stage']:<8} {sum(row['seconds'].values()):>6.1f}s  "
              f"{row['error'] or ''}", flush=True)
    passed = sum(row["status"] == "pass" for row in rows)
    print(f"{passed} / {len(rows)} pass")
    suffix = "" if names == list(ZOO) else "_subset"
    write_results(f"benchmarks/results/zoo_sweep{suffix}.json", rows, architectures=len(rows), passed=passed)
    if names == list(ZOO):
        write_table(rows, Path("docs/zoo_sweep.md"))


if __name__ == "__main__":
    main()
