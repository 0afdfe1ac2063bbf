"""Tests of fluxmini.tokenizers (CLIP-L BPE and T5 sentencepiece).

The committed goldens (tests/data/token_goldens.npz, made by tests/make_token_goldens.py with
transformers + sentencepiece) cover the whole corpus tests/data/prompts.json without needing
transformers; ``test_live_*`` compare against transformers directly when it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest

from fluxmini import tokenizers as tk
from fluxmini.errors import FluxMiniError, FluxMiniValueError

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "prompts.json")
GOLDENS = os.path.join(HERE, "data", "token_goldens.npz")
DATA = os.path.join(HERE, "..", "python", "fluxmini", "data", "tokenizers")

# Prompts on which transformers' T5Tokenizer and sentencepiece (our reference) disagree.
# Special-token text (our decision: plain text, like sentencepiece) and three prompts where
# transformers' own pipeline (WhitespaceSplit pre-tokenizer, Unigram lattice) differs from
# sentencepiece: U+0085 is a separator for it, stacked combining marks normalise differently,
# and a long "abab..." word is segmented differently.
T5_HF_DIFFERS = {
    "</s>",
    "<pad>",
    "<unk>",
    "hello</s>world",
    "x</s>y <extra_id_0> z",
    "<extra_id_99> and <extra_id_0>",
    "next\x85line",
    "a\u0300\u0301\u0302\u0303\u0304 stacked marks",
    "ab" * 200,
}


def _corpus_sha256(prompts):
    canon = json.dumps(prompts, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


@pytest.fixture(scope="module")
def prompts():
    with open(CORPUS, encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, list) and all(isinstance(p, str) for p in data)
    return data


@pytest.fixture(scope="module")
def goldens(prompts):
    with np.load(GOLDENS) as npz:
        g = {k: npz[k] for k in npz.files}
    assert str(g["corpus_sha256"]) == _corpus_sha256(prompts), "goldens are stale: run tests/make_token_goldens.py"
    return g


def _clip_content(ids):
    """Content ids of a CLIP row: between BOS and the first EOS."""
    ids = list(ids)
    assert ids[0] == tk.CLIP_BOS
    return ids[1 : ids.index(tk.CLIP_EOS, 1)]


# ---------------------------------------------------------------------------------------------
# (a) whole corpus against the committed goldens


def test_corpus_is_varied(prompts):
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    assert "" in prompts
    joined = "".join(prompts)
    for needle in ("\t", "\n", "  ", "&amp;", "https://", "#", "'s", "\u2019", "\U0001f600", "\u732b", "\u043a", "\u0645",
                   "\u00e9", "</s>", "<|endoftext|>", "<extra_id_0>"):
        assert needle in joined, needle
    assert any(len(p.split()) > 100 for p in prompts)
    assert any(p.isupper() for p in prompts)


def test_clip_corpus_equals_goldens(prompts, goldens):
    expected = goldens["clip"]
    assert expected.shape == (len(prompts), 77)
    bad = [i for i, p in enumerate(prompts) if not np.array_equal(tk.tokenize_clip(p), expected[i])]
    assert not bad, [(i, prompts[i]) for i in bad[:10]]


def test_t5_corpus_equals_goldens(prompts, goldens):
    expected = goldens["t5"]
    assert expected.shape == (len(prompts), 512)
    bad = [i for i, p in enumerate(prompts) if not np.array_equal(tk.tokenize_t5(p), expected[i])]
    assert not bad, [(i, prompts[i]) for i in bad[:10]]


@pytest.mark.parametrize("length", [1, 2, 77, 255, 256])
def test_t5_corpus_other_lengths(prompts, goldens, length):
    rows, pieces = goldens["t5"], goldens["t5_pieces"]
    for i, p in enumerate(prompts):
        n = min(int(pieces[i]), length - 1)
        want = np.zeros(length, np.int32)
        want[:n] = rows[i, :n]
        want[n] = tk.T5_EOS
        np.testing.assert_array_equal(tk.tokenize_t5(p, length), want, err_msg=repr(p))


def test_goldens_document_t5_special_token_difference(prompts, goldens):
    differ = {p for i, p in enumerate(prompts) if not np.array_equal(goldens["t5"][i], goldens["t5_hf"][i])}
    assert differ == T5_HF_DIFFERS


# ---------------------------------------------------------------------------------------------
# (b) hand-checked vectors: docs/MODEL.md §6.2 / §7.2 and NOTICE.md

CLIP_VECTORS = [
    ("a lovely cat", [49406, 320, 2165, 2368, 49407]),
    ("A photo of an astronaut riding a horse on the moon",
     [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 518, 3293, 49407]),
    ("a  cat, 123!", [49406, 320, 2368, 267, 272, 273, 274, 256, 49407]),
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
]

T5_VECTORS = [
    ("a lovely cat", [3, 9, 3061, 1712, 1]),
    ("A photo of an astronaut riding a horse on the moon", [71, 1202, 13, 46, 30059, 7494, 3, 9, 4952, 30, 8, 8114, 1]),
    ("a  cat, 123!", [3, 9, 1712, 6, 3, 14574, 55, 1]),
    ("Hello world", [8774, 296, 1]),
]


@pytest.mark.parametrize("prompt,ids", CLIP_VECTORS)
def test_clip_vectors(prompt, ids):
    out = tk.tokenize_clip(prompt)
    assert out.dtype == np.int32 and out.shape == (77,)
    assert out[: len(ids)].tolist() == ids
    assert (out[len(ids):] == 49407).all()


@pytest.mark.parametrize("prompt,ids", T5_VECTORS)
def test_t5_vectors(prompt, ids):
    out = tk.tokenize_t5(prompt)
    assert out.dtype == np.int32 and out.shape == (512,)
    assert out[: len(ids)].tolist() == ids
    assert (out[len(ids):] == 0).all()


def test_clip_cleaning():
    # case, whitespace runs (tabs, newlines, NBSP, ideographic space), NFC all vanish
    ref = tk.tokenize_clip("a caf\u00e9 cat")
    for variant in ["A CAF\u00c9 CAT", "  a\tcafe\u0301\n\ncat  ", "a\u00a0caf\u00e9\u3000cat", "a cAf\u00c9    cat"]:
        np.testing.assert_array_equal(tk.tokenize_clip(variant), ref, err_msg=repr(variant))
    # no ftfy / HTML unescaping (transformers 5.x): &amp; is not "&", curly quote is not "'"
    assert not np.array_equal(tk.tokenize_clip("tom &amp; jerry"), tk.tokenize_clip("tom & jerry"))
    assert not np.array_equal(tk.tokenize_clip("it\u2019s"), tk.tokenize_clip("it's"))
    # single digits: "123" is three tokens
    assert _clip_content(tk.tokenize_clip("123")) == [272, 273, 274]


# ---------------------------------------------------------------------------------------------
# (c) live comparison with transformers (the only allowed skip)


def test_live_clip_against_transformers(prompts):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(os.path.join(DATA, "clip-l", "vocab.json"), os.path.join(DATA, "clip-l", "merges.txt"))
    extra = [
        "\u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u039f\u03a3",  # final sigma: lowercased per character
        "a\x1cb\x1dc\x1ed\x1fe",  # not White_Space for the reference
        "\u00bd\u00b2\u2167\u3007 \u0661\u0662",  # \p{N} beyond ASCII digits, one token each
        "x<|startoftext|>y<|endoftext|>z <|EndOfText|>", "!<|endoftext|>!!", "a's''s'S 're'RE",
    ]
    # every character of a few blocks between letters, digits and apostrophes
    extra += ["".join(f"a{chr(c)}1{chr(c)}{chr(c)}b'{chr(c)}s " for c in range(lo, lo + 16))
              for lo in range(0, 0x3000, 16) if not 0xD800 <= lo < 0xE000]
    batch = prompts + extra
    want = np.asarray(ref(batch, padding="max_length", max_length=77, truncation=True)["input_ids"], np.int32)
    bad = [i for i, p in enumerate(batch) if not np.array_equal(tk.tokenize_clip(p), want[i])]
    assert not bad, [(i, batch[i]) for i in bad[:10]]


def test_live_t5_against_transformers(prompts):
    transformers = pytest.importorskip("transformers")
    ref = transformers.T5Tokenizer.from_pretrained(os.path.join(DATA, "t5"))
    want = np.asarray(ref(prompts, padding="max_length", max_length=512, truncation=True)["input_ids"], np.int32)
    differ = {p for i, p in enumerate(prompts) if not np.array_equal(tk.tokenize_t5(p), want[i])}
    assert differ == T5_HF_DIFFERS


def test_live_t5_against_sentencepiece(prompts):
    import sentencepiece  # a runtime dependency of fluxmini

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(DATA, "t5", "spiece.model"))
    for p in prompts + ["</s>" * 600, "<extra_id_1>" * 3]:
        ids = sp.encode(p)[:511] + [1]
        want = np.zeros(512, np.int32)
        want[: len(ids)] = ids
        np.testing.assert_array_equal(tk.tokenize_t5(p), want, err_msg=repr(p))


# ---------------------------------------------------------------------------------------------
# (d) errors


@pytest.mark.parametrize("bad", [None, b"a cat", 3, 1.5, ["a cat"], ("a",), False])
def test_prompt_must_be_str(bad):
    for fn in (tk.tokenize_clip, tk.tokenize_t5):
        with pytest.raises(FluxMiniValueError, match="prompt must be a str"):
            fn(bad)


def test_prompt_str_subclass_ok():
    assert np.array_equal(tk.tokenize_clip(np.str_("a lovely cat")), tk.tokenize_clip("a lovely cat"))


def test_prompt_lone_surrogate():
    for fn in (tk.tokenize_clip, tk.tokenize_t5):
        with pytest.raises(FluxMiniValueError, match="surrogate"):
            fn("a \ud800 cat")


@pytest.mark.parametrize("bad", [0, -1, 4097, 10**9, 1.0, 512.0, "512", None, True, False, np.float32(8)])
def test_t5_length_invalid(bad):
    with pytest.raises(FluxMiniValueError, match="length"):
        tk.tokenize_t5("a cat", bad)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        tk.tokenize_t5("a cat", 0)
    with pytest.raises(FluxMiniError):
        tk.tokenize_clip(None)


@pytest.mark.parametrize("length", [1, 2, 3, 4096, np.int64(256), np.int32(7)])
def test_t5_length_valid(length):
    out = tk.tokenize_t5("a lovely cat", length)
    assert out.shape == (int(length),) and out.dtype == np.int32
    full = [3, 9, 3061, 1712]
    n = min(len(full), int(length) - 1)
    assert out[:n].tolist() == full[:n]
    assert out[n] == 1
    assert (out[n + 1:] == 0).all()


# ---------------------------------------------------------------------------------------------
# (e) literal special-token text


def test_clip_special_token_text_follows_transformers():
    # exact-case <|startoftext|> / <|endoftext|> in the raw prompt are the special ids ...
    assert tk.tokenize_clip("x<|endoftext|>y")[:5].tolist() == [49406, 343, 49407, 344, 49407]
    assert tk.tokenize_clip("<|startoftext|>")[:3].tolist() == [49406, 49406, 49407]
    # ... other spellings are plain text (lowercased, then "<|", "endoftext", "|>")
    ids = _clip_content(tk.tokenize_clip("<|ENDOFTEXT|>"))
    assert ids == [27, 347, 40786, 4160, 91, 285]


def test_t5_special_token_text_is_plain_text():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(DATA, "t5", "spiece.model"))
    for text in ["</s>", "<pad>", "<unk>", "<s>", "x</s>y <extra_id_0> z", "<extra_id_99>"]:
        out = tk.tokenize_t5(text)
        pieces = sp.encode(text)
        n = len(pieces)
        assert out[:n].tolist() == pieces and out[n] == 1 and (out[n + 1:] == 0).all()
        assert 1 not in out[:n].tolist() and 0 not in out[:n].tolist()
        assert (out < 32000).all()  # no sentinel ids
    # "</s>" is "<" (unknown to T5 -> 2) followed by ordinary pieces; not an early EOS
    assert tk.tokenize_t5("hello</s>world")[:1].tolist() == [21820]
    assert tk.tokenize_t5("</s>")[:5].tolist() == [3, 2, 87, 7, 3155]


# ---------------------------------------------------------------------------------------------
# (f) truncation and padding


def test_clip_truncation_keeps_eos():
    prompt = " ".join(f"word{i}" for i in range(200))
    out = tk.tokenize_clip(prompt)
    assert out.shape == (77,)
    assert out[0] == 49406 and out[76] == 49407
    assert 49407 not in out[1:76].tolist() and 49406 not in out[1:].tolist()
    full = tk.clip_tokenizer().token_ids(prompt)
    assert len(full) > 75
    assert out[1:76].tolist() == full[:75]


@pytest.mark.parametrize("n", [73, 74, 75, 76, 200])
def test_clip_boundary(n):
    out = tk.tokenize_clip("cat " * n)
    k = min(n, 75)
    assert out[1 : 1 + k].tolist() == [2368] * k
    assert (out[1 + k:] == 49407).all()


def test_clip_padding_and_empty():
    assert tk.tokenize_clip("").tolist() == [49406] + [49407] * 76
    assert tk.tokenize_clip(" \t\n ").tolist() == [49406] + [49407] * 76
    out = tk.tokenize_clip("a cat")
    assert out[:4].tolist() == [49406, 320, 2368, 49407] and (out[4:] == 49407).all()


def test_t5_truncation_keeps_eos():
    prompt = " ".join(f"word{i}" for i in range(600))
    out = tk.tokenize_t5(prompt)
    assert out.shape == (512,)
    assert out[511] == 1 and 0 not in out.tolist() and 1 not in out[:511].tolist()
    full = tk.t5_tokenizer().token_ids(prompt)
    assert len(full) > 511 and out[:511].tolist() == full[:511]
    short = tk.tokenize_t5(prompt, 16)
    assert short[:15].tolist() == full[:15] and short[15] == 1


def test_t5_padding_and_empty():
    assert tk.tokenize_t5("").tolist() == [1] + [0] * 511
    assert tk.tokenize_t5("", 1).tolist() == [1]
    assert tk.tokenize_t5("a cat", 1).tolist() == [1]
    out = tk.tokenize_t5("a cat", 8)
    assert out.tolist() == [3, 9, 1712, 1, 0, 0, 0, 0]


def test_results_are_fresh_arrays():
    a = tk.tokenize_clip("a lovely cat")
    a[:] = 0
    assert tk.tokenize_clip("a lovely cat")[1] == 320
    b = tk.tokenize_t5("a lovely cat")
    b[:] = 7
    assert tk.tokenize_t5("a lovely cat")[0] == 3


def test_loaders_are_cached():
    assert tk.clip_tokenizer() is tk.clip_tokenizer()
    assert tk.t5_tokenizer() is tk.t5_tokenizer()


def test_speed(prompts):
    tk.clip_tokenizer(), tk.t5_tokenizer()
    start = time.perf_counter()
    for p in prompts:
        tk.tokenize_clip(p)
        tk.tokenize_t5(p)
    # about 0.1 s on a desktop CPU; generous bound against pathological slow-downs
    assert time.perf_counter() - start < 5.0
    start = time.perf_counter()
    tk.tokenize_clip("x" * 50000)  # one huge word: BPE must not be quadratic
    assert time.perf_counter() - start < 5.0
