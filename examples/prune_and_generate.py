"""Prune visual tokens with a calibration while generating, and show what was kept.

    python examples/prune_and_generate.py                          # the demo model's folder
    python examples/prune_and_generate.py --model /models/llava-1.5-7b-hf --method posprune --keep 64

The model folder must hold a posbias_calibration.json next to its config.json: ship one with
``examples/calibrate_then_ship.py`` (or ``profile-bias --model FOLDER`` then ``profile-bias export``).

Which method: ``posprune-pbc`` scores each token by its attention minus the fitted positional bias and keeps
the top k (the correction alone); ``posprune`` adds PosPrune's region-aware vision-side pruning (ARP) and
diversity-aware selection (MMR), the full method of the paper; ``pore`` divides by PoRe's exponential;
``fastv`` uses the raw attention (no calibration entry needed). See docs/runtime.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from skimage import data as images

from posbias.models import demo_model_dir, load_adapter
from posbias.runtime import Calibration, enable_pruning


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder with a calibration (default: the demo-llava folder)")
    p.add_argument("--method", default="posprune", help="fastv, pore, posprune-pbc, posprune, adaptprune, utp")
    p.add_argument("--keep", type=int, default=64, help="visual tokens kept after the pruning layer")
    p.add_argument("--max-new-tokens", type=int, default=12, help="answer length")
    args = p.parse_args(argv)

    folder = Path(args.model) if args.model else demo_model_dir("demo-llava")
    adapter = load_adapter(str(folder))            # adapter.model: the transformers model; adapter.prepare: its inputs
    model = adapter.model
    inputs = adapter.prepare(Image.fromarray(images.astronaut()), "What is in the image?")
    cal = Calibration.from_pretrained(folder)      # finds and validates folder/posbias_calibration.json

    def answer(out: torch.Tensor) -> str:
        return adapter.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        with enable_pruning(model, cal, method=args.method, keep=args.keep) as pruner:  # fingerprint checked first
            pruned = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    rec = pruner.last                              # what the last prefill kept
    rows, cols = adapter.layout(inputs).grid
    kept = rec.kept.tolist()
    print(f"{args.method}: kept {len(kept)} of {rec.n_visual} visual tokens after layer {rec.stages[-1][0]}")
    print("kept per grid row:", [sum(1 for k in kept if k // cols == r) for r in range(rows)])
    print(f"full answer:   {answer(full)!r}")
    print(f"pruned answer: {answer(pruned)!r}")
    return {"kept": kept, "n_visual": rec.n_visual, "full": answer(full), "pruned": answer(pruned)}


if __name__ == "__main__":
    main()
