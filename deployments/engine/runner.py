"""The model runner: every forward the engine runs, behind one interface the core loop calls.

The core decides what runs (which prompts are prefilled, which rows decode, which slot each row
holds) and samples; the runner runs it on the model and owns what the model's forwards need: the
slot cache of the running rows, their next input ids, the prompt forwards' caches, the vision tower
and its cache, the prefix snapshots taken inside forwards, and the compiled graphs. The core never
touches the model, so another runner can take this one's place without the core knowing how a
step runs.

`TransformersRunner` runs prompts through the checkpoint's transformers modules, over a `DynamicCache`,
chunk by chunk (`deployments/engine/prefill.py`), and decode steps over the engine's `SlotCache` through
the engine's own text tower (`deployments/engine/tower.py`, `decode_path: engine`) or transformers'
(`transformers`), eager or compiled (`deployments/engine/compiled.py`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import DynamicCache

from deployments.engine.compiled import DecodeStep, SuffixForward, reference_decode
from deployments.engine.prefill import AnswerJob, Family, Prefill, StateTaps, restore, snapshot
from deployments.engine.reuse import PrefixCache, Snapshot, VisionCache
from deployments.engine.rows import Row, merge_inputs
from deployments.engine.slots import SlotCache
from deployments.engine.tower import TextTower


class ModelRunner(Protocol):
    """What the core loop asks of a model. Slots 0..rows-1 hold the running rows, in the core's order."""

    vocab_size: int
    device: torch.device
    prefix_cache: PrefixCache
    vision_cache: VisionCache

    def start_prefill(self, group: list[Family], past: Snapshot | None) -> Prefill:
        """Embed a group's prompts (vision features included) for a prefill, from `past` if given."""

    def prefill_chunk(self, prefill: Prefill) -> torch.Tensor | None:
        """Forward the prefill's next chunk; after its last, the last position's logits (families, vocab)."""

    def join(self, slot: int, prefill: Prefill, family: int) -> None:
        """Copy family `family`'s prefilled state into `slot` (each of its n rows gets a slot of its own)."""

    def decode(self, rows: int) -> torch.Tensor:
        """One decode step over slots 0..rows-1 from their next ids: logits (rows, vocab)."""

    def set_next(self, first: int, tokens: torch.Tensor) -> None:
        """The next input ids of slots first..first+len(tokens)-1."""

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s state (and next id) into slot `target`."""

    def carry(self, job: AnswerJob, budget: int) -> bool:
        """Prefill a finished turn's answer into the prefix cache, when worth it; whether it ran."""

    def stats(self, compile_decode: bool, compile_suffix: bool) -> dict:
        """Whether the decode steps and resumed prefills run compiled, and how many did."""


class TransformersRunner:
    """Prompts through the checkpoint's own transformers modules (vision tower, text tower), decode steps through
    the engine's tower or those modules."""

    def __init__(self, model, max_rows: int, max_len: int, pad_token_id: int, prefill_tokens: int,
                 prefix_cache: PrefixCache, vision_cache: VisionCache, compile_decode: bool = False,
                 compile_suffix: bool = False, decode_path: str = "engine") -> None:
        self.model, self.text, self.lm_head = model, model.model.language_model, model.lm_head
        self.text_config = model.config.get_text_config()
        self.vocab_size = self.text_config.vocab_size
        self.device = model.device
        self.prefix_cache, self.vision_cache = prefix_cache, vision_cache
        self._pad, self._prefill_tokens = pad_token_id, prefill_tokens
        conv_dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Conv1d)), model.dtype)

        def slot_cache(**sizes) -> SlotCache:
            return SlotCache(self.text_config, max_rows, max_len, model.dtype, self.device, conv_dtype, **sizes)

        with torch.inference_mode():  # as every tensor the engine thread makes: a compiled step guards on it
            self.cache = slot_cache()
            self._next_ids = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        # The decode step: the engine's own text tower (fused projections, in-place states), or transformers'.
        if decode_path == "engine":
            forward = TextTower(self.text, self.lm_head)
        else:
            forward = reference_decode(self.text, self.lm_head)
        self.decode_path = decode_path
        self.step = DecodeStep(forward, compile_decode, lambda: slot_cache(initial_len=16),
                               freeze=self.device.type == "cpu" and decode_path == "engine")
        self.taps = StateTaps(self.text)  # before the suffix graphs are traced: they trace through it
        self.suffix = SuffixForward(self.text, compile_suffix, self.text_config.hidden_size, model.dtype, self.device)

    # ---- prompts ----

    def start_prefill(self, group: list[Family], past: Snapshot | None) -> Prefill:
        leads = [family[0] for family in group]
        length = past.length if past else 0
        inputs = merge_inputs([r.inputs for r in leads], self._pad)
        embeds = self._embed(leads, inputs["input_ids"][:, length:], length)
        return Prefill(group, embeds, inputs["attention_mask"], self._prefill_tokens, self.text_config, past,
                       self._stores(leads, inputs["input_ids"].shape[1], length))

    def _stores(self, leads: list[Row], width: int, past: int) -> dict[int, list[tuple[int, bytes]]]:
        """Suffix column -> (family index, key) of each family whose last turn end is not stored yet."""
        stores: dict[int, list[tuple[int, bytes]]] = {}
        if not self.prefix_cache.enabled:
            return stores
        for index, lead in enumerate(leads):
            point = self.prefix_cache.worth_storing(lead.layout, past) if lead.layout is not None else None
            if point is None:
                continue
            column = width - lead.prompt_len + point[0] - past
            if column > 0:
                stores.setdefault(column, []).append((index, point[1]))
        return stores

    def _embed(self, leads: list[Row], ids: torch.Tensor, past: int) -> torch.Tensor:
        """Token embeddings of `ids` (the group's prompts from position `past` on) with the vision
        features scattered into the image/video placeholders, as MiniCPM-V 4.6's own forward does."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(ids)
        for kind, token_id in (("image", self.model.config.image_token_id),
                               ("video", self.model.config.video_token_id)):
            parts = [part for lead in leads if (part := self._features(lead, kind, past)) is not None]
            if parts:
                values = torch.cat(parts).to(embeds.device, embeds.dtype)
                embeds = embeds.masked_scatter(inner.get_placeholder_mask(ids, embeds, values, token_id), values)
        return embeds

    def _features(self, lead: Row, kind: str, past: int) -> torch.Tensor | None:
        """One request's vision features of `kind` for its placeholders from position `past` on: from the
        vision cache where it holds an item, the vision tower (one forward for all missing items) otherwise."""
        inner = self.model.model
        pixels_key, sizes_key = ("pixel_values", "target_sizes") if kind == "image" else \
            ("pixel_values_videos", "target_sizes_videos")
        tower = inner.get_image_features if kind == "image" else inner.get_video_features
        inputs, mode = lead.inputs, lead.downsample_mode
        if pixels_key not in inputs:
            return None
        if lead.layout is None:  # placeholders that did not match the media: the whole request, uncached
            return torch.cat(tower(inputs[pixels_key][:1], inputs[sizes_key], downsample_mode=mode).pooler_output)
        items = [item for item in lead.layout.media if item.kind == kind and item.start >= past]
        if not items:
            return None
        options = mode or "default"
        cache = self.vision_cache
        found = [cache.get(item, options) if cache.enabled else None for item in items]
        missing = [item for item, features in zip(items, found) if features is None]
        if missing:
            sizes = inputs[sizes_key]
            patch = self.model.config.vision_config.patch_size
            columns = [0, *torch.cumsum(sizes.prod(-1) * patch, 0).tolist()]
            spans = [(item.first_unit, item.first_unit + len(item.runs)) for item in missing]
            pixels = torch.cat([inputs[pixels_key][:1, ..., columns[a]:columns[b]] for a, b in spans], dim=-1)
            units = torch.cat([sizes[a:b] for a, b in spans])
            pooled = tower(pixels, units, downsample_mode=mode).pooler_output
            computed, unit = {}, 0
            for item in missing:
                computed[id(item)] = torch.cat(pooled[unit : unit + len(item.runs)])
                unit += len(item.runs)
                if cache.enabled:
                    cache.put(item, options, computed[id(item)])
            found = [features if features is not None else computed[id(item)] for item, features in zip(items, found)]
        return torch.cat(found)

    def prefill_chunk(self, prefill: Prefill) -> torch.Tensor | None:
        """Forward the next chunk of the group's prompts; after the last chunk, the logits of the last
        position (rows, vocab), else None. Snapshots the families whose last turn ends within the chunk."""
        (start, end), past = prefill.next_chunk(), prefill.past
        stores = prefill.stores_within(start, end)
        inside = {column - start: [index for index, _ in due] for column, due in stores.items() if column < end}
        embeds, mask = prefill.embeds[:, start:end], prefill.mask[:, : past + end]
        positions = prefill.positions[:, past + start : past + end]
        if not inside and self.suffix.covers(embeds.shape[0], past + start, end - start):
            hidden, linear = self.suffix(embeds, mask, positions, prefill.cache), {}  # a chat's later turn, mostly
        else:
            with self.taps.at(inside) as linear:
                hidden = self.text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   cache=prefill.cache, use_cache=True).last_hidden_state
        prefill.offset = end
        for column, due in stores.items():
            for index, key in due:
                length = prefill.families[index][0].layout.store_at[0]
                taps = linear.get((column - start, index))
                self.prefix_cache.store(key, prefill.snapshot(index, length, column, taps))
        return self.lm_head(hidden[:, -1]) if prefill.done else None

    def carry(self, job: AnswerJob, budget: int) -> bool:
        """Prefill a turn's answer from its chat's longest stored prefix, in one forward, and store the state
        after the next user turn's opening. Skipped when nothing is stored to resume from, when the answer is
        stored already or longer than `budget` positions, or when media follow the stored prefix."""
        end, key = job.point
        past = self.prefix_cache.longest(job.layout, before=end, count=False)
        if past is None or key in self.prefix_cache or end - past.length > budget \
                or any(item.start >= past.length for item in job.layout.media):
            return False
        cache = DynamicCache(config=self.text_config)
        restore(cache, past)
        ids = job.ids[:, past.length : end].to(self.device)
        self.text(inputs_embeds=self.model.model.get_input_embeddings()(ids), cache=cache, use_cache=True,
                  position_ids=torch.arange(past.length, end, device=self.device)[None])
        self.prefix_cache.store(key, snapshot(cache, 0, end, end))
        return True

    # ---- the running rows ----

    def join(self, slot: int, prefill: Prefill, family: int) -> None:
        width, length = prefill.mask.shape[1], prefill.families[family][0].prompt_len
        self.cache.load(slot, prefill.cache, family, width - length, length)

    def decode(self, rows: int) -> torch.Tensor:
        positions, mask = self.cache.begin_step(rows, masked=self.step.compiled and rows > 1)
        logits = self.step(self._next_ids[:rows, None], positions, mask, self.cache)
        self.cache.end_step()
        return logits

    def set_next(self, first: int, tokens: torch.Tensor) -> None:
        self._next_ids[first : first + len(tokens)] = tokens

    def move(self, source: int, target: int) -> None:
        self.cache.move(source, target)
        self._next_ids[target] = self._next_ids[source]

    def stats(self, compile_decode: bool, compile_suffix: bool) -> dict:
        return {"decode": {**self.step.state(compile_decode), "compiled_steps": self.step.compiled_steps},
                "resumed_prefill": {**self.suffix.state(compile_suffix), "compiled_calls": self.suffix.compiled_calls}}
