"""Tiny transformers vision models built from configs and saved to folders (random weights: their text means
nothing, so tests check plumbing and hand computations): a BLIP captioner, CLIPSeg and CLIP."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "red", "blue", "circle", "square", "shape", "on", "white", "black", "background", "sks", "dog"]


def save_tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]) + "\n")
    tok = BertTokenizer(str(vocab), bos_token="[DEC]")
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(vision_config=vision, text_config=text, projection_dim=32)
    )
    model.save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(folder)
    return folder


def _clip_parts():
    from lorax.zoo.tiny import build_tokenizer

    tok = build_tokenizer(WORDS)
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )  # fmt: skip
    return tok, text, vision


def save_tiny_clipseg(folder: Path) -> Path:
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tok, text, vision = _clip_parts()
    torch.manual_seed(0)
    config = CLIPSegConfig(
        text_config=text, vision_config=vision, projection_dim=32, reduce_dim=16, extract_layers=[0, 1]
    )
    model = CLIPSegForImageSegmentation(config)
    model.save_pretrained(folder)
    images = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPSegProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, text, vision = _clip_parts()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def save_tiny_swin2sr(folder: Path, upscale: int = 2) -> Path:
    """A Swin2SR super-resolution model (pixel-shuffle upsampler, ``upscale`` ×) and its image processor."""
    import torch
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution
    from transformers.models.swin2sr.image_processing_pil_swin2sr import Swin2SRImageProcessorPil

    torch.manual_seed(0)
    config = Swin2SRConfig(
        image_size=16, patch_size=1, embed_dim=16, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0,
        upscale=upscale, upsampler="pixelshuffle",
    )  # fmt: skip
    model = Swin2SRForImageSuperResolution(config)
    model.save_pretrained(folder)
    Swin2SRImageProcessorPil(size_divisor=4).save_pretrained(folder)
    return folder
