"""Write tests/data/token_goldens.npz: reference token ids for every prompt of tests/data/prompts.json.

Needs the test-only packages transformers (5.x) and sentencepiece; does not use fluxmini's own
tokenizers (only its data files). Run from anywhere:

    python tests/make_token_goldens.py

Arrays written (N = number of prompts):

* ``clip``       int32 [N, 77]  transformers ``CLIPTokenizer(vocab.json, merges.txt)``,
                 padding="max_length", max_length=77, truncation=True (the CLIP reference).
* ``t5``         int32 [N, 512] sentencepiece ``encode(prompt)`` of spiece.model + ``</s>`` (1),
                 truncated to 511 pieces + EOS, padded with 0 (the T5 reference).
* ``t5_pieces``  int32 [N]      number of sentencepiece pieces before EOS/truncation.
* ``t5_hf``      int32 [N, 512] transformers ``T5Tokenizer`` from spiece.model, same padding and
                 truncation: recorded to document where it differs (special-token text).
* ``corpus_sha256``, ``transformers_version``, ``sentencepiece_version``: strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "python", "fluxmini", "data", "tokenizers")
CORPUS = os.path.join(HERE, "data", "prompts.json")
OUT = os.path.join(HERE, "data", "token_goldens.npz")
T5_LENGTH = 512


def corpus_sha256(path: str = CORPUS) -> str:
    """Hash of the prompt list (not of the file's formatting)."""
    with open(path, encoding="utf-8") as f:
        prompts = json.load(f)
    canon = json.dumps(prompts, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def main() -> int:
    import sentencepiece
    import transformers
    from transformers import CLIPTokenizer, T5Tokenizer

    with open(CORPUS, encoding="utf-8") as f:
        prompts = json.load(f)
    assert isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)

    clip = CLIPTokenizer(os.path.join(DATA, "clip-l", "vocab.json"), os.path.join(DATA, "clip-l", "merges.txt"))
    clip_ids = clip(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    clip_arr = np.asarray(clip_ids, dtype=np.int32)
    assert clip_arr.shape == (len(prompts), 77)

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(DATA, "t5", "spiece.model"))
    t5_arr = np.zeros((len(prompts), T5_LENGTH), dtype=np.int32)
    t5_pieces = np.zeros(len(prompts), dtype=np.int32)
    for i, p in enumerate(prompts):
        ids = sp.encode(p)
        t5_pieces[i] = len(ids)
        ids = ids[: T5_LENGTH - 1] + [1]
        t5_arr[i, : len(ids)] = ids

    t5_hf = T5Tokenizer.from_pretrained(os.path.join(DATA, "t5"))
    hf_ids = t5_hf(prompts, padding="max_length", max_length=T5_LENGTH, truncation=True)["input_ids"]
    t5_hf_arr = np.asarray(hf_ids, dtype=np.int32)
    assert t5_hf_arr.shape == (len(prompts), T5_LENGTH)

    np.savez_compressed(
        OUT,
        clip=clip_arr,
        t5=t5_arr,
        t5_pieces=t5_pieces,
        t5_hf=t5_hf_arr,
        corpus_sha256=np.array(corpus_sha256()),
        transformers_version=np.array(transformers.__version__),
        sentencepiece_version=np.array(sentencepiece.__version__),
    )
    differ = [i for i in range(len(prompts)) if not np.array_equal(t5_arr[i], t5_hf_arr[i])]
    print(f"wrote {OUT}: {len(prompts)} prompts, {os.path.getsize(OUT)} bytes")
    print(f"T5 sentencepiece vs transformers differ on {len(differ)} prompts:")
    for i in differ:
        print(f"  {i}: {prompts[i]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
