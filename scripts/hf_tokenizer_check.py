#!/usr/bin/env python3
"""Cross-checks titan's token ids for a tokenizer.json folder against Hugging Face's tokenizers
library with torchtitan's special-token handling (HuggingFaceTokenizer in torchtitan v0.2.2:
tokenizer_config.json's *_token keys, then added_tokens_decoder, passed to add_special_tokens;
BOS/EOS around each document).

usage: hf_tokenizer_check.py TOKENIZER_DIR TITAN_TOKENIZE WORK_DIR
Exit status 0 when every document's ids match, 1 otherwise (the first differences printed).
"""
import json
import os
import struct
import subprocess
import sys

from tokenizers import AddedToken, Tokenizer

STANDARD_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                 "mask_token"]

TEXTS = [
    "Hello, the world!\nA b",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "  leading spaces, trailing tabs\t\t\n\nand blank lines\r\n",
    "Numbers: 1234567890, 3.14159, -42 and 1e-3; code: def f(x): return x**2  # square",
    "Unicode: caf\u00e9, na\u00efve, \u00fcber, \u4e2d\u6587, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, emoji \U0001F600!",
    "Punctuation runs ?!?! ... --- *** ((( ))) [[ ]] {{ }} \"quoted\" 'single' `tick`",
    "he said: the end?\nThe End.",
]


def token_of(config, key):
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def hf_ids(folder):
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    added = []
    for key in STANDARD_KEYS:
        name = token_of(config, key)
        if name is not None:
            added.append(AddedToken(name, special=True))
    for entry in config.get("added_tokens_decoder", {}).values():
        if isinstance(entry, dict) and "content" in entry:
            added.append(AddedToken(entry["content"], special=entry.get("special", True)))
    if added:
        tok.add_special_tokens(added)
    bos = tok.token_to_id(token_of(config, "bos_token") or "<|begin_of_text|>")
    eos = tok.token_to_id(token_of(config, "eos_token") or "<|end_of_text|>")
    docs = [[bos] + tok.encode(t, add_special_tokens=False).ids + [eos] for t in TEXTS]
    return docs, tok.get_vocab_size(with_added_tokens=True)


def titan_ids(folder, titan_tokenize, work):
    os.makedirs(work, exist_ok=True)
    inputs = os.path.join(work, "docs.jsonl")
    with open(inputs, "w", encoding="utf-8") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    out = os.path.join(work, "shards")
    subprocess.run([titan_tokenize, "--hf_assets_path", folder, "--threads", "1", "--overwrite",
                    "--output", out, inputs], check=True)
    data = open(os.path.join(out, "shard_00000.bin"), "rb").read()
    magic, _version, width, count, vocab = struct.unpack("<8sIIQQ", data[:32])
    assert magic == b"TITANTOK", magic
    ids = struct.unpack("<%d%s" % (count, "H" if width == 2 else "I"), data[32:32 + width * count])
    return list(ids), vocab


def main():
    folder, titan_tokenize, work = sys.argv[1:4]
    want_docs, want_vocab = hf_ids(folder)
    got, got_vocab = titan_ids(folder, titan_tokenize, work)
    want = [i for d in want_docs for i in d]
    print(f"{folder}: Hugging Face vocab {want_vocab}, titan {got_vocab}; "
          f"{len(want)} ids from Hugging Face, {len(got)} from titan")
    ok = want == got and want_vocab == got_vocab
    if not ok:
        pos = 0
        for n, doc in enumerate(want_docs):
            if got[pos:pos + len(doc)] != doc:
                print(f"document {n} {TEXTS[n]!r}:\n  hf    {doc}\n  titan {got[pos:pos + len(doc) + 4]}")
                break
            pos += len(doc)
    print("ids match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
