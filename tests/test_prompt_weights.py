"""A1111-weighted and long prompts for SD: the syntax, the 75-token chunks, the emphasis as an explicit scaling, and
plain prompts unchanged bit for bit (tiny random SD text encoders, SD 1.x and SD 2.x padding)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ctxdiff.models.latent import LatentTextEncoder, tokenize
from ctxdiff.models.latent.prompt_weights import (
    EOT_ID, SOT_ID, chunk_count, empty_chunk, encode_prompts, parse_prompt_attention, tokenize_weighted,
)
from tiny_sd import TINY_SD


@pytest.fixture(scope="module", params=["v1", "v2"])
def text(request):
    config = TINY_SD.text if request.param == "v1" else replace(TINY_SD.text, act="gelu", pad_token_id=0)
    torch.manual_seed(0)
    return LatentTextEncoder(config).eval()


def test_parser_reads_a1111_syntax_as_a1111_does():
    # A1111's own doctests (modules/prompt_parser.py), weights to the float
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert parse_prompt_attention("[[x]]") == [("x", (1 / 1.1) ** 2)]
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("a stray) here: ok") == [("a stray) here: ok", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]


def test_plain_prompts_are_unchanged_bit_for_bit(text):
    prompts = ["a red square above a blue circle", "an astronaut riding a horse, oil painting", "", "x: y"]
    ours, today = encode_prompts(text, prompts), text.encode(prompts)
    assert torch.equal(ours.tokens, today.tokens) and torch.equal(ours.mask, today.mask)
    assert torch.equal(ours.pooled, today.pooled)
    assert torch.equal(tokenize_weighted(prompts[1], text.config.pad_token_id).ids,
                       tokenize(prompts[1:2], text.config.pad_token_id))


def test_weighted_prompt_equals_the_explicit_scaling_of_the_plain_embedding(text):
    weighted = encode_prompts(text, ["a (red:1.5) cat [on] a ((mat))"]).tokens[0]
    ids = tokenize(["a red cat on a mat"], text.config.pad_token_id)   # brackets are not tokens
    z = text(ids).tokens[0].float()
    w = torch.ones(77)
    w[2], w[4], w[6] = 1.5, 1 / 1.1, 1.1 * 1.1    # start, a, red, cat, on, a, mat
    scaled = z * w[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    assert (weighted - expected).abs().max() <= 1e-6
    assert torch.isclose(weighted.mean(), z.mean(), atol=1e-6) and not torch.allclose(weighted, z)


def test_a_150_token_prompt_is_two_chunks_of_77_each_encoded_alone(text):
    words = ["cat", "dog"] * 75                     # one token each, no commas
    prompt = " ".join(words)
    chunks = tokenize_weighted(prompt, text.config.pad_token_id)
    assert chunks.ids.shape == (2, 77) and chunks.tokens == 150
    assert chunks.ids[:, 0].tolist() == [SOT_ID] * 2 and chunks.ids[:, 76].tolist() == [EOT_ID] * 2
    cond = encode_prompts(text, [prompt])
    assert cond.tokens.shape == (1, 154, text.config.width) and cond.mask.shape == (1, 154)
    first, second = text.encode([" ".join(words[:75])]), text.encode([" ".join(words[75:])])
    assert torch.equal(cond.tokens[:, :77], first.tokens) and torch.equal(cond.tokens[:, 77:], second.tokens)
    assert torch.equal(cond.pooled, first.pooled) and chunk_count(text, prompt) == 2
    assert chunk_count(text, " ".join(words[:75])) == 1 and chunk_count(text, " ".join(words[:76])) == 2


def test_break_starts_a_new_chunk(text):
    cond = encode_prompts(text, ["a cat BREAK a dog"])
    assert cond.tokens.shape[1] == 154
    assert torch.equal(cond.tokens[:, :77], text.encode(["a cat"]).tokens)
    assert torch.equal(cond.tokens[:, 77:], text.encode(["a dog"]).tokens)


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next(text):
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)   # the comma is token 71 of 81
    ids = tokenize_weighted(prompt, text.config.pad_token_id).ids
    comma = ids[0, 71].item()
    assert ids.shape[0] == 2 and ids[0, 72].item() == EOT_ID              # chunk 1 ends after the comma
    assert (ids[1, 1:11] != comma).all() and ids[1, 11].item() == EOT_ID  # the ten dogs open chunk 2
    assert tokenize_weighted(prompt, text.config.pad_token_id, comma_backtrack=0).ids[0, 75].item() != EOT_ID


def test_escaped_brackets_are_text_and_weighting_off_reads_syntax_as_words(text):
    literal = tokenize_weighted("a \\(cat\\)").ids
    assert torch.equal(literal, tokenize(["a (cat)"], EOT_ID))
    assert torch.equal(encode_prompts(text, ["a (cat:1.4)"], weighting=False).tokens,
                       text.encode(["a (cat:1.4)"]).tokens)


def test_shorter_prompts_of_a_batch_are_padded_with_empty_chunks(text):
    long = " ".join(["cat"] * 80)
    cond = encode_prompts(text, ["a dog", long])
    empty = text(empty_chunk(text.config.pad_token_id).ids).tokens
    assert cond.tokens.shape[1] == 154 and torch.allclose(cond.tokens[0, 77:], empty[0], atol=1e-6)
    assert encode_prompts(text, ["a dog"], chunks=3).tokens.shape[1] == 231
