"""Tokenise preference pairs and pack them into shared-prefix rows.

A prompt P (image tokens expanded) with chosen C and rejected answers R1..Rk becomes one row segment
`P + C + R1 + ... + Rk` (a prefix group; k = 1 is the plain pair `P + C + R`): positions run 0..P-1 over P and
every answer restarts at P, and the mask (built from `pair_index`, the group, and `span`, the answer number, in
`modeling.shared_prefix`) lets each answer see only P and itself. Downstream of the collator everything works on
pairs: a group is k derived pairs (C, Ri) that share the group's prompt and chosen positions, so a pairwise loss
is the mean over the k pairs. Several groups may share a row; the mask keeps them apart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import torch.nn.functional as F

from vlm_orpo.data.validation import rejected_answers
from vlm_orpo.errors import BadRow
from vlm_orpo.images import open_image



class Part(IntEnum):
    """The parts of a pair, its log-prob segment (`3 * pair + part`); in the packed row a token's `span` is its
    answer number: PROMPT, CHOSEN, then REJECTED + i for the group's rejected answer i (0-based)."""

    PROMPT = 0
    CHOSEN = 1
    REJECTED = 2


PAD = -1  # the span of padding
# processor outputs that hold one value per prompt token (not image tensors): answers and padding get 0
TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class EncodedPair:
    """One prompt as fed to the model, with its chosen and rejected answers: token ids exactly as used, and the
    processor's image tensors. A row with several rejected answers is one EncodedPair with `more_rejected_ids`:
    it stands for `rejected_count` derived pairs (chosen, rejected i) that share the prompt."""

    idx: Any
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]  # the first (for most data, the only) rejected answer
    image_inputs: dict[str, torch.Tensor]  # e.g. pixel_values [1, patches, 3, h, w] and image_sizes [1, 2]
    # the processor's per-token tensors of the prompt (e.g. Gemma 3's token_type_ids [1, P]); answer tokens get 0
    prompt_token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # precomputed reference log-prob sums [rejected_count, len(Part)] (prompt, chosen, rejected) per derived pair,
    # when loss.precompute_reference
    reference_logps: torch.Tensor | None = None
    more_rejected_ids: list[list[int]] = field(default_factory=list)  # rejected answers 2..k of the same prompt
    # with data.streaming: (reader, its state once this pair was read), what a checkpoint resumes the stream from
    stream_state: tuple[str, Any] | None = None

    @property
    def all_rejected_ids(self) -> list[list[int]]:
        return [self.rejected_ids, *self.more_rejected_ids]

    @property
    def rejected_count(self) -> int:
        return 1 + len(self.more_rejected_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + sum(map(len, self.all_rejected_ids))


class PairEncoder:
    """Formats a row with the processor's chat template and tokenises it; image placeholders are expanded."""

    def __init__(self, processor, max_answer_tokens: int = 128, max_prompt_tokens: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_answer_tokens = max_answer_tokens
        self.max_prompt_tokens = max_prompt_tokens
        # the id that the processor expands an image into (Gemma 3's `image_token` is its begin-of-image marker; its
        # `image_token_ids` names the soft token the model's features replace)
        ids = getattr(processor, "image_token_ids", None) or [None]
        self.image_token_id = ids[0] if isinstance(ids[0], int) else self.tokenizer.convert_tokens_to_ids(
            processor.image_token)
        # what the chat template writes for an image before the processor expands it: the image token itself, or
        # a begin-of-image token (Gemma 3 writes `<start_of_image>`)
        boi = getattr(processor, "boi_token", None)
        self.placeholder_ids = {self.image_token_id} | ({self.tokenizer.convert_tokens_to_ids(boi)} if boi else set())
        self.eos_token_id = self.tokenizer.eos_token_id
        control = {t.content for t in self.tokenizer.added_tokens_decoder.values()} | set(self.tokenizer.all_special_tokens)
        # text that the tokenizer would turn into a control token (`<image>`, `</s>`, `[INST]`) if it were in an answer
        self._control_text = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))))

    @property
    def cache_key(self) -> str:
        """Everything that decides whether a row fits and how it tokenises (the row-validation cache's key)."""
        image_processor = getattr(self.processor, "image_processor", None)
        return json.dumps([
            type(self.processor).__name__, self.tokenizer.name_or_path, len(self.tokenizer),
            self.processor.chat_template, self.max_answer_tokens, self.max_prompt_tokens,
            image_processor.to_dict() if image_processor is not None else None,
        ], sort_keys=True, default=str)

    def messages(self, question) -> list[dict]:
        """The user turn: plain text gets one image in front; chat messages are used as given."""
        if isinstance(question, str):
            text = question.replace(self.processor.image_token, "").strip()
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in question):
            raise BadRow("bad question", "chat messages must each be a mapping with a role")
        messages = [dict(m) for m in question]
        has_image = any(
            isinstance(m.get("content"), list) and any(isinstance(c, dict) and c.get("type") == "image" for c in m["content"])
            for m in messages
        )
        if not has_image:  # one image per pair: put it at the start of the first user turn
            users = [m for m in messages if m["role"] == "user"]
            if not users:
                raise BadRow("bad question", "the chat messages have no user turn")
            content = users[0].get("content") or ""
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            users[0]["content"] = [{"type": "image"}, *content]
        return messages

    def prompt_text(self, question) -> str:
        return self.processor.apply_chat_template(self.messages(question), add_generation_prompt=True, tokenize=False)

    def answer_ids(self, question, answer: str, prompt: str | None = None) -> list[int]:
        """The assistant turn's tokens as the chat template writes them, then EOS, at most max_answer_tokens.

        A cut answer loses its EOS, as in TRL: the model must not learn to stop mid-answer. `prompt` is the
        already rendered prompt of `question`, so `encode` renders it once per pair."""
        prompt = prompt if prompt is not None else self.prompt_text(question)
        turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        full = self.processor.apply_chat_template(self.messages(question) + [turn], tokenize=False)
        completion = full[len(prompt):] if full.startswith(prompt) else answer
        eos = self.tokenizer.eos_token
        completion = completion.rstrip()
        if eos and completion.endswith(eos):
            completion = completion[: -len(eos)]
        return [*self._completion_ids(completion, answer), self.eos_token_id][: self.max_answer_tokens]

    def _completion_ids(self, completion: str, answer: str) -> list[int]:
        """Token ids of the rendered assistant turn, in which the answer's own text is only ever text.

        An answer that says `<image>` or `</s>` must not become an image slot or an end of sequence mid-answer,
        so the answer is tokenised with `split_special_tokens`, and the template around it as usual."""
        tokenize = lambda text, **kw: self.tokenizer(text, add_special_tokens=False, **kw)["input_ids"]  # noqa: E731
        if not self._control_text.search(answer):
            return tokenize(completion)
        start = completion.find(answer)
        if start < 0:
            raise BadRow("control-token text in answer", "the chat template changed the answer, so it cannot be escaped")
        while start > 0 and completion[start - 1].isspace():  # " answer" tokenises as one piece, as in the usual path
            start -= 1
        end = completion.find(answer, start) + len(answer)
        return tokenize(completion[:start]) + tokenize(completion[start:end], split_special_tokens=True) + tokenize(
            completion[end:]
        )

    def prompt_tokenizer_kwargs(self, prompt: str) -> dict:
        """A rendered prompt that already starts with BOS (merged models' templates write it) gets no second."""
        bos = self.tokenizer.bos_token
        return {"add_special_tokens": not (bos and prompt.startswith(bos))}

    def prompt_length(self, question, image_size: tuple[int, int], prompt: str | None = None) -> int:
        """Prompt tokens with image tokens expanded, from the image size alone (no pixel work)."""
        prompt = prompt if prompt is not None else self.prompt_text(question)
        text_ids = self.tokenizer(prompt, **self.prompt_tokenizer_kwargs(prompt))["input_ids"]
        placeholders = sum(text_ids.count(i) for i in self.placeholder_ids)
        if placeholders != 1:
            raise BadRow("bad question", f"the prompt holds {placeholders} image placeholders; a pair has one image")
        expanded = getattr(self.processor, "full_image_sequence", None)
        if expanded is not None:  # Gemma 3: a fixed text around the image tokens, whose newlines merge with the prompt's
            text = prompt.replace(self.processor.boi_token, expanded, 1)
            return len(self.tokenizer(text, **self.prompt_tokenizer_kwargs(prompt))["input_ids"])
        height, width = image_size
        n_image = self.processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"][0]
        # Gemma 4 expands its image token to begin-of-image, the image tokens, end-of-image
        wrapped = 2 if self.image_token_id in text_ids and getattr(self.processor, "eoi_token", None) else 0
        return len(text_ids) - 1 + n_image + wrapped

    def check(self, row: dict, image_size: tuple[int, int]) -> bool:
        """Raise BadRow for a row the model cannot take whole; return whether an answer will be cut."""
        prompt = self.prompt_text(row["question"])
        n = self.prompt_length(row["question"], image_size, prompt)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise BadRow("prompt too long", f"{n} tokens > max_prompt_tokens {self.max_prompt_tokens}")
        return any(
            self.answer_ids(row["question"], answer, prompt)[-1] != self.eos_token_id
            for answer in (row["chosen"], *rejected_answers(row))
        )

    def encode(self, row: dict) -> EncodedPair:
        prompt = self.prompt_text(row["question"])
        image = open_image(row["image"], max_pixels=None)  # the row was validated, under data.max_image_pixels
        inputs = self.processor(
            images=[image], text=[prompt], return_tensors="pt", **self.prompt_tokenizer_kwargs(prompt)
        )
        prompt_ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        token_inputs = {key: inputs.pop(key) for key in TOKEN_INPUTS if key in inputs}
        first, *more = (self.answer_ids(row["question"], answer, prompt) for answer in rejected_answers(row))
        return EncodedPair(
            idx=row["idx"],
            prompt_ids=prompt_ids,
            chosen_ids=self.answer_ids(row["question"], row["chosen"], prompt),
            rejected_ids=first,
            image_inputs=dict(inputs),
            prompt_token_inputs=token_inputs,
            more_rejected_ids=more,
        )


class PairDataset(torch.utils.data.Dataset):
    """Encodes lazily, so pixel tensors of a large dataset never sit in memory together."""

    def __init__(self, rows, encoder: PairEncoder):
        self.rows = rows
        self.encoder = encoder
        # per row [rejected_count, len(Part)], set by `reference.precompute`
        self.reference_logps: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fingerprint(self) -> str:
        """What the rows are (the datasets library's fingerprint of the selection) and how they are encoded."""
        return json.dumps([getattr(self.rows, "_fingerprint", None), len(self.rows), self.encoder.cache_key])

    def __getitem__(self, i: int) -> EncodedPair:
        try:
            pair = self.encoder.encode(self.rows[i])
        except (BadRow, StopIteration) as exc:  # a StopIteration here would silently end the DataLoader's epoch
            raise RuntimeError(f"pair {i} passed validation but failed to encode: {exc!r}") from exc
        if self.reference_logps is not None:
            pair.reference_logps = self.reference_logps[i]
        return pair


def collate_image_inputs(per_pair: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate each image tensor along dim 0, zero-padding the other dims to the largest.

    LLaVA-NeXT pads its patch dimension (the model slices it back by image_sizes); LLaVA-1.5 and Qwen2-VL
    tensors already agree and are simply concatenated.
    """
    out = {}
    for key in per_pair[0]:
        tensors = [p[key] for p in per_pair]
        shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        padded = []
        for t in tensors:
            pad = []
            for d in reversed(range(1, t.dim())):
                pad += [0, shape[d] - t.shape[d]]
            padded.append(F.pad(t, pad) if any(pad) else t)
        out[key] = torch.cat(padded, dim=0)
    return out


def move_batch(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device`: its tensors, and the image tensors nested under `images`."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    moved["images"] = {k: v.to(device) for k, v in batch["images"].items()}
    return moved


def pack_rows(lengths: list[int], max_tokens_per_row: int | None) -> list[list[int]]:
    """Greedy in-order packing of prefix groups; a group longer than the cap gets a row of its own (never cut)."""
    if max_tokens_per_row is None:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if rows and used + n <= max_tokens_per_row:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


class _Targets:
    """Every scored token of a batch: (row, predicting position, target id, segment = len(Part) * pair + part)."""

    def __init__(self, image_token_id: int, sft_on_prompt: bool):
        self.image_token_id = image_token_id
        self.sft_on_prompt = sft_on_prompt
        self.rows: list[tuple[int, int, int, int]] = []

    def prompt(self, pair_no: int, ids: list[int], row: int, start: int) -> None:
        """The prompt's text tokens (not its first, not image tokens), when the prompt is scored (sft_on_prompt)."""
        if self.sft_on_prompt:
            self.rows += [(row, start + k - 1, ids[k], len(Part) * pair_no + Part.PROMPT)
                          for k in range(1, len(ids)) if ids[k] != self.image_token_id]

    def answer(self, pair_no: int, part: Part, ids: list[int], row: int, start: int, first_predictor: int) -> None:
        """An answer at `start` of `row`: its first token is predicted by the prompt's last token, the rest by their
        own predecessors."""
        self.rows += [(row, first_predictor if j == 0 else start + j - 1, tok, len(Part) * pair_no + part)
                      for j, tok in enumerate(ids)]

    def tensors(self, n_pairs: int, keep_all_logits: bool = False) -> dict[str, torch.Tensor]:
        """logits_to_keep (the predicting positions, or 0 = all of them) and where each target sits in the logits."""
        t_row, t_pos, t_ids, t_seg = (torch.tensor(col, dtype=torch.long) for col in zip(*self.rows))
        if keep_all_logits:
            keep, t_col = 0, t_pos  # an int: transformers reads 0 as every position, a tensor as an index
        else:
            keep, t_col = torch.unique(t_pos, sorted=True, return_inverse=True)
        segment_tokens = torch.bincount(t_seg, minlength=len(Part) * n_pairs)
        return {
            "logits_to_keep": keep,
            "target_row": t_row,
            "target_col": t_col,
            "target_ids": t_ids,
            "target_segment": t_seg,
            "segment_tokens": segment_tokens.view(n_pairs, len(Part)),
        }


def _reference_logps(pairs: list[EncodedPair]) -> dict:
    """The precomputed reference log-prob sums as one [derived pairs, len(Part)] tensor, when the pairs carry them."""
    if pairs[0].reference_logps is None:
        return {}
    return {"reference_logps": torch.cat([p.reference_logps for p in pairs])}


def _stream_states(pairs: list[EncodedPair]) -> dict:
    """The readers' states of streamed pairs (`data.streaming`), for the trainer's record of where the stream is."""
    states = [p.stream_state for p in pairs if p.stream_state is not None]
    return {"stream_states": states} if states else {}


def _meta(pairs: list[EncodedPair]) -> list[dict]:
    """Per derived pair: idx and the token ids exactly as fed (a row with k rejected answers gives k entries)."""
    return [{"idx": p.idx, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": rejected}
            for p in pairs for rejected in p.all_rejected_ids]


def _derived_pairs(pairs: list[EncodedPair]) -> list[list[int]]:
    """The derived pair numbers of each group, in order: group g with k rejected answers gets k consecutive ones."""
    starts = [0]
    for p in pairs:
        starts.append(starts[-1] + p.rejected_count)
    return [list(range(a, b)) for a, b in zip(starts, starts[1:])]


def _token_inputs(pairs: list[EncodedPair], shape: tuple[int, int], placements: list[tuple[int, int, int]]) -> dict:
    """The prompts' per-token processor tensors laid out like input_ids: (pair, row, start) per prompt; 0 elsewhere."""
    out = {}
    for key in pairs[0].prompt_token_inputs:
        values = torch.zeros(shape, dtype=pairs[0].prompt_token_inputs[key].dtype)
        for i, row, start in placements:
            prompt = pairs[i].prompt_token_inputs[key][0]
            values[row, start : start + len(prompt)] = prompt
        out[key] = values
    return out


class PackedCollator:
    """Builds the packed batch consumed by `modeling.shared_prefix.packed_logps`.

    Keys: layout ("packed"); input_ids, position_ids, pair_index (the prefix group, -1 for padding), span (the
    answer number, `Part`) ([rows, T]); the prompts' per-token processor tensors (`TOKEN_INPUTS`, [rows, T]);
    logits_to_keep (row positions whose hidden state predicts a scored token); target_row/target_col/target_ids/
    target_segment ([targets]); segment_tokens ([derived pairs, len(Part)]); pairs_per_group ([groups], the
    rejected answers of each prompt); meta (per derived pair: idx and the token ids exactly as fed); images (the
    processor's image tensors, one image per group in row order). The prompt's text tokens are scored (their
    segment counts are non-zero) exactly when the collator was built with `sft_on_prompt`. A group's chosen (and
    scored prompt) targets appear once per derived pair, at the same positions: a gather, not another forward.
    """

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int,
        max_tokens_per_row: int | None = None,
        sft_on_prompt: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.max_tokens_per_row = max_tokens_per_row
        self.sft_on_prompt = sft_on_prompt

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, Any]:
        rows = pack_rows([len(p) for p in pairs], self.max_tokens_per_row)
        width = max(sum(len(pairs[i]) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        pair_index = torch.full(shape, -1, dtype=torch.long)
        span = torch.full(shape, PAD, dtype=torch.long)
        targets = _Targets(self.image_token_id, self.sft_on_prompt)
        derived = _derived_pairs(pairs)
        placements = []
        for r, row in enumerate(rows):  # in-order packing keeps groups, and so images, in row-major order
            start = 0
            for i in row:
                self._place(pairs[i], r, start, i, derived[i], input_ids, position_ids, pair_index, span, targets)
                placements.append((i, r, start))
                start += len(pairs[i])
        return {
            "layout": "packed",
            "input_ids": input_ids,
            "position_ids": position_ids,
            "pair_index": pair_index,
            "span": span,
            **_token_inputs(pairs, shape, placements),
            **targets.tensors(derived[-1][-1] + 1),
            **_reference_logps(pairs),
            **_stream_states(pairs),
            "pairs_per_group": torch.tensor([p.rejected_count for p in pairs]),
            "meta": _meta(pairs),
            "images": collate_image_inputs([p.image_inputs for p in pairs]),
        }

    @staticmethod
    def _place(pair, r, start, group_no, pair_nos, input_ids, position_ids, pair_index, span, targets: _Targets):
        """Group `group_no` at `start` of row `r`: P, then each answer restarting its positions at P."""
        P = len(pair.prompt_ids)
        input_ids[r, start : start + P] = torch.tensor(pair.prompt_ids)
        position_ids[r, start : start + P] = torch.arange(P)
        pair_index[r, start : start + len(pair)] = group_no
        span[r, start : start + P] = Part.PROMPT
        for pair_no in pair_nos:
            targets.prompt(pair_no, pair.prompt_ids, r, start)
        at = start + P
        for answer_no, ids in enumerate([pair.chosen_ids, *pair.all_rejected_ids], start=Part.CHOSEN):
            input_ids[r, at : at + len(ids)] = torch.tensor(ids)
            position_ids[r, at : at + len(ids)] = torch.arange(P, P + len(ids))
            span[r, at : at + len(ids)] = answer_no
            # chosen's targets once per derived pair, rejected i's for pair i; every answer's first token is
            # predicted by the last prompt token
            owners = pair_nos if answer_no == Part.CHOSEN else [pair_nos[answer_no - Part.REJECTED]]
            for pair_no in owners:
                targets.answer(pair_no, min(answer_no, Part.REJECTED), ids, r, at, start + P - 1)
            at += len(ids)


class PlainCollator:
    """The plain batch of `modeling.plain.plain_logps`: `[prompt + chosen]` and `[prompt + rejected i]` as k + 1
    right-padded sequences per prompt with k rejected answers (all chosen, then all rejected in derived pair
    order), each with its own copy of the image.

    It is what TRL, LLaMA-Factory and ms-swift feed a VLM, and the path of every model that the packed forward
    does not support. Keys as `PackedCollator`'s (layout "plain", attention_mask instead of position_ids,
    pair_index and span), so losses, metrics and reports read both alike. `keep_all_logits` runs the LM head
    over every position, as the peers do (the step benchmark's plain baseline); by default it runs only where a
    scored token is predicted, which gives the same numbers.
    """

    def __init__(self, pad_token_id: int, image_token_id: int, sft_on_prompt: bool = False,
                 keep_all_logits: bool = False):
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.sft_on_prompt = sft_on_prompt
        self.keep_all_logits = keep_all_logits

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, Any]:
        n = len(pairs)
        groups = [g for g, p in enumerate(pairs) for _ in p.all_rejected_ids]  # each derived pair's group
        seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [
            p.prompt_ids + rejected for p in pairs for rejected in p.all_rejected_ids
        ]
        shape = (len(seqs), max(map(len, seqs)))
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for r, seq in enumerate(seqs):
            input_ids[r, : len(seq)] = torch.tensor(seq)
            attention_mask[r, : len(seq)] = 1
        targets = _Targets(self.image_token_id, self.sft_on_prompt)
        for i, g in enumerate(groups):
            p, rejected = pairs[g], seqs[n + i][len(pairs[g].prompt_ids):]
            P = len(p.prompt_ids)
            targets.prompt(i, p.prompt_ids, g, 0)
            targets.answer(i, Part.CHOSEN, p.chosen_ids, g, P, P - 1)
            targets.answer(i, Part.REJECTED, rejected, n + i, P, P - 1)
        placements = [(g, r, 0) for r, g in enumerate(range(n))] + [(g, n + i, 0) for i, g in enumerate(groups)]
        return {
            "layout": "plain",
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **_token_inputs(pairs, shape, placements),
            **targets.tensors(len(groups), self.keep_all_logits),
            **_reference_logps(pairs),
            **_stream_states(pairs),
            "pairs_per_group": torch.tensor([p.rejected_count for p in pairs]),
            "meta": _meta(pairs),
            "images": collate_image_inputs([p.image_inputs for p in [*pairs, *(pairs[g] for g in groups)]]),
        }


def load_pairs(data_cfg, encoder: PairEncoder, *, train: bool = True, limit: int | None = None,
               process_index: int = 0, num_processes: int = 1):
    """(train PairDataset | None, validation PairDataset | None, SkipReport) for a `config.DataConfig`; with
    `data.streaming` the train set is a `streaming.StreamedPairs` (this process's part of the stream)."""
    from vlm_orpo.data.sources import prepare_data

    if data_cfg.streaming:
        from vlm_orpo.data.streaming import streamed_pairs

        return streamed_pairs(data_cfg, encoder, train=train, limit=limit, process_index=process_index,
                              num_processes=num_processes)

    prepared = prepare_data(
        data_cfg.source,
        train_split=data_cfg.train_split,
        want_train=train,
        validation_split=data_cfg.validation_split,
        validation_fraction=data_cfg.validation_fraction,
        subset_fraction=data_cfg.subset_fraction,
        limit=limit,
        seed=data_cfg.seed,
        columns=data_cfg.columns,
        where=data_cfg.where,
        check_tokens=encoder.check,
        check_key=encoder.cache_key,
        max_image_pixels=data_cfg.max_image_pixels,
        num_proc=data_cfg.num_proc,
    )
    wrap = lambda rows: PairDataset(rows, encoder) if rows is not None and len(rows) else None  # noqa: E731
    return wrap(prepared.train), wrap(prepared.validation), prepared.report
