"""Tiny, randomly initialised Kandinsky 5.0 Image Lite checkpoints for tests and CPU development.

What
    ``build_tiny(out_dir, kind)`` writes a complete diffusers-format folder (``model_index.json``, one sub-folder
    per component) that loads through the *same* code path as the real weights::

        Kandinsky5T2IPipeline.from_pretrained(build_tiny(d, "t2i"))
        Kandinsky5I2IPipeline.from_pretrained(build_tiny(d, "i2i"))

    Every component is an instance of the real class, only very small: ``Kandinsky5Transformer3DModel``
    (T2I: ``visual_cond=False``; I2I: ``visual_cond=True``, i.e. 2*16+1 = 33 input channels = noise, image latent,
    ones-mask), ``Qwen2_5_VLForConditionalGeneration`` (tiny text *and* vision tower, because I2I feeds the image to
    Qwen-VL) with a real ``Qwen2VLProcessor`` (tokenizer + image processor + video processor),
    ``CLIPTextModel`` + ``CLIPTokenizer``, a 16-channel x8 ``AutoencoderKL`` (FLUX-like scaling factor 0.3611) and
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. A 1024x1024, 10-step CFG generation takes about 2.5 s on a
    2-core CPU (float32); each folder is about 1.9 MB.

    ``ensure_tiny(root, kind)`` returns ``root/<kind>``, (re)building it when it is missing or was written by another
    ``TINY_BUILDER_VERSION`` (atomic: built in a temporary folder, then renamed; concurrent callers serialise on a
    lock file).

Why it looks the way it does
    * Tokenizers are byte-level BPEs (``tokenizers`` BPE models inside the stock ``Qwen2Tokenizer`` /
      ``CLIPTokenizer``) whose merges are learnt here from a small built-in corpus, so nothing is downloaded. The
      merges come from a small BPE trainer in this file rather than ``tokenizers.trainers.BpeTrainer``, because the
      latter breaks frequency ties differently from one process to the next.
    * The pipelines cut a fixed number of tokens off the Qwen sequence (T2I: 40, I2I: 54), meant to be exactly the
      template text before the prompt. The corpus holds both templates many times, so every template
      word is one token and the T2I prefix is exactly 40 tokens. The I2I prefix has only 49 words, so the final
      merges of five I2I-only words are dropped (each becomes two tokens) to land on exactly 54, and ``user`` is an
      added token because I2I glues the prompt straight onto it (``...<|im_start|>user{}``). Otherwise the slice
      would cut into the prompt or keep template tokens. ``make_qwen_tokenizer`` checks both counts.
    * The CLIP tokenizer behaves like CLIP's: lower-casing, ``</w>`` word ends, bos/eos, padding to 77 with eos.
    * Kandinsky 5 zero-initialises all AdaLN modulation layers (gates included), so a freshly constructed DiT is an
      identity in every block: prompt, negative prompt, LoRA and block skipping would change nothing. The modulation
      is therefore re-initialised from a fixed seed, and the timestep embedding is scaled up to the size of the
      pooled CLIP embedding it is added to. Each of these (and the timestep) then changes the decoded image
      measurably, while the model stays numerically tame (no NaN at CFG 10 over 50 steps).
    * Every component is built under its own fixed seed (without disturbing the caller's RNG) and no file holds a
      path or timestamp, so builds are byte-identical across runs and processes, and the T2I and I2I folders share
      byte-identical text encoders, tokenizers, VAE and scheduler (the real server shares these between its two
      pipelines).
"""

from __future__ import annotations

import fcntl
import heapq
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

TINY_BUILDER_VERSION = "k5tiny-2"  # bump on any change to what is written
MARKER = "tiny_builder_version.txt"
KINDS = ("t2i", "i2i", "safety")  # "safety": the NSFW image classifier (transformers, not diffusers)

# --- prompt templates (copied from diffusers 0.42.1 pipelines; pinned by tests) ---------------------------------
T2I_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt engineer. Describe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>"
)
I2I_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt engineer. Based on the provided source image (first image) and target image "
    "(second image), create an interesting text prompt that can be used together with the source image to create the "
    "target image:<|im_end|><|im_start|>user{}<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
)
T2I_START_IDX, I2I_START_IDX = 40, 54
# I2I-only template words kept as two tokens each: 49 template words + 5 = 54.
_SPLIT_WORDS = ("ĠBased", "Ġprovided", "second", "Ġinteresting", "Ġtogether")

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Small English corpus of image-prompt / editing vocabulary (any word not here is spelled out in sub-word pieces).
_WORDS = """
a an the of and or with without in on at under over above below near behind beside between inside outside from to
into onto by for is are was be it its this that these those some many few one two three four five six seven eight
nine ten cat cats dog dogs bird birds horse fish cow sheep lion tiger bear fox rabbit owl dragon robot astronaut
knight wizard princess king queen man woman girl boy child children people person face eyes hair hand hands smile
portrait photo photograph painting drawing sketch illustration watercolor oil digital art style realistic detailed
cinematic lighting render anime cartoon pixel vintage retro modern futuristic fantasy surreal abstract minimalist
red blue green yellow purple orange black white gray grey pink brown gold golden silver colorful pastel vivid
big small tiny huge tall short long wide old young new bright dark soft hard warm cold wet dry sunny rainy snowy
foggy cloudy night day morning evening sunset sunrise sky cloud clouds sun moon star stars rain snow fog wind
sea ocean beach wave waves river lake water mountain mountains hill valley forest jungle desert field grass
tree trees flower flowers rose garden park house home castle tower bridge city town village street road car bus
train boat ship plane bicycle kitchen room bedroom window door wall floor roof table chair bed lamp book books cup
coffee tea cake bread apple fruit food pizza hat dress shirt coat shoes glasses wooden metal glass stone paper
fabric leather plastic crystal neon glowing shiny reflective transparent texture pattern background foreground
make change turn add remove replace keep put move rotate zoom show create give let set paint draw color colour
sign text word words letters logo title poster cover label says reading written high quality resolution sharp
focus blur depth view close up top side front back left right center middle corner edge scene landscape
cityscape skyline interior exterior wearing holding sitting standing running flying walking looking smiling
"""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    words = _WORDS.split()
    words = words + [w.capitalize() for w in words]
    special = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
    lines: list[str] = []
    for template in (T2I_TEMPLATE, I2I_TEMPLATE):
        pieces = [p for p in re.split(special, template.replace("{}", "")) if p]
        lines += pieces * 20  # frequent enough that every template word becomes a single token
    for i in range(len(words)):  # every word at least twice (min_frequency=2), in varying neighbourhoods
        lines.append(" ".join(words[i : i + 12]))
        lines.append(" ".join(words[i::37][:12]))
    return lines


def _train_bpe(words: list[tuple[str, ...]], min_frequency: int = 2) -> list[tuple[str, str]]:
    """Classic BPE training (Sennrich et al.) on pre-tokenized ``words`` (tuples of byte-level symbols).

    Written out here instead of using ``tokenizers.trainers.BpeTrainer`` because that trainer breaks ties between
    equally frequent pairs differently from process to process (seen with the CLIP ``</w>`` alphabet), which would
    make the written ``tokenizer.json`` non-reproducible. Ties here go to the lexicographically smallest pair.
    """
    counts = Counter(words)
    keys = sorted(counts)
    symbols = [list(k) for k in keys]
    freqs = [counts[k] for k in keys]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            pairs[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pairs.get(pair, 0):
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        merges.append(pair)
        a, b = pair
        touched = set()
        for i in sorted(where.pop(pair, ())):
            word, f = symbols[i], freqs[i]
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            for q in zip(word, word[1:]):
                pairs[q] -= f
                touched.add(q)
            for q in zip(merged, merged[1:]):
                pairs[q] += f
                where[q].add(i)
                touched.add(q)
            symbols[i] = merged
        for q in sorted(touched):
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return merges


def _words(tokenizer, lines: list[str], end_of_word_suffix: str = "") -> list[tuple[str, ...]]:
    """Pre-tokenize ``lines`` with ``tokenizer``'s own normalizer / pre-tokenizer into BPE training words."""
    out = []
    for line in lines:
        if tokenizer.normalizer is not None:
            line = tokenizer.normalizer.normalize_str(line)
        for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(line):
            chars = list(piece)
            if end_of_word_suffix:
                chars[-1] += end_of_word_suffix
            out.append(tuple(chars))
    return out


def _vocab_from_merges(alphabet: list[str], merges: list[tuple[str, str]], drop=()) -> tuple[dict, list]:
    """Rebuild a vocab deterministically: alphabet, then merge results in merge order, minus ``drop`` tokens."""
    vocab = {t: i for i, t in enumerate(alphabet)}
    kept = []
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b in drop:
            continue
        kept.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    return vocab, kept


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def make_qwen_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    # The stock class builds the real Qwen2 normalizer / pre-tokenizer; train on exactly what it produces.
    merges = _train_bpe(_words(Qwen2Tokenizer().backend_tokenizer, _corpus()))
    vocab, merges = _vocab_from_merges(_byte_alphabet(), merges, drop=set(_SPLIT_WORDS))
    for t in QWEN_SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        errors="replace",
    )
    # I2I's template glues the prompt onto "user" ("...<|im_start|>user{}"); as an added token "user" can never merge
    # with the prompt's first letters, so the I2I slice boundary holds for every prompt.
    tokenizer.add_tokens([AddedToken("user", special=False, normalized=False)])
    for template, start in ((T2I_TEMPLATE, T2I_START_IDX), (I2I_TEMPLATE, I2I_START_IDX)):
        n = len(tokenizer(template.split("{}")[0])["input_ids"])
        if n != start:  # the pipelines would slice into the prompt (or keep template tokens)
            raise RuntimeError(f"tiny Qwen tokenizer: template prefix is {n} tokens, the pipeline cuts {start}")
    return tokenizer


def make_clip_tokenizer():
    from transformers import CLIPTokenizer

    # CLIP style: lower-cased, words end in "</w>"; normalizer / pre-tokenizer are the stock CLIPTokenizer ones.
    merges = _train_bpe(_words(CLIPTokenizer().backend_tokenizer, _corpus(), end_of_word_suffix="</w>"))
    alphabet = _byte_alphabet()
    vocab, merges = _vocab_from_merges(alphabet + [c + "</w>" for c in alphabet], merges)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ---------------------------------------------------------------------------------------------------------------
# Models (each built under its own fixed seed so T2I and I2I share byte-identical encoders / VAE)
# ---------------------------------------------------------------------------------------------------------------
QWEN_HIDDEN = 32  # -> transformer in_text_dim
CLIP_HIDDEN = 32  # -> transformer in_text_dim2
SEEDS = {"text_encoder": 1, "text_encoder_2": 2, "vae": 3, "t2i": 4, "i2i": 5, "safety": 6}


def make_qwen_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        # min/max pixels of the real Qwen2.5-VL preprocessor (transformers' default max is smaller)
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056}),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )


def make_qwen_vl(tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=QWEN_HIDDEN,
            fullatt_block_indexes=[1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEEDS["text_encoder"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_clip(tokenizer):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEEDS["text_encoder_2"])
    return CLIPTextModel(config).eval()


def make_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 4 levels -> 3 downsamplings -> x8 like FLUX's VAE
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


def make_transformer(kind: str):
    import torch
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(SEEDS[kind])
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        out_visual_dim=16,
        in_text_dim=QWEN_HIDDEN,
        in_text_dim2=CLIP_HIDDEN,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=2,
        num_visual_blocks=4,
        axes_dims=(8, 12, 12),  # head_dim = sum = 32 -> one head (attention over 4096 tokens dominates CPU time)
        visual_cond=kind == "i2i",
    )
    # Undo the zero-init of every AdaLN modulation (see module docstring), and make the timestep embedding (std ~0.15
    # at default init) as strong as the pooled CLIP embedding it is added to (LayerNorm, std ~1), so t matters.
    gen = torch.Generator().manual_seed(SEEDS[kind] + 1000)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                lin = module.out_layer
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
        model.time_embeddings.out_layer.weight.mul_(6.0)
        model.time_embeddings.out_layer.bias.mul_(6.0)
    return model.eval()


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_pipeline(kind: str = "t2i"):
    """The tiny pipeline object (in memory), exactly what ``build_tiny`` saves."""
    import torch
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    qwen_tok = make_qwen_tokenizer()
    clip_tok = make_clip_tokenizer()
    cls = Kandinsky5T2IPipeline if kind == "t2i" else Kandinsky5I2IPipeline
    with torch.random.fork_rng(devices=[]):  # the per-component seeds leave the caller's RNG alone
        return cls(
            transformer=make_transformer(kind),
            vae=make_vae(),
            text_encoder=make_qwen_vl(qwen_tok),
            tokenizer=make_qwen_processor(qwen_tok),
            text_encoder_2=make_clip(clip_tok),
            tokenizer_2=clip_tok,
            scheduler=make_scheduler(),
        )


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def build_safety_classifier(out: Path) -> None:
    """A tiny randomly initialised ``ViTForImageClassification`` with labels ``normal``/``nsfw`` and its image
    processor: the same classes (and the same loading code) as the default real classifier."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS["safety"])
        model = ViTForImageClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)


def build_tiny(out_dir: str | Path, kind: str = "t2i") -> Path:
    """Write a tiny Kandinsky 5 ``kind`` ("t2i" | "i2i", diffusers format) checkpoint, or the tiny safety
    classifier ("safety", transformers format), to ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "safety":
        build_safety_classifier(out)
    else:
        build_pipeline(kind).save_pretrained(out, safe_serialization=True)
    (out / MARKER).write_text(TINY_BUILDER_VERSION + "\n")
    return out


def ensure_tiny(root: str | Path, kind: str = "t2i") -> Path:
    """Return ``root/<kind>``, building it if missing or built by another ``TINY_BUILDER_VERSION``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(root)
    target = root / kind

    def fresh() -> bool:
        try:
            return (target / MARKER).read_text().strip() == TINY_BUILDER_VERSION
        except OSError:
            return False

    if fresh():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent callers wait; the loser finds a fresh folder
        if fresh():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-build-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            build_tiny(tmp, kind)
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{kind}-stale-", dir=root))
                os.replace(target, stale / kind)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
