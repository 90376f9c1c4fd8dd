"""Tiny tokenizers in the layouts of the real SkyReels / HunyuanVideo tokenizer folders.

Imported by the fixture generators (not run on its own).

- `llama3_style(dir)`: a byte-level BPE with Llama-3's pre-tokenizer regex, its special tokens
  (`<|begin_of_text|>`, `<|eot_id|>`, the header tokens, LLaVA's `<pad>`) appended after the
  learned vocabulary as in the real tokenizer, and a post-processor that prepends BOS. Saved as
  tokenizer.json + tokenizer_config.json with bos/eos/pad named there.
- `clip_style(dir)`: a CLIP BPE (lower-casing normalizer, CLIP's split regex, `</w>`
  word suffix, `<|startoftext|>` / `<|endoftext|>`), built with transformers' own CLIPTokenizer
  so the pipeline is the reference one; saved as vocab.json + merges.txt (what the
  HunyuanVideo repo ships in tokenizer_2/) and as tokenizer.json (tokenizer_2_json/).
"""
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import AddedToken

CORPUS = [
    "Describe the video by detailing the following aspects: the main content and theme of the video.",
    "The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
    "background environment, light, style and atmosphere. camera angles, movements, and transitions",
    "FPS-24, A cat walks on the grass, realistic style. A dog runs along the beach at sunset.",
    "The camera slowly pans across a quiet city street in the rain, with neon lights reflecting.",
    "system user assistant video image frame scene person woman man car tree water sky cloud",
]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<pad>"]


def llama3_style(out: Path, vocab_size: int = 320):
    """Returns the total vocabulary size (learned + special tokens)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<pad>", model_max_length=1 << 20)
    fast.padding_side = "right"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def clip_style(out: Path, vocab_size: int = 600):
    """Learns one CLIP BPE and saves it twice: out/tokenizer_2 as vocab.json + merges.txt (what the
    HunyuanVideo repo ships) and out/tokenizer_2_json as tokenizer.json. Returns the vocabulary size."""
    from transformers import CLIPTokenizer

    eow = "</w>"
    learner = Tokenizer(models.BPE(end_of_word_suffix=eow))
    ref = CLIPTokenizer()  # the reference normalizer and pre-tokenizer
    learner.normalizer = ref.backend_tokenizer.normalizer
    learner.pre_tokenizer = ref.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix=eow,
                                  special_tokens=[], show_progress=False)
    learner.train_from_iterator(CORPUS, trainer)
    learned = json.loads(learner.to_str())["model"]
    # CLIP's vocabulary: every byte symbol alone and with </w>, then the merges, then the specials
    vocab = {}
    for s in sorted(alphabet):
        vocab.setdefault(s, len(vocab))
    for s in sorted(alphabet):
        vocab.setdefault(s + eow, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    files, as_json = out / "tokenizer_2", out / "tokenizer_2_json"
    for d in (files, as_json):
        d.mkdir(parents=True, exist_ok=True)
        clip.save_pretrained(d)
    for f in ("vocab.json", "merges.txt"):
        (as_json / f).unlink(missing_ok=True)
    (files / "tokenizer.json").unlink(missing_ok=True)
    # the slow-tokenizer layout of the hub folder, from this very vocabulary (the BPE learner is
    # not deterministic across processes, so never keep files of an earlier run)
    (files / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (files / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)
