"""Tiny, randomly initialised Hugging Face models saved to disk, for offline tests of the real loading paths.

``make_tiny_clip(folder)`` writes a folder laid out exactly like a hub CLIP checkpoint saved with
``save_pretrained`` (config.json, model.safetensors, tokenizer.json + tokenizer_config.json,
preprocessor_config.json), so code that loads "openai/clip-vit-large-patch14-336" loads it unchanged.
Building and saving takes well under a second.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# Byte-level BPE words the tiny vocabulary merges, so tokenisation is not all single characters.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("o", "g</w>"), ("c", "at</w>"), ("d", "og</w>")]


def make_tiny_clip_tokenizer(max_length: int = 16):
    """A CLIP tokenizer over the 256 byte symbols (+ end-of-word forms), a few merges and CLIP's specials."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet] + [a + b for a, b in _MERGES]:
        vocab.setdefault(symbol, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=max_length)


def make_tiny_clip(folder: str | os.PathLike, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                   hidden: int = 32, layers: int = 2, projection_dim: int = 16, max_length: int = 16,
                   with_processor: bool = True) -> Path:
    """Save a tiny random CLIPModel + tokenizer (+ PIL image processor config) into ``folder``; return it."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = Path(folder)
    tokenizer = make_tiny_clip_tokenizer(max_length)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if with_processor:
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def make_tiny_siglip_tokenizer(folder: Path, max_length: int = 16):
    """SigLIP's own tokenizer class over a tiny SentencePiece model trained here (milliseconds) on caption words."""
    import io
    import random

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    words = ("the a cat dog on mat red green blue yellow black purple circle square triangle cross house tree car "
             "boat small big").split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=max_length)


def make_tiny_siglip(folder: str | os.PathLike, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                     hidden: int = 32, layers: int = 2, max_length: int = 16) -> Path:
    """Save a tiny random SiglipModel + SiglipTokenizer + SigLIP's PIL image processor config into ``folder``,
    laid out as a hub SigLIP checkpoint saved with ``save_pretrained``."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    folder = Path(folder)
    tokenizer = make_tiny_siglip_tokenizer(folder, max_length)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
