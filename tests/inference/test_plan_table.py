"""plan's table keeps whole layer names and groups equal layers by kind."""

from __future__ import annotations

import sparsetorch
from sparsetorch.inference import plan


def test_plan_table_never_cuts_names_and_labels_groups_by_kind(tiny_llama) -> None:
    sparsetorch.prune(tiny_llama, "magnitude", 0.7)
    rep = plan(tiny_llama, timer=lambda n, fn: 1.0 if n in ("dense", "model") else 0.5)
    text = rep.table()
    assert "..." not in text.split("dense*")[0]  # no name shortened to '...layers.0...'
    names = [c.name for c in rep.layers]
    rows = text.splitlines()[2:]
    # every measured layer appears: by its full name, or inside a group labelled with its kind
    for n in names:
        kind = n.split(".")[-1]
        assert any(n in r or f"{kind} x" in r or "(+" in r for r in rows), n
    assert any(r.startswith("lm_head") and "dense*" in r for r in rows)
