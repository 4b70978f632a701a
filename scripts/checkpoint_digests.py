"""SHA-256 of the checkpoint every registered method and preset writes for one fixed small model.

A refactor that must not change a byte a user gets is checked by running this before and after
and comparing the two lists (``diff``): each line is ``spec  digest``, the digest taken over the
checkpoint's tensors file and quantization map (the report, which holds timings, is left out).

    python scripts/checkpoint_digests.py > before.txt
    ... change the code ...
    python scripts/checkpoint_digests.py | diff before.txt -

The model is a 2-block random LLaMA (hidden 256, so OBC blocks of 128 columns and the salient
search see more than one block), calibrated on 4 windows of 64 random token ids (seed 0). With
``--smollm2`` it is the real SmolLM2-135M on 16 C4 sequences of 256 tokens (seed 0; two calibration
batches, as every real run has several; a few minutes a spec): its widths (576, 1536, not powers of 2)
and real weights reach paths the small model does not.
Run it twice to check that one command gives the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

import billm
from billm.methods import config_classes

EXTRA_SPECS = ("gptq:w2g128a", "gptq:w3g64", "rtn:w2", "billm:plus+hadamard", "billm:tiny+hadamard",
               "slim:w2+hadamard", "arb:hadamard", "billm:reference+b64", "billm:tiny+rec5",
               "lowrank:b1+rec5+reconstruct_signs", "gptq:w2g128+rec5+reconstruct_target=fpinputs")


def specs() -> list[str]:
    """Every registered method with its default config, each of its presets, and a few combined options."""
    out = []
    for cls in config_classes():
        out.append(cls.method)
        out += [f"{cls.method}:{p}" for p in cls.presets]
    return out + [s for s in EXTRA_SPECS if s not in out]


def tiny_llama():
    """The fixed 2-block random LLaMA the digests are taken on."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def smollm2(data_dir):
    """(SmolLM2-135M as ``billm.load_model`` loads it, 16 x 256 C4 calibration token ids, seed 0)."""
    from billm.data.tokens import get_calibration_batches
    from billm.model.loading import load_model

    model, tok = load_model(None)
    return model, get_calibration_batches("c4", tok, nsamples=16, seqlen=256, seed=0, data_dir=data_dir)


def digest(spec: str, model, ids: torch.Tensor) -> str:
    """The SHA-256 over the tensors file and the quantization map of ``spec``'s checkpoint of ``model`` (changed
    in place)."""
    billm.quantize(model, ids, billm.config_from_spec(spec), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(billm.save(model, Path(tmp) / "ck"))
        h = hashlib.sha256()
        for name in sorted(p.name for p in out.iterdir() if p.name != "billm_report.json"):
            h.update(name.encode() + b"\0" + (out / name).read_bytes())
        return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated specs (default: every method and preset)")
    ap.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M (give --only: minutes a spec)")
    ap.add_argument("--data-dir", help="the local C4 copy for --smollm2 (see docs/data.md)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch's CPU threads (default 1: the same reductions on every run; compare lists at one count)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smollm2:
        model, ids = smollm2(args.data_dir)
        fresh = lambda: copy.deepcopy(model)  # noqa: E731
    else:
        ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
        fresh = tiny_llama
    for spec in (args.only.split(",") if args.only else specs()):
        print(f"{spec:24s} {digest(spec, fresh(), ids)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
