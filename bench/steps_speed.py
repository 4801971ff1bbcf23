"""Segmenter speed: 64 completions x 512 tokens, the size of one trainer step's batch.

    python bench/steps_speed.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timeit  # noqa: E402

from vlm_mig.models import build_tiny_tokenizer  # noqa: E402
from vlm_mig.steps import cot_mask, segment_batch, step_index  # noqa: E402


def main() -> None:
    tok = build_tiny_tokenizer(seed=0)
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        lines = [f"### Step {i}: {rng.randrange(99)} + {rng.randrange(99)} = {rng.randrange(200)} cubes and spheres"
                 for i in range(1, 40)]
        text = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>42</answer><|im_end|>"
        rows.append(tok.encode(text, add_special_tokens=False)[:512])
    t = time.perf_counter()
    segment_batch(rows, tok)
    cold = time.perf_counter() - t
    warm = timeit(lambda: segment_batch(rows, tok), repeats=5)
    spans = segment_batch(rows, tok)
    masks = timeit(lambda: (cot_mask(spans, 512), step_index(spans, 512)), repeats=5)
    print(f"64 x 512 tokens: segment {warm * 1e3:.1f} ms ({warm / 64 * 1e3:.2f} ms per completion; "
          f"first call {cold * 1e3:.1f} ms), masks {masks * 1e3:.1f} ms, mean K {sum(s.K for s in spans) / 64:.1f}")


if __name__ == "__main__":
    main()
