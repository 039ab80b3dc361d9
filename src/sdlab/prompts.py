"""Prompts to text embeddings, as AUTOMATIC1111 reads them.

- Emphasis: `(word)` x1.1, `[word]` /1.1, `(word:1.3)` sets the weight, `\\(` escapes a bracket.
  A weight scales the token's output embedding; the chunk's mean is then restored, as A1111 does,
  so emphasis shifts attention without changing the overall magnitude.
- Length: prompts longer than the encoder's window are split into chunks of 75 tokens (or at
  `BREAK`); each chunk is encoded as BOS + tokens + EOS + padding, and the chunks are concatenated
  along the sequence axis, so nothing is silently cut. Conditional and unconditional embeddings
  are padded to the same number of chunks with empty chunks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs; a fragment "BREAK" with weight -1 forces a
    new chunk. Same grammar as A1111's parse_prompt_attention."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and item[1] != -1:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


@dataclass
class TokenChunks:
    """Token ids and per-token weights, each chunk already framed to the encoder's window."""

    ids: list[list[int]]
    weights: list[list[float]]


class PromptEncoder:
    """Turns prompts into (batch, 77 * chunks, dim) embeddings with a tokenizer and text encoder."""

    def __init__(self, tokenizer, text_encoder, clip_skip: int = 0):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.window = tokenizer.model_max_length  # 77 for every SD model
        self.chunk_length = self.window - 2

    def tokenize(self, prompt: str) -> TokenChunks:
        tokens: list[int] = []
        weights: list[float] = []
        chunks_ids, chunks_weights = [], []

        def close_chunk() -> None:
            chunks_ids.append(tokens[:])
            chunks_weights.append(weights[:])
            tokens.clear()
            weights.clear()

        for fragment, weight in parse_emphasis(prompt):
            if weight == -1:  # BREAK
                close_chunk()
                continue
            ids = self.tokenizer(fragment, add_special_tokens=False).input_ids if fragment else []
            for token in ids:
                if len(tokens) == self.chunk_length:
                    close_chunk()
                tokens.append(token)
                weights.append(weight)
        if tokens or not chunks_ids:
            close_chunk()
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        framed_ids, framed_weights = [], []
        for ids, ws in zip(chunks_ids, chunks_weights):
            padding = self.chunk_length - len(ids)
            framed_ids.append([bos] + ids + [eos] + [pad] * padding)
            framed_weights.append([1.0] + ws + [1.0] + [1.0] * padding)
        return TokenChunks(framed_ids, framed_weights)

    def empty_chunk(self) -> tuple[list[int], list[float]]:
        chunk = self.tokenize("")
        return chunk.ids[0], chunk.weights[0]

    @torch.inference_mode()
    def encode(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        """Embeddings for prompts, all padded to the same number of chunks (at least min_chunks)."""
        tokenized = [self.tokenize(p) for p in prompts]
        n_chunks = max([min_chunks] + [len(t.ids) for t in tokenized])
        empty_ids, empty_weights = self.empty_chunk()
        ids = [t.ids + [empty_ids] * (n_chunks - len(t.ids)) for t in tokenized]
        weights = [t.weights + [empty_weights] * (n_chunks - len(t.weights)) for t in tokenized]
        device = self.text_encoder.device
        ids_t = torch.tensor(ids, device=device)  # (batch, chunks, 77)
        w_t = torch.tensor(weights, device=device, dtype=torch.float32)
        hidden = self._encode_ids(ids_t.flatten(0, 1))  # (batch*chunks, 77, dim)
        hidden = hidden.unflatten(0, ids_t.shape[:2])
        if (w_t != 1).any():
            hidden = self._apply_weights(hidden.float(), w_t).to(hidden.dtype)
        return hidden.flatten(1, 2)

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.clip_skip > 0:
            out = self.text_encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            return self.text_encoder.text_model.final_layer_norm(hidden)
        return self.text_encoder(ids)[0]

    @staticmethod
    def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        original_mean = hidden.mean(dim=(-2, -1), keepdim=True)
        weighted = hidden * weights.unsqueeze(-1)
        return weighted * (original_mean / weighted.mean(dim=(-2, -1), keepdim=True))
