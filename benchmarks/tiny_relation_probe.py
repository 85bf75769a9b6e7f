"""How well the tiny model follows spatial relations: two-object captions with a relation, generated with
the model's defaults and scored by the detector, in three sets of the same size:

- heldout_canonical: held-out compositions, "a photo of A left of B" (the evaluation's form);
- heldout_layout: the same scenes said as "a photo of A on the left and B on the right";
- train_canonical: in-distribution compositions, canonical form.

Per set and per relation: objects drawn right (both shape and colour), relation right as well, and the
relation rate among images whose objects are right. A relation rate near the held-out one on the
train set says relations are not learned, rather than not generalised. Writes JSON.

    python benchmarks/tiny_relation_probe.py --n 100 --device cpu
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from sd35fp8.tiny import detector, world
from sd35fp8.tiny.captions import _LAYOUT_PHRASES, object_phrase
from sd35fp8.tiny.evaluate import add_benchmark_args, benchmark_pipeline, generate_items, write_result


def layout_form(item: world.EvalItem) -> world.EvalItem:
    """The item with its relation said as "A on the left and B on the right" (same scene, same check)."""
    a, b = (object_phrase(o, False) for o in item.scene.objects[:2])
    first, second = _LAYOUT_PHRASES[item.relation]
    return world.EvalItem(item.category, item.objects, item.relation,
                          f"a photo of {a} {first} and {b} {second}", item.scene)


def summarise(items: list[world.EvalItem], scores: list[dict]) -> dict:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # relation -> [n, objects right, correct]
    for it, s in zip(items, scores):
        row = per[it.relation]
        row[0] += 1
        row[1] += bool(s["objects_ok"])
        row[2] += bool(s["correct"])
    n, objects, correct = (sum(r[i] for r in per.values()) for i in range(3))
    return {"n": n, "objects_ok": objects / n, "correct": correct / n,
            "relation_given_objects": correct / max(1, objects),
            "per_relation": {k: dict(zip(("n", "objects_ok", "correct"), v)) for k, v in sorted(per.items())},
            "example_caption": items[0].caption}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p, n=100, batch=50, n_help="items per set")
    a = p.parse_args(argv)
    pipe, dev, model = benchmark_pipeline(a)
    d = pipe.defaults
    held = world.eval_items(a.n, a.seed, "heldout", categories=("two_relation",))
    sets = {"heldout_canonical": held, "heldout_layout": [layout_form(it) for it in held],
            "train_canonical": world.eval_items(a.n, a.seed, "train", categories=("two_relation",))}
    result = {"benchmark": "tiny_relation_probe", "model": str(model), "n": a.n, "seed": a.seed,
              "sampler": d.sampler, "scheduler": d.scheduler, "steps": d.steps, "cfg": d.cfg, "sets": {}}
    for name, items in sets.items():
        images, _ = generate_items(pipe, items, seed=a.seed, batch=a.batch, steps=d.steps, cfg=d.cfg,
                                   sampler=d.sampler, scheduler=d.scheduler, size=d.width)
        s = summarise(items, detector.score_many(images, items, workers=os.cpu_count() or 1))
        result["sets"][name] = s
        print(f"{name:>18}: objects {s['objects_ok']:.2f}  correct {s['correct']:.2f}  "
              f"relation | objects {s['relation_given_objects']:.2f}", flush=True)
    write_result(result, "tiny_relation_probe", dev, a.out)
    return result


if __name__ == "__main__":
    main()
