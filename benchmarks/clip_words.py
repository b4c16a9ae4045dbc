"""How far a CLIP's text encoder separates prompts that differ in one word (the conditioning the
U-Net and the adapter see): for each swap of one attribute word in a base prompt, the cosine of
the pooled text embeddings and the distance of the token states at the swapped word, relative to
their norm. Words the encoder maps close together are words a text-to-image model cannot tell apart
from these features (with `word_tokens`, the U-Net also sees the words' input embeddings: their
distance is the last column).

    python benchmarks/clip_words.py [--model FILE]      # default: the bundled model's CLIP
    python benchmarks/clip_words.py --model runs/shapes-clip-shape/clip.safetensors   # a CLIP alone
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ctxdiff.checkpoints import load_bundle
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.pipelines.text2image import DEFAULT_MODEL, Text2Image

BASE = "a large red circle on the left on a white background"
SWAPS = {"shape": ["square", "triangle", "cross"], "colour": ["blue", "green", "yellow"],
         "size": ["small"], "position": ["right"], "background": ["black", "gray"]}
WORD = {"shape": "circle", "colour": "red", "size": "large", "position": "left", "background": "white"}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a t2i bundle (its CLIP is measured) or a CLIP bundle")
    args = parser.parse_args()
    is_clip = load_bundle(args.model).kind == "clip"
    clip = load_clip(ClipConfig(weights=args.model)) if is_clip else Text2Image.from_bundle(args.model).clip
    width = clip.clip.transformer.width   # the output states; any columns after them are word embeddings
    rows = []
    for attribute, words in SWAPS.items():
        for word in words:
            prompt = BASE.replace(WORD[attribute], word)
            cond = clip.encode_text([BASE, prompt])
            pooled = F.normalize(cond.pooled, dim=-1)
            at = BASE.split().index(WORD[attribute]) + 1   # after the start token
            state, words = cond.tokens[:, at, :width], cond.tokens[:, at, width:]
            moved = (state[1] - state[0]).norm() / state[0].norm()
            word_moved = (words[1] - words[0]).norm() / words[0].norm() if words.numel() else float("nan")
            rows.append((attribute, f"{WORD[attribute]} -> {word}", float(pooled[0] @ pooled[1]), float(moved),
                         float(word_moved)))
    print(f"text encoder of {args.model}: '{BASE}' with one word swapped")
    print(f"{'attribute':<11} {'swap':<20} {'pooled cosine':>13} {'token moved (rel.)':>18} {'word moved (rel.)':>17}")
    for attribute, swap, cosine, moved, word_moved in rows:
        print(f"{attribute:<11} {swap:<20} {cosine:>13.3f} {moved:>18.3f} {word_moved:>17.3f}")


if __name__ == "__main__":
    main()
