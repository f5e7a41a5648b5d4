"""load_pipeline: a single file (converted in memory, offline) gives the same pipeline as its diffusers folder."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import tiny_folder, tiny_pipe, tiny_single

from lorax.models.pipeline import load_pipeline


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_and_folder_load_the_same_pipeline(family: str) -> None:
    single, folder = load_pipeline(tiny_single(family)), load_pipeline(tiny_folder(family))
    ref = tiny_pipe(family)
    for component in ("unet", "vae", "text_encoder"):
        want = getattr(ref, component).state_dict()
        for pipe in (single, folder):
            got = getattr(pipe, component).state_dict()
            assert set(got) == set(want)
            assert all(torch.equal(got[k], want[k]) for k in want), component
    assert type(single.scheduler) is type(ref.scheduler)
    assert single.tokenizer("a red circle").input_ids == ref.tokenizer("a red circle").input_ids
    settings = {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")}
    assert {k: single.scheduler.config[k] for k in settings} == settings


def test_dtype_and_bad_specs() -> None:
    from lorax.errors import ConfigError, ModelNotFoundError

    pipe = load_pipeline(tiny_single("sd1"), dtype="fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_pipeline(tiny_single("sd1"), dtype="fp7")
    with pytest.raises(ModelNotFoundError, match="pass a local path"):
        load_pipeline("nobody/nothing")
