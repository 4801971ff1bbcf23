"""Step segmenter (SPEC.md section 1): hand examples and hypothesis property tests.

Three tokenizers:
- ``tiny``: the tiny model's byte-level BPE; ``<think>``/``</think>``/``<answer>``/``</answer>`` are single
  added tokens, the Qwen2-VL markers are special tokens.
- ``multi``: the same BPE with the four format tags removed from the added tokens, so each tag is
  several ordinary tokens and some of them straddle (``'<think'``, ``'>\\n'``), as in real Qwen2 vocabularies.
- ``wild``: a hand-made byte-level BPE without any pre-tokenizer split whose merges cross tags, words
  and UTF-8 character boundaries (tokens hold partial multi-byte characters plus neighbours).

Invariants checked on arbitrary text (``check_invariants``):
1. every span lies in ``[0, length]`` with ``start <= end``; the non-None spans among think_open, think,
   think_close, answer_open, answer, answer_close are disjoint and in that order;
2. steps are non-empty, sorted, contiguous, inside the think span, and end exactly at its end; the tokens
   of the think span before the first step decode to whitespace only (with K = 0: the whole think span
   does); so steps + that whitespace leftover partition the think tokens exactly;
3. no token or character is split: decoding each step's ids and concatenating reproduces the decoded
   think span after the leftover (a split character would decode to U+FFFD), and ``texts`` equal the
   per-step decodes;
4. 1 <= K <= max_steps whenever the think span has non-whitespace text; every step's stripped text has at
   least ``min_step_chars`` characters when K >= 2;
5. no interior step boundary falls strictly inside an image/grounding span;
6. with the tiny tokenizer the think span decodes to exactly the text between the first ``<think>`` and
   the next ``</think>``, and the answer span to the text between ``<answer>`` and ``</answer>``;
7. padding never changes the result (``pad_id``, ``length``, tensor input give the same spans).
"""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_mig.models import FORMAT_TOKENS, SPECIAL_TOKENS, build_tiny_tokenizer
from vlm_mig.steps import (
    StepConfig,
    StepSpans,
    cot_mask,
    segment,
    segment_batch,
    span_mask,
    step_index,
    token_bytes,
)

# --------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer(seed=0)


@pytest.fixture(scope="module")
def multi(tiny):
    """The tiny BPE where the format tags are NOT added tokens (several tokens each, like real Qwen2)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tiny.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in FORMAT_TOKENS]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )


#: Byte strings the ``wild`` vocabulary holds as single tokens: partial UTF-8 characters glued to their
#: neighbours (é = C3 A9, 😀 = F0 9F 98 80, 中 = E4 B8 AD, 文 = E6 96 87), tags glued to newlines.
WILD_TOKENS = [
    b" \xc3",
    b"\xa9 ",
    b"a\xf0\x9f",
    b"\x98\x80b",
    b"\x98\x80",
    b"\n\xe4",
    b"\xb8\xad\xe6",
    b"\x96\x87",
    b"caf\xc3",
    b">\n",
    b"\n<",
    b"\n#",
    b"###",
    b" Step",
    b"\n\n",
    b"think",
    b"answer",
    b"</",
    b"cube",
]


@pytest.fixture(scope="module")
def wild():
    """Hand-made byte-level BPE whose merges cross tags, words and UTF-8 character boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlm_mig.steps import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []
    for raw in WILD_TOKENS:
        cur = b2u[raw[0]]
        for b in raw[1:]:
            nxt = cur + b2u[b]
            if nxt not in vocab:
                vocab[nxt] = len(vocab)
                merges.append((cur, b2u[b]))
            cur = nxt
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def toks(tiny, multi, wild):
    return {"tiny": tiny, "multi": multi, "wild": wild}


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def step_texts(tok, ids, sp: StepSpans) -> list[str]:
    return [tok.decode(ids[a:b]) for a, b in sp.steps]


# --------------------------------------------------------------------------------------------------
# Invariants


def _between(text: str, open_: str, close: str, start: int = 0):
    i = text.find(open_, start)
    if i < 0:
        return None
    j = text.find(close, i + len(open_))
    if j < 0:
        return None
    return text[i + len(open_) : j], j + len(close)


def check_invariants(tok, ids: list[int], sp: StepSpans, cfg: StepConfig, exact_tags: bool) -> None:
    n = len(ids)
    assert sp.length == n
    # 1. bounds and order of the labelled spans
    labelled = [sp.think_open, sp.think, sp.think_close, sp.answer_open, sp.answer, sp.answer_close]
    for s in labelled + sp.steps + sp.atomic:
        if s is not None:
            assert 0 <= s[0] <= s[1] <= n, s
    present = [s for s in labelled if s is not None]
    for a, b in pairwise(present):
        assert a[1] <= b[0], (a, b)
    # 2. steps tile the think span after a whitespace-only leftover
    if sp.think is None:
        assert sp.steps == [] and sp.K == 0 and sp.prefix_ends == []
        return
    t0, t1 = sp.think
    if sp.K == 0:
        assert tok.decode(ids[t0:t1]).strip() == ""
        assert sp.prefix_ends == [t0]
        return
    assert sp.steps[0][0] >= t0 and sp.steps[-1][1] == t1
    for a, b in sp.steps:
        assert a < b
    for (_, e), (s, _) in pairwise(sp.steps):
        assert e == s
    assert tok.decode(ids[t0 : sp.steps[0][0]]).strip() == ""
    assert sp.prefix_ends == [t0] + [e for _, e in sp.steps]
    # 3. nothing split: per-step decodes concatenate to the decoded think text
    per_step = step_texts(tok, ids, sp)
    assert "".join(per_step) == tok.decode(ids[sp.steps[0][0] : t1])
    assert sp.texts == per_step
    # 4. K bounds and minimum length
    assert 1 <= sp.K <= cfg.max_steps
    assert all(t.strip() for t in per_step), per_step  # whitespace-only steps are not steps
    if sp.K >= 2:
        assert all(len(t.strip()) >= cfg.min_step_chars for t in per_step), per_step
    # 5. no interior boundary inside an atomic span
    for s, _ in sp.steps[1:]:
        for a0, a1 in sp.atomic:
            assert not (a0 < s < a1), (s, a0, a1)
    # 6. exact tag extraction when the tags are single tokens
    if exact_tags and not cfg.open_in_prompt:
        full = tok.decode(ids)
        think_open, think_close = cfg.think_tags
        got = _between(full, think_open, think_close)
        if got is not None and sp.think_close is not None:
            assert tok.decode(ids[t0:t1]) == got[0]
            ans = _between(full, cfg.answer_tags[0], cfg.answer_tags[1], got[1])
            if ans is not None:
                assert sp.answer is not None and tok.decode(ids[sp.answer[0] : sp.answer[1]]) == ans[0]


# --------------------------------------------------------------------------------------------------
# Hand examples

ANSWER_TAIL = "\n</think>\n<answer>5</answer><|im_end|>"


def seg(tok, text, **kw):
    ids = enc(tok, text)
    sp = segment(ids, tok, **{k: v for k, v in kw.items() if k != "cfg"}, config=kw.get("cfg"))
    check_invariants(
        tok, ids, sp, kw.get("cfg") or StepConfig(), exact_tags=tok.added_tokens_encoder.get("<think>") is not None
    )
    return ids, sp


@pytest.mark.parametrize("name", ["tiny", "multi", "wild"])
def test_headers(toks, name):
    tok = toks[name]
    text = "<think>\n### Step 1: count the red cubes\n### Step 2: add the two spheres\n" + ANSWER_TAIL[1:]
    ids, sp = seg(tok, text)
    assert sp.K == 2
    stripped = [t.strip() for t in sp.texts]
    if name != "wild":  # the wild vocabulary may glue a header to the previous step's last token
        assert stripped == ["### Step 1: count the red cubes", "### Step 2: add the two spheres"]
    assert "count the red cubes" in sp.texts[0] and "add the two spheres" in sp.texts[1]
    assert tok.decode(ids[sp.answer[0] : sp.answer[1]]) == "5"
    assert sp.think_open is not None and sp.think_close is not None


def test_header_spans_tiny(tiny):
    text = "<think>\n### Step 1: count the red cubes\n### Step 2: add the two spheres\n" + ANSWER_TAIL[1:]
    ids, sp = seg(tiny, text)
    assert sp.think_open == (0, 1) and tiny.decode(ids[sp.think_close[0] : sp.think_close[1]]) == "</think>"
    # the newline after <think> is whitespace left before step 1, not a step
    assert sp.steps[0][0] == sp.think[0] + 1 and tiny.decode(ids[sp.think[0] : sp.steps[0][0]]) == "\n"
    assert sp.texts == ["### Step 1: count the red cubes\n", "### Step 2: add the two spheres\n"]
    assert sp.prefix_ends == [1, sp.steps[0][1], sp.steps[1][1]]
    assert tiny.decode(ids[sp.answer_open[0] : sp.answer_close[1]]) == "<answer>5</answer>"


def test_multi_token_tags_same_steps(tiny, multi):
    text = "<think>\n### Step 1: count the red cubes\n### Step 2: add the two spheres\n</think>\n<answer>5</answer>"
    _, a = seg(tiny, text)
    ids, b = seg(multi, text)
    assert len(enc(multi, "<think>")) > 1
    assert [t.strip() for t in a.texts] == [t.strip() for t in b.texts]
    assert multi.decode(ids[b.think_open[0] : b.think_open[1]]).strip() == "<think>"
    assert multi.decode(ids[b.think_close[0] : b.think_close[1]]).strip() == "</think>"
    assert multi.decode(ids[b.answer[0] : b.answer[1]]) == "5"


def test_preamble_is_own_step_or_merged(tiny):
    _, sp = seg(tiny, "<think>Let me look at the image first.\n### Step 1: count the cubes\n" + ANSWER_TAIL[1:])
    assert sp.K == 2 and sp.texts[0] == "Let me look at the image first.\n"
    _, sp = seg(tiny, "<think>Ok.\n### Step 1: count the cubes\n" + ANSWER_TAIL[1:])
    assert sp.K == 1 and sp.texts[0].startswith("Ok.\n### Step 1")


def test_blank_lines(tiny):
    text = "<think>First paragraph here.\nstill first.\n\nSecond paragraph here.\n \n\nThird one is here.</think>"
    _, sp = seg(tiny, text)
    assert sp.texts == [
        "First paragraph here.\nstill first.\n\n",
        "Second paragraph here.\n \n\n",
        "Third one is here.",
    ]
    assert sp.answer is None and sp.think_close is not None


def test_single_newlines(tiny):
    _, sp = seg(tiny, "<think>line one is long\nline two is long\nline three</think><answer>3</answer>")
    assert sp.texts == ["line one is long\n", "line two is long\n", "line three"]


def test_no_split_points_one_step(tiny):
    _, sp = seg(tiny, "<think>just one thought</think><answer>1</answer>")
    assert sp.texts == ["just one thought"]


def test_short_step_merge(tiny):
    text = "<think>a\nThis is a long line\nok\nAnother long line\n   </think>"
    _, sp = seg(tiny, text)
    # first piece is short -> merged into the next; later short pieces -> merged into the previous one
    assert sp.texts == ["a\nThis is a long line\nok\n", "Another long line\n   "]
    # min_step_chars=0 keeps short pieces, but a whitespace-only piece is never a step of its own
    _, sp = seg(tiny, text, cfg=StepConfig(min_step_chars=0))
    assert sp.texts == ["a\n", "This is a long line\n", "ok\n", "Another long line\n   "]
    _, sp = seg(tiny, "<think>tiny</think>")  # a single short step is still a step
    assert sp.texts == ["tiny"]


def test_max_steps_cap(tiny):
    body = "\n".join(f"### Step {i}: value is {i * 3}" for i in range(1, 21))
    _, sp = seg(tiny, f"<think>\n{body}\n</think><answer>1</answer>")
    assert sp.K == 16
    assert sp.texts[14].startswith("### Step 15:")
    assert sp.texts[15].startswith("### Step 16:") and sp.texts[15].rstrip().endswith("### Step 20: value is 60")
    _, sp = seg(tiny, f"<think>\n{body}\n</think>", cfg=StepConfig(max_steps=3))
    assert sp.K == 3 and sp.texts[2].count("### Step") == 18


def test_no_think_is_k0(tiny):
    ids, sp = seg(tiny, "The answer is <answer>7</answer><|im_end|>")
    assert sp.K == 0 and sp.think is None and sp.think_open is None and sp.prefix_ends == []
    assert tiny.decode(ids[sp.answer[0] : sp.answer[1]]) == "7"
    _, sp = seg(tiny, "### Step 1: no think tags at all\n### Step 2: still none")
    assert sp.K == 0 and sp.answer is None


def test_blank_think_is_k0(tiny):
    _, sp = seg(tiny, "<think>\n \n</think><answer>1</answer>")
    assert sp.K == 0 and sp.think is not None and sp.prefix_ends == [sp.think[0]]
    _, sp = seg(tiny, "<think></think><answer>1</answer>")
    assert sp.K == 0 and sp.think == (1, 1)


def test_unclosed_think(tiny):
    # runs to <answer> when one follows
    ids, sp = seg(tiny, "<think>\n### Step 1: count the cubes\n<answer>5</answer><|im_end|>")
    assert sp.K == 1 and sp.think_close is None and sp.texts == ["### Step 1: count the cubes\n"]
    assert tiny.decode(ids[sp.answer[0] : sp.answer[1]]) == "5"
    # runs to the end (a truncated rollout), trailing EOS/pad excluded
    ids, sp = seg(tiny, "<think>\n### Step 1: count the cubes\n### Step 2: then add<|im_end|>")
    assert sp.K == 2 and sp.texts[-1] == "### Step 2: then add" and sp.think[1] == len(ids) - 1
    # require_close: no think span at all
    _, sp = seg(tiny, "<think>\n### Step 1: count the cubes\n", cfg=StepConfig(require_close=True))
    assert sp.K == 0 and sp.think is None


def test_open_in_prompt(tiny):
    _, sp = seg(
        tiny,
        "### Step 1: count the cubes\n### Step 2: sum them up\n</think>\n<answer>4</answer>",
        cfg=StepConfig(open_in_prompt=True),
    )
    assert sp.K == 2 and sp.think[0] == 0 and sp.think_open is None


def test_unclosed_answer_is_none(tiny):
    _, sp = seg(tiny, "<think>step one is here</think><answer>5")
    assert sp.K == 1 and sp.answer is None and sp.answer_open is None


def test_grounding_span_not_cut(tiny):
    text = (
        "<think>\n### Step 1: the cube <|box_start|>(10,20)\n### Step 2 inside box<|box_end|> is red\n"
        "### Step 3: <|object_ref_start|>the\n\nball<|object_ref_end|> is blue\n</think><answer>2</answer>"
    )
    _, sp = seg(tiny, text)
    assert sp.K == 2
    assert "<|box_start|>(10,20)\n### Step 2 inside box<|box_end|> is red" in sp.texts[0]
    assert sp.texts[1].startswith("### Step 3:") and "<|object_ref_end|>" in sp.texts[1]
    assert len(sp.atomic) == 2
    # blank-line mode: the blank line inside the object ref is not a boundary
    _, sp = seg(
        tiny, "<think>look at <|object_ref_start|>the\n\nball<|object_ref_end|> there\n\nsecond part here</think>"
    )
    assert sp.texts == ["look at <|object_ref_start|>the\n\nball<|object_ref_end|> there\n\n", "second part here"]


def test_image_span_atomic(tiny):
    img = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    _, sp = seg(tiny, f"<think>look again {img}\nsee the red cube\nthen count all of them</think>")
    assert sp.K == 3 and sp.texts[0] == f"look again {img}\n"
    # unclosed vision span: atomic to the end, so nothing after it is cut
    _, sp = seg(tiny, "<think>first line is long\nsee <|vision_start|><|image_pad|>\nmore text here\nand more</think>")
    assert sp.texts == ["first line is long\n", "see <|vision_start|><|image_pad|>\nmore text here\nand more"]


@pytest.mark.parametrize("name", ["tiny", "multi", "wild"])
def test_multibyte(toks, name):
    tok = toks[name]
    text = (
        "<think>\n### Step 1: café é 😀 中文 naïve\n### Step 2: 日本語 🙂🙂 ü\n\n"
        "### Step 3: 😀中文😀é</think>\n<answer>é</answer>"
    )
    _, sp = seg(tok, text)
    assert sp.K == 3 or (name == "wild" and sp.K >= 2)  # wild glues "\n#" across the last boundary
    assert all("\ufffd" not in t for t in sp.texts)
    joined = "".join(sp.texts)
    for piece in ("café é 😀 中文 naïve", "日本語 🙂🙂 ü", "😀中文😀é"):
        assert piece in joined


def test_wild_tokenizer_splits_characters(wild):
    """The wild vocabulary really does put partial UTF-8 characters into tokens with their neighbours."""
    table = token_bytes(wild)
    ids = enc(wild, "a😀b中文é 😀😀 café\n\n### Step 1: 中é")
    straddling = [b for b in table(ids) if b and b.decode("utf-8", "replace").count("\ufffd")]
    assert straddling, wild.convert_ids_to_tokens(ids)


def test_sentencepiece_byte_fallback():
    """Llama/SentencePiece-style vocabularies: ``▁`` for spaces, ``<0xNN>`` byte tokens for é, emoji, CJK."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for c in string.ascii_letters + string.digits + string.punctuation + "\u2581":
        vocab.setdefault(c, len(vocab))
    merges = []
    for a, b in [("\u2581", "S"), ("\u2581S", "t"), ("\u2581St", "e"), ("\u2581Ste", "p"), ("#", "#"), ("##", "#")]:
        vocab.setdefault(a + b, len(vocab))
        merges.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    text = "<think>\n### Step 1: café é 😀 中文\n### Step 2: count them</think>\n<answer>é</answer><|im_end|>"
    ids = enc(tok, text)
    assert token_bytes(tok).mode == "metaspace"
    assert b"".join(token_bytes(tok)(ids)).decode().lstrip(" ") == tok.decode(ids) == text
    sp = segment(ids, tok)
    assert sp.texts == ["### Step 1: café é 😀 中文\n", "### Step 2: count them"]
    assert tok.decode(ids[sp.answer[0] : sp.answer[1]]) == "é"


def test_padding_length_and_tensor(tiny):
    text = "<think>\n### Step 1: count the red cubes\n### Step 2: add two\n</think><answer>5</answer><|im_end|>"
    ids = enc(tiny, text)
    pad = tiny.pad_token_id
    base = segment(ids, tiny)
    padded = ids + [pad] * 7
    assert segment(padded, tiny, pad_id=pad) == base
    assert segment(padded, tiny, length=len(ids)) == base
    assert segment(torch.tensor(padded), tiny, length=len(ids)) == base
    with pytest.raises(ValueError):
        segment(torch.tensor([padded]), tiny)


def test_unknown_ids_never_raise(tiny):
    think_open, think_close = tiny.convert_tokens_to_ids(["<think>", "</think>"])
    sp = segment([think_open, 10**6, -1, 5, think_close], tiny)  # an id the tokenizer does not know maps to no bytes
    assert sp.think == (1, 4) and sp.K == 1


def test_batch_and_masks(tiny):
    texts = [
        "<think>\n### Step 1: count the red cubes\n### Step 2: add two\n</think><answer>5</answer><|im_end|>",
        "no think here <answer>1</answer><|im_end|>",
        "<think>line one is long\nline two is long</think><answer>2</answer><|im_end|>",
    ]
    enc_rows = [enc(tiny, t) for t in texts]
    L = max(map(len, enc_rows)) + 2
    pad = tiny.pad_token_id
    batch = torch.tensor([r + [pad] * (L - len(r)) for r in enc_rows])
    lengths = torch.tensor([len(r) for r in enc_rows])
    spans = segment_batch(batch, tiny, lengths=lengths)
    assert spans == segment_batch(batch, tiny, pad_id=pad)
    assert [s.K for s in spans] == [2, 0, 2]
    idx = step_index(spans, L)
    m = cot_mask(spans, L)
    assert idx.shape == (3, L) and idx.dtype == torch.long and m.dtype == torch.bool
    for b, sp in enumerate(spans):
        assert idx[b].tolist() == sp.step_index(L)
        for k, (s, e) in enumerate(sp.steps):
            assert (idx[b, s:e] == k).all()
        assert int(m[b].sum()) == sum(e - s for s, e in sp.steps)
    assert not m[1].any()
    am = span_mask(spans, L, "answer")
    assert tiny.decode(batch[0][am[0]].tolist()) == "5"
    shifted = step_index(spans, L + 3, offset=3)
    assert (shifted[:, 3:] == idx).all() and (shifted[:, :3] == -1).all()


def test_config_validation():
    with pytest.raises(ValueError):
        StepConfig(max_steps=0)
    with pytest.raises(ValueError):
        StepConfig(min_step_chars=-1)


# --------------------------------------------------------------------------------------------------
# Property tests

FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "### Step ",
    "### Step 1: ",
    "\n",
    "\n\n",
    " \n ",
    " ",
    "\t",
    "a",
    "cube",
    "count the cubes",
    "1",
    "42",
    ":",
    ".",
    "é",
    "😀",
    "中文",
    "naïve",
    "🙂",
    "<|box_start|>",
    "<|box_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|im_end|>",
    "<|endoftext|>",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=60).map("".join)
configs = st.builds(
    StepConfig,
    min_step_chars=st.integers(0, 25),
    max_steps=st.integers(1, 20),
    open_in_prompt=st.booleans(),
    require_close=st.booleans(),
)
PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(text=texts, cfg=configs, which=st.sampled_from(["tiny", "multi", "wild"]))
def test_property_invariants(toks, text, cfg, which):
    tok = toks[which]
    ids = enc(tok, text)
    sp = segment(ids, tok, config=cfg)
    check_invariants(tok, ids, sp, cfg, exact_tags=which == "tiny")
    # 7. padding does not change the result
    pad = tok.pad_token_id
    assert segment(ids + [pad] * 3, tok, length=len(ids), config=cfg) == sp


@PROPS
@given(text=texts)
def test_property_bytes_match_decode(toks, text):
    for tok in toks.values():
        ids = enc(tok, text)
        assert b"".join(token_bytes(tok)(ids)).decode("utf-8") == tok.decode(ids)


@PROPS
@given(data=st.data(), cfg=configs)
def test_property_random_ids_never_raise(tiny, data, cfg):
    n = len(tiny)
    ids = data.draw(st.lists(st.integers(-2, n + 20), max_size=80))
    sp = segment(ids, tiny, config=cfg)
    assert sp.length == len(ids) and sp.K <= cfg.max_steps
    for (_, e), (s, _) in pairwise(sp.steps):
        assert e == s
