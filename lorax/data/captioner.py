"""Captions from any transformers image-to-text model (BLIP, BLIP-2, GIT, Florence-2, …) in a local folder or the
Hugging Face cache, loaded with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (``AutoModelForVision2Seq``
on transformers 4), decoded greedily."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Captioner:
    """``captions(images)``: one caption per RGB PIL image. ``prompt`` is the text the model continues (BLIP's
    "a photography of", Florence-2's task token ``<CAPTION>``); it is cut from the front of each caption."""

    def __init__(
        self, model: str, *, prompt: str | None = None, max_new_tokens: int = 40, batch_size: int = 8
    ) -> None:
        import transformers

        from lorax.data.maskers import load_transformers

        # transformers 5 has AutoModelForImageTextToText; transformers 4 called it AutoModelForVision2Seq
        name = "AutoModelForImageTextToText"
        cls = getattr(transformers, name, None) or getattr(transformers, "AutoModelForVision2Seq")  # noqa: B009
        self.processor, self.model = load_transformers(model, "--captioner", cls)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def captions(self, images: Sequence[Any]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            kwargs: dict[str, Any] = {"images": batch, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(batch)
            inputs = self.processor(**kwargs)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            for text in self.processor.batch_decode(ids, skip_special_tokens=True):
                text = " ".join(text.split())
                if self.prompt and text.lower().startswith(self.prompt.lower()):
                    text = text[len(self.prompt) :].strip()
                out.append(text)
        return out
