"""Weighted and long prompts for Stable Diffusion, as AUTOMATIC1111 writes and reads them.

Syntax (A1111's `parse_prompt_attention`, its "Original" emphasis):

    (word)        weight x 1.1            [word]       weight / 1.1
    (word:1.3)    weight x 1.3            ((word))     x 1.21: brackets nest and multiply
    \\( \\) \\[ \\]   literal brackets         BREAK        end the 75-token chunk here
    an unclosed ( or [ applies to the rest of the prompt; a stray ) or ] is text

Long prompts: the tokens are cut into chunks of 75 (the text encoder's 77 positions less start and end); each chunk
is wrapped in start/end-of-text, padded as the model pads (SD 1.x with end-of-text, SD 2.x with 0), encoded on its
own, and the chunks' hidden states are concatenated along the sequence: a 150-token prompt conditions the U-Net on
2 x 77 tokens. As in A1111, when a chunk fills up and a comma lies among its last `comma_backtrack` (20) tokens, the
words after that comma move to the next chunk.

Weights: every token's hidden state (after the final LayerNorm) is multiplied by its weight, then the chunk is
rescaled so that its mean over positions and channels is what it was unweighted:
z <- z * w;  z <- z * mean(z_before) / mean(z). A1111 takes that mean over the whole batch; here it is per prompt,
so an image never depends on the prompts it is batched with (the same as A1111 at batch size 1).

The pooled feature is the first chunk's end-of-text token; the mask concatenates the chunks' masks. A prompt without
weights, brackets or BREAK that fits in 75 tokens gives exactly (bit for bit) `LatentTextEncoder.encode`, and so do
plain batches of them (tests/test_prompt_weights.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.latent.text import EOT_ID, LatentTextEncoder, _tokenizer

SOT_ID = EOT_ID - 1
ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of a prompt in A1111's syntax (BREAK as ("BREAK", -1)); runs of one weight merged.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(res))
        elif part == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif part == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif part == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([piece, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


@dataclass(frozen=True)
class PromptChunks:
    """A prompt as the text encoder reads it: ids and per-token weights, [chunks, positions] each."""

    ids: torch.Tensor           # long; start, up to 75 tokens, end-of-text, padding
    weights: torch.Tensor       # float64; 1 at start, end and padding
    tokens: int                 # prompt tokens (without start/end/padding)

    def __len__(self) -> int:
        return self.ids.shape[0]


def tokenize_weighted(prompt: str, pad_token_id: int = EOT_ID, positions: int = 77,
                      comma_backtrack: int = COMMA_BACKTRACK, syntax: bool = True) -> PromptChunks:
    """A1111's `tokenize_line`: the prompt's tokens with their weights, in chunks of `positions` - 2.
    `syntax=False` reads the prompt as plain text (weight 1, no BREAK), chunked the same way."""
    length = positions - 2
    tokenizer = _tokenizer()
    comma = tokenizer.encoder.get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1
    count = 0

    def close_chunk() -> None:
        nonlocal ids, mults, last_comma
        pad = length - len(ids)
        chunks.append(([SOT_ID] + ids + [EOT_ID] * (pad + 1), [1.0] + mults + [1.0] * (pad + 1)))
        ids, mults, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt) if syntax else [(prompt, 1.0)]:
        if (text, weight) == BREAK:
            close_chunk()
            continue
        for token in tokenizer.encode(text):
            count += 1
            if token == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == length and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close_chunk()
                ids, mults = moved_ids, moved_mults
            if len(ids) == length:
                close_chunk()
            ids.append(token)
            mults.append(weight)
    if ids or not chunks:
        close_chunk()
    id_rows = torch.tensor([c[0] for c in chunks], dtype=torch.long)
    after_eot = (id_rows == EOT_ID).int().cumsum(dim=-1) - (id_rows == EOT_ID).int() > 0
    return PromptChunks(id_rows.masked_fill(after_eot, pad_token_id),
                        torch.tensor([c[1] for c in chunks], dtype=torch.float64), count)


def empty_chunk(pad_token_id: int = EOT_ID, positions: int = 77) -> PromptChunks:
    """The chunk A1111 pads shorter prompts of a batch with: start, end-of-text, padding."""
    ids = torch.full((1, positions), pad_token_id, dtype=torch.long)
    ids[0, :2] = torch.tensor([SOT_ID, EOT_ID])
    return PromptChunks(ids, torch.ones(1, positions, dtype=torch.float64), 0)


def chunk_count(text: LatentTextEncoder, prompt: str) -> int:
    """How many 77-token chunks `prompt` takes on `text` (1 for up to 75 tokens without BREAK)."""
    return len(tokenize_weighted(prompt, text.config.pad_token_id, text.config.max_positions))


@torch.no_grad()
def encode_prompts(text: LatentTextEncoder, prompts: list[str], *, chunks: int | None = None,
                   weighting: bool = True) -> TextCondition:
    """TextCondition [B, 77 * n, width] of prompts in A1111's syntax; see the module doc.

    n is the most chunks any prompt needs (at least `chunks`); shorter prompts are padded with `empty_chunk`
    (A1111's rule for a batch; pass prompts of one length, or `chunks`, for batch-independent results).
    `weighting=False` reads the prompts as plain text: brackets, weights and BREAK are words (chunking stays)."""
    config = text.config
    device = text.embeddings.token_embedding.weight.device
    rows = [tokenize_weighted(p, config.pad_token_id, config.max_positions, syntax=weighting) for p in prompts]
    n = max([chunks or 1] + [len(r) for r in rows])
    empty = empty_chunk(config.pad_token_id, config.max_positions)
    tokens, masks, pooled = [], [], None
    for i in range(n):
        part = [r if i < len(r) else empty for r in rows]
        j = [i if i < len(r) else 0 for r in rows]
        ids = torch.stack([p.ids[k] for p, k in zip(part, j)]).to(device)
        weights = torch.stack([p.weights[k] for p, k in zip(part, j)])
        cond = text(ids)
        tokens.append(_emphasis(cond.tokens, weights))
        masks.append(cond.mask)
        pooled = cond.pooled if pooled is None else pooled
    return TextCondition(torch.cat(tokens, dim=1), torch.cat(masks, dim=1), pooled)


def _emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis per prompt: z * w, rescaled to z's own mean; rows of weight 1 untouched."""
    out = z.clone()
    for b in range(z.shape[0]):
        if bool((weights[b] == 1).all()):
            continue
        row = z[b].float()
        scaled = row * weights[b].to(device=z.device, dtype=torch.float32)[:, None]
        out[b] = (scaled * (row.mean() / scaled.mean())).to(z.dtype)
    return out
