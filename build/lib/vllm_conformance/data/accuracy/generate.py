"""Write the self-made accuracy fixtures in this directory (seeded: the output is fixed).

Run ``python -m vllm_conformance.data.accuracy.generate`` after changing a generator in
``vllm_conformance.models.trained``, commit the files, and bump ``trained.RECIPE_VERSION`` (the
recipe never trains on these problems, so a new fixture means a new model).

Nothing here comes from the real datasets; each file only follows its dataset's schema:

* ``gsm8k/{test,train}.jsonl``: ``question``, ``answer`` (worked answer ending ``#### N``);
* ``mmlu_pro/{test,validation}.jsonl``: ``question_id, question, options (10), answer,
  answer_index, cot_content, category, src``, ten test and five validation questions per
  category (as many validation questions as the real set);
* ``chartqa/test.parquet``: ``imgname, image, query, label (list), human_or_machine``, with a
  few bar charts drawn here. A format fixture only: it proves the task loads offline and
  that requests carry an image, not that a model reads charts.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path
from typing import Any

from vllm_conformance.models import trained

HERE = Path(__file__).parent

#: seeds of the fixture sets; the training stream uses other seeds and skips these problems
SEEDS = {"gsm8k/test": 20260101, "gsm8k/train": 20260102,
         "mmlu_pro/test": 20260103, "mmlu_pro/validation": 20260104,
         "chartqa/test": 20260105}  # fmt: skip


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, sort_keys=True) + "\n")


def _bar_chart(labels: list[str], values: list[int], title: str) -> bytes:
    """A small PNG bar chart, drawn with PIL's built-in font (no font files needed)."""
    from PIL import Image, ImageDraw

    width, height, top, bottom = 60 * len(labels) + 20, 170, 24, 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), title, fill="black")
    scale = (height - top - bottom) / max(values)
    for k, (label, value) in enumerate(zip(labels, values, strict=True)):
        x0 = 20 + 60 * k
        y0 = height - bottom - round(value * scale)
        draw.rectangle([x0, y0, x0 + 36, height - bottom], fill=(70, 110, 180))
        draw.text((x0 + 8, y0 - 12), str(value), fill="black")
        draw.text((x0 + 2, height - bottom + 6), label, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def chartqa_docs(seed: int, n: int) -> list[dict[str, Any]]:
    """``n`` chart questions in ChartQA's schema (the image as PNG bytes)."""
    rng = random.Random(seed)
    topics = [("Fruit sold", ["Apple", "Pear", "Plum", "Fig"]),
              ("Books read", ["Jan", "Feb", "Mar", "Apr"]),
              ("Visitors", ["Mon", "Tue", "Wed"])]  # fmt: skip
    docs = []
    for k in range(n):
        title, labels = topics[k % len(topics)]
        values = [rng.randint(2, 40) for _ in labels]
        if k % 2 == 0:
            pick = rng.randrange(len(labels))
            query, label = f"What is the value of {labels[pick]}?", str(values[pick])
        else:
            query = "Which bar has the highest value?"
            label = labels[values.index(max(values))]
        docs.append({
            "imgname": f"vllm_conformance_{k:03d}.png",
            "image": {"bytes": _bar_chart(labels, values, title), "path": None},
            "query": query,
            "label": [label],
            "human_or_machine": 0,
        })  # fmt: skip
    return docs


def write_all(root: Path = HERE) -> list[Path]:
    """Write every fixture file under ``root``; return their paths."""
    import datasets

    # A problem in two splits would let a few-shot example give the answer away.
    g_test = trained.gsm8k_docs(SEEDS["gsm8k/test"], 150)
    g_train = trained.gsm8k_docs(SEEDS["gsm8k/train"], 20, exclude={d["question"] for d in g_test})
    m_test = trained.mmlu_pro_docs(SEEDS["mmlu_pro/test"], 10)
    m_val = trained.mmlu_pro_docs(
        SEEDS["mmlu_pro/validation"], 5, first_id=10_000, exclude={d["question"] for d in m_test}
    )
    out = {"gsm8k/test.jsonl": g_test, "gsm8k/train.jsonl": g_train,
           "mmlu_pro/test.jsonl": m_test, "mmlu_pro/validation.jsonl": m_val}  # fmt: skip
    for name, docs in out.items():
        _write_jsonl(root / name, docs)
    features = datasets.Features({
        "imgname": datasets.Value("string"),
        "image": datasets.Image(),
        "query": datasets.Value("string"),
        "label": datasets.Sequence(datasets.Value("string")),
        "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
    })  # fmt: skip
    chart = chartqa_docs(SEEDS["chartqa/test"], 6)
    table = datasets.Dataset.from_list(chart, features=features)
    (root / "chartqa").mkdir(exist_ok=True)
    table.to_parquet(str(root / "chartqa" / "test.parquet"))
    return [root / name for name in out] + [root / "chartqa" / "test.parquet"]


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
