"""Prompt tokenizers for FLUX.1-mini's two text encoders.

* :class:`ClipTokenizer` -- CLIP-L byte-level BPE, pure Python, equal to the Hugging Face
  ``transformers`` 5.x ``CLIPTokenizer`` built from the shipped ``vocab.json`` / ``merges.txt``
  (no ftfy, no HTML unescaping). Output: ``[BOS 49406] + tokens + [EOS 49407]``, truncated to 77
  keeping EOS, padded to 77 with 49407.
* :class:`T5Tokenizer` -- T5 v1.1 SentencePiece unigram model through the ``sentencepiece``
  package. Output: the pieces of ``sentencepiece``'s own ``encode`` + ``</s>`` (1), truncated
  keeping EOS at the end, padded with ``<pad>`` (0).

The data files live in ``fluxmini/data/tokenizers`` (see NOTICE.md there) and are loaded once by
:func:`clip_tokenizer` / :func:`t5_tokenizer`. :func:`tokenize_clip` / :func:`tokenize_t5` are the
validated entry points the rest of the package uses.

Literal special-token text in a prompt (docs/MODEL.md §6.2 and §7.2):

* CLIP follows its reference, transformers' ``CLIPTokenizer`` (and OpenAI's original tokenizer):
  the exact, case-sensitive strings ``<|startoftext|>`` and ``<|endoftext|>`` in the raw prompt
  become the special ids 49406 / 49407. Other spellings (e.g. ``<|ENDOFTEXT|>``) are plain text.
* T5 follows plain ``sentencepiece``: every prompt is text. ``</s>``, ``<pad>``, ``<unk>`` and
  ``<extra_id_N>`` inside a prompt are segmented like any other characters (``<`` is not in the
  T5 vocabulary, so it becomes ``<unk>`` = 2); only the appended EOS is id 1. transformers 5.x's
  ``T5Tokenizer`` differs here: it maps such text to ids 1 / 0 / 2 / 32099-N. A user's prompt is
  text, and a stray EOS or sentinel id in the middle of the T5 sequence is never what was meant.

Unicode version: character classes, NFC and lowercasing come from Python's ``unicodedata``
(Unicode 14.0 on Python 3.11). For every character assigned in that version the CLIP output equals
the reference's; characters assigned only in later Unicode versions (which the reference's Rust
libraries know) are treated as unassigned (neither letter nor number) and may tokenize differently.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import threading
import unicodedata
from importlib import resources

import numpy as np

from .errors import FluxMiniFileError, FluxMiniRuntimeError, FluxMiniValueError

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CLIP_LENGTH",
    "T5_EOS",
    "T5_PAD",
    "T5_MAX_LENGTH",
    "ClipTokenizer",
    "T5Tokenizer",
    "clip_tokenizer",
    "t5_tokenizer",
    "tokenize_clip",
    "tokenize_t5",
]

CLIP_BOS = 49406
CLIP_EOS = 49407
CLIP_PAD = CLIP_EOS
CLIP_LENGTH = 77
T5_PAD = 0
T5_EOS = 1
T5_MAX_LENGTH = 4096

_CLIP_SPECIAL = {"<|startoftext|>": CLIP_BOS, "<|endoftext|>": CLIP_EOS}
# Split of the raw prompt on special-token text (transformers' added-token matching: exact,
# case-sensitive, on the raw text, before any normalisation).
_CLIP_SPECIAL_SPLIT = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")

# Unicode White_Space: what `\s` matches in the (Oniguruma) regexes of the reference tokenizer.
# Python's own `\s` / str.isspace() also matches U+001C..U+001F, which the reference does not.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS_RUN = re.compile("[" + re.escape(_WHITE_SPACE) + "]+")

# Character classes of the pre-split pattern
#   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
_LETTER, _NUMBER, _SPACE, _OTHER = 0, 1, 2, 3


def _char_class(c: str) -> int:
    if c in _WHITE_SPACE:
        return _SPACE
    major = unicodedata.category(c)[0]
    if major == "L":
        return _LETTER
    if major == "N":
        return _NUMBER
    return _OTHER


def _bytes_to_unicode() -> list[str]:
    """GPT-2 byte -> printable character table (index = byte value)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_data(*parts: str) -> bytes:
    node = resources.files("fluxmini").joinpath("data").joinpath("tokenizers")
    for p in parts:
        node = node.joinpath(p)
    try:
        return node.read_bytes()
    except OSError as e:  # pragma: no cover - broken installation
        raise FluxMiniFileError(f"fluxmini: tokenizer data file {'/'.join(parts)} is missing: {e}") from e


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise FluxMiniValueError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FluxMiniValueError(f"prompt is not valid Unicode text (lone surrogate at index {e.start})") from None
    return prompt


class ClipTokenizer:
    """CLIP-L byte-level BPE tokenizer (OpenAI ``simple_tokenizer`` / HF ``CLIPTokenizer``).

    Steps, as transformers 5.x does them:

    1. the raw prompt is split on the literal special tokens ``<|startoftext|>`` /
       ``<|endoftext|>`` (exact case), which map to 49406 / 49407;
    2. every other segment is normalised: Unicode NFC, each run of White_Space replaced by one
       space, lowercased character by character (no final-sigma rule);
    3. it is split into pieces: ``<|startoftext|>``, ``<|endoftext|>`` (lowercased spellings of
       them, which are then re-split as ``<|`` / letters / ``|>``), ``'s 't 're 've 'm 'll 'd``,
       runs of Unicode letters (L*), single Unicode numbers (N*), runs of anything else except
       white space;
    4. each piece -> UTF-8 -> GPT-2 byte characters -> BPE (last symbol carries ``</w>``) -> ids.

    ``encode`` returns int32 [77]: BOS, at most 75 tokens, EOS, then 49407 padding.
    """

    bos_id = CLIP_BOS
    eos_id = CLIP_EOS
    pad_id = CLIP_PAD
    length = CLIP_LENGTH

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self._vocab = vocab
        self._ranks = {pair: i for i, pair in enumerate(merges)}
        self._byte_chars = _bytes_to_unicode()
        self._classes: dict[str, int] = {chr(i): _char_class(chr(i)) for i in range(128)}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_data(cls, vocab_json: bytes | str, merges_txt: bytes | str) -> "ClipTokenizer":
        if isinstance(vocab_json, bytes):
            vocab_json = vocab_json.decode("utf-8")
        if isinstance(merges_txt, bytes):
            merges_txt = merges_txt.decode("utf-8")
        vocab = json.loads(vocab_json)
        merges = []
        for line in merges_txt.split("\n"):
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((a, b))
        return cls(vocab, merges)

    # -- text -> pieces --------------------------------------------------------------------

    @staticmethod
    def _normalize(text: str) -> str:
        text = unicodedata.normalize("NFC", text)
        text = _WS_RUN.sub(" ", text)
        if "\u03a3" in text:
            # str.lower() applies the final-sigma rule; the reference lowercases per character.
            return "".join([c.lower() for c in text])
        return text.lower()

    def _pieces(self, text: str):
        """Yield the pre-tokenizer pieces of normalised text."""
        classes = self._classes
        n = len(text)
        i = 0
        while i < n:
            c = text[i]
            if c == "'":
                nxt = text[i + 1 : i + 3]
                if nxt in ("re", "ve", "ll"):
                    yield text[i : i + 3]
                    i += 3
                    continue
                if nxt and nxt[0] in "stmd":
                    yield text[i : i + 2]
                    i += 2
                    continue
            elif c == "<":
                if text.startswith("<|startoftext|>", i):
                    # the byte-level pre-tokenizer re-splits this piece (GPT-2 pattern)
                    yield "<|"
                    yield "startoftext"
                    yield "|>"
                    i += 15
                    continue
                if text.startswith("<|endoftext|>", i):
                    yield "<|"
                    yield "endoftext"
                    yield "|>"
                    i += 13
                    continue
            k = classes.get(c)
            if k is None:
                k = classes[c] = _char_class(c)
            if k == _SPACE:
                i += 1
                continue
            if k == _NUMBER:
                yield c
                i += 1
                continue
            j = i + 1
            if k == _LETTER:
                while j < n:
                    d = text[j]
                    kd = classes.get(d)
                    if kd is None:
                        kd = classes[d] = _char_class(d)
                    if kd != _LETTER:
                        break
                    j += 1
            else:
                while j < n:
                    d = text[j]
                    kd = classes.get(d)
                    if kd is None:
                        kd = classes[d] = _char_class(d)
                    if kd != _OTHER:
                        break
                    j += 1
            yield text[i:j]
            i = j

    # -- BPE ------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        bc = self._byte_chars
        syms = [bc[b] for b in piece.encode("utf-8")]
        syms[-1] += "</w>"
        n = len(syms)
        if n > 1:
            ranks = self._ranks
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            alive = [True] * n
            heap = []
            for i in range(n - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None:
                    heap.append((r, i))
            heapq.heapify(heap)
            # Lowest rank first, leftmost first among equal ranks (same result as OpenAI's
            # "merge every occurrence of the best pair" loop).
            while heap:
                r, i = heapq.heappop(heap)
                if not alive[i]:
                    continue
                j = nxt[i]
                if j < 0 or ranks.get((syms[i], syms[j])) != r:
                    continue  # stale entry
                syms[i] += syms[j]
                alive[j] = False
                k = nxt[j]
                nxt[i] = k
                if k >= 0:
                    prv[k] = i
                    rr = ranks.get((syms[i], syms[k]))
                    if rr is not None:
                        heapq.heappush(heap, (rr, i))
                p = prv[i]
                if p >= 0:
                    rr = ranks.get((syms[p], syms[i]))
                    if rr is not None:
                        heapq.heappush(heap, (rr, p))
            syms = [s for s, a in zip(syms, alive) if a]
        vocab = self._vocab
        ids = tuple(vocab[s] for s in syms)
        with self._lock:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    # -- public ---------------------------------------------------------------------------

    def token_ids(self, prompt: str, limit: int | None = None) -> list[int]:
        """Content ids of ``prompt`` without BOS/EOS/padding; stops once ``limit`` are known."""
        out: list[int] = []
        for seg in _CLIP_SPECIAL_SPLIT.split(prompt):
            if limit is not None and len(out) >= limit:
                break
            if not seg:
                continue
            special = _CLIP_SPECIAL.get(seg)
            if special is not None:
                out.append(special)
                continue
            for piece in self._pieces(self._normalize(seg)):
                out.extend(self._bpe(piece))
                if limit is not None and len(out) >= limit:
                    break
        return out if limit is None else out[:limit]

    def encode(self, prompt: str) -> np.ndarray:
        """int32 [77]: BOS, up to 75 tokens, EOS, padded with 49407."""
        _check_prompt(prompt)
        ids = self.token_ids(prompt, limit=self.length - 2)
        out = np.full(self.length, self.pad_id, dtype=np.int32)
        out[0] = self.bos_id
        out[1 : 1 + len(ids)] = ids
        out[1 + len(ids)] = self.eos_id
        return out


class T5Tokenizer:
    """T5 v1.1 SentencePiece unigram tokenizer (via the ``sentencepiece`` package).

    ``encode(prompt, length)`` -> int32 [length]: ``sentencepiece``'s ``encode(prompt)`` (its
    model carries the NMT-NFKC normaliser, whitespace collapsing and the ``▁`` prefix), then
    ``</s>`` = 1; if longer than ``length`` the pieces are cut to ``length - 1`` so EOS stays
    last; then padded with ``<pad>`` = 0.

    Special-token text in the prompt is plain text (``"</s>"`` is *not* id 1, ``"<extra_id_0>"``
    is not 32099): this is plain sentencepiece behaviour. transformers 5.x's ``T5Tokenizer``
    would map them to special ids; for all other prompts the two agree.
    """

    eos_id = T5_EOS
    pad_id = T5_PAD

    def __init__(self, processor):
        self._sp = processor

    @classmethod
    def from_data(cls, model_proto: bytes) -> "T5Tokenizer":
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - dependency missing
            raise FluxMiniRuntimeError(
                "fluxmini: the T5 tokenizer needs the 'sentencepiece' package (pip install sentencepiece)"
            ) from e
        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(model_proto)
        return cls(sp)

    def token_ids(self, prompt: str) -> list[int]:
        """Piece ids of ``prompt`` without EOS / padding."""
        return self._sp.encode(prompt)

    def encode(self, prompt: str, length: int = 512) -> np.ndarray:
        _check_prompt(prompt)
        length = _check_length(length)
        ids = self.token_ids(prompt)
        n = min(len(ids), length - 1)
        out = np.full(length, self.pad_id, dtype=np.int32)
        out[:n] = ids[:n]
        out[n] = self.eos_id
        return out


def _check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise FluxMiniValueError(f"T5 length must be an int, got {type(length).__name__}")
    length = int(length)
    if not 1 <= length <= T5_MAX_LENGTH:
        raise FluxMiniValueError(f"T5 length must be in [1, {T5_MAX_LENGTH}], got {length}")
    return length


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> ClipTokenizer:
    """The shared CLIP-L tokenizer (data loaded once)."""
    return ClipTokenizer.from_data(_read_data("clip-l", "vocab.json"), _read_data("clip-l", "merges.txt"))


@functools.lru_cache(maxsize=None)
def t5_tokenizer() -> T5Tokenizer:
    """The shared T5 tokenizer (data loaded once)."""
    return T5Tokenizer.from_data(_read_data("t5", "spiece.model"))


def tokenize_clip(prompt: str) -> np.ndarray:
    """CLIP-L ids of ``prompt``: int32 [77] (BOS, <= 75 tokens, EOS, 49407 padding)."""
    _check_prompt(prompt)
    return clip_tokenizer().encode(prompt)


def tokenize_t5(prompt: str, length: int = 512) -> np.ndarray:
    """T5 ids of ``prompt``: int32 [length] (pieces, EOS 1, 0 padding)."""
    _check_prompt(prompt)
    length = _check_length(length)
    return t5_tokenizer().encode(prompt, length)
