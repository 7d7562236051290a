"""README.md and docs/*.md agree with benchmarks/results/*.json, and hold no hand-written measurements.

* ``test_generated_sections_match_json``: every ``<!-- report:NAME -->`` section is what
  ``benchmarks/report.py`` generates from the JSON now (``report.py --check`` in-process).
* ``test_no_measured_numbers_outside_sections``: outside those sections, nothing that looks like
  a measurement (ratios ``1.23×``, perplexities, tokens/s, seconds, GiB, decimal percentages or
  points, ``±`` noise claims, load averages, bold decimals, numbers with two or more decimals)
  except a short allow-list of non-measurements.

No benchmark runs here; both tests only read files.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = mod
    spec.loader.exec_module(mod)
    return mod


report = _load_report()

# (pattern, what it catches). Applied line by line to the text outside generated sections.
MEASURED = [
    (r"\d+\.\d+\s?[×x](?![\w\d])", "ratio"),
    (r"(?<![\w.])\d+(?:\.\d+)?\s?(?:s|ms|µs|us|sec|seconds|min|minutes|h|hours)\b(?!/)", "duration"),
    (r"\d+(?:\.\d+)?\s?(?:GiB|MiB|KiB|GB|MB|kB)\b", "memory size"),
    (r"\d+(?:\.\d+)?\s?(?:tokens?|tok)/s", "throughput"),
    (r"\d+\.\d+\s?%", "decimal percentage"),
    (r"\d+(?:\.\d+)?\s?(?:points?|pt)\b", "points"),
    (r"±\s?\d", "noise claim"),
    (r"load average\s+\d", "load average"),
    (r"(?:perplexity|ppl)\b[^.\n|]{0,40}?(?<![\w.=])\d+\.\d+", "perplexity"),
    (r"\*\*\d+\.\d+\*\*", "bold decimal"),
    (r"(?<![\w.=/-])\d+\.\d{2,}(?!\.?\d|\w)", "number with 2+ decimals"),
]

# Non-measurements that the patterns above would flag: (file, exact substring, why it is allowed).
ALLOWED = [
    ("docs/training.md", "3.7 points for ERK 90% on ResNet-50",
     "a number quoted from the RigL paper, not measured here"),
    ("docs/training.md", "SGD lr 0.05", "a training setting (learning rate)"),
    ("docs/format.md", "64 MiB + 64 × file size", "a reader limit, not a measurement"),
    ("README.md", "default 64 MiB + 64× the file size", "a reader limit, not a measurement"),
    ("docs/learned_sparsity.md", "s = 0.6585 / |w|_(κ)", "HyperSparse's constant (HS_CONSTANT), not a measurement"),
    ("docs/learned_sparsity.md", "η 1.05 per epoch", "the HyperSparse reference's default schedule, a setting"),
]


def _doc_files() -> list[Path]:
    return [ROOT / f for f in report.DOC_FILES if (ROOT / f).is_file()]


def scan(rel: str, text: str) -> list[str]:
    """``FILE:LINE: kind: 'match' in ...`` for each measured-looking number outside the sections."""
    hits = []
    outside = report.outside_sections(text)
    allowed = [s for f, s, _ in ALLOWED if f == rel]
    for lineno, line in enumerate(outside.splitlines(), 1):
        clean = line
        for s in allowed:
            clean = clean.replace(s, " " * len(s))
        for pat, kind in MEASURED:
            for m in re.finditer(pat, clean):
                hits.append(f"{rel}:{lineno}: {kind}: {m.group(0)!r} in {line.strip()[:100]!r}")
    return hits


def test_generated_sections_match_json() -> None:
    diffs = report.run(ROOT, check=True)
    assert not diffs, (
        "README/docs sections differ from benchmarks/results/*.json (run "
        "`python benchmarks/report.py`):\n" + "\n".join(diffs)
    )


def test_every_doc_with_numbers_has_sections() -> None:
    names = set()
    for p in _doc_files():
        names |= set(report.OPEN.findall(p.read_text()))
    # every generator is used somewhere, so no JSON-backed table silently dropped out of the docs
    assert set(report.GENERATORS) <= names, sorted(set(report.GENERATORS) - names)


def test_no_measured_numbers_outside_sections() -> None:
    hits = []
    for p in _doc_files():
        hits += scan(str(p.relative_to(ROOT)), p.read_text())
    assert not hits, (
        "measured-looking numbers outside generated sections (move them into a "
        "`<!-- report:... -->` section generated from a JSON, or remove them):\n" + "\n".join(hits)
    )


def test_allow_list_entries_still_exist() -> None:
    """A stale allow-list entry would silently allow nothing; keep the list minimal and true."""
    for rel, s, _ in ALLOWED:
        assert s in (ROOT / rel).read_text(), f"{rel} no longer holds {s!r}: remove it from ALLOWED"


# ---------------------------------------------------------------------- the checks can fail
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the docs and results, to break on purpose."""
    for rel in report.DOC_FILES:
        if (ROOT / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def test_check_catches_an_edited_number(tree: Path) -> None:
    readme = tree / "README.md"
    text = readme.read_text()
    m = re.search(r"<!-- report:oneshot-table -->.*?(\d+\.\d\d) /", text, re.S)
    assert m, "the one-shot table has no 'ppl / seconds' cell"
    a, b = m.span(1)
    readme.write_text(text[:a] + "1.23" + text[b:])
    assert report.run(tree, check=True) == ["README.md: oneshot-table"]
    assert report.main(["--check", "--root", str(tree)]) == 1
    # the rewrite restores the generated text, after which the check passes
    assert report.run(tree) == ["README.md: oneshot-table"]
    assert readme.read_text() == text
    assert report.run(tree, check=True) == []


def test_check_catches_a_changed_json(tree: Path) -> None:
    import json

    path = tree / "benchmarks" / "results" / "checkpoint_size.json"
    data = json.loads(path.read_text())
    data["rows"][0]["formats"]["auto"]["ratio"] = 0.5
    path.write_text(json.dumps(data))
    diffs = report.run(tree, check=True)
    assert "README.md: checkpoint-sizes" in diffs and "docs/export.md: checkpoint-sizes" in diffs


def test_unknown_section_is_an_error(tree: Path) -> None:
    readme = tree / "README.md"
    readme.write_text(readme.read_text() + "\n<!-- report:no-such -->\nx\n<!-- /report:no-such -->\n")
    with pytest.raises(report.ReportError, match="no-such"):
        report.run(tree, check=True)
    assert report.main(["--check", "--root", str(tree)]) == 2


def test_new_json_names_its_provenance(tree: Path) -> None:
    """A JSON written with a ``_meta`` block (and per-entry provenance) is cited by commit."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _provenance import Run

    run = Run(["benchmarks/checkpoint_size.py", "--out", "x.json"])
    path = tree / "benchmarks" / "results" / "checkpoint_size.json"
    data = json.loads(path.read_text())
    data["_meta"] = run.meta()
    path.write_text(json.dumps(data))
    one = tree / "benchmarks" / "results" / "oneshot_llm.json"
    shot = json.loads(one.read_text())
    entries = [k for k, v in shot.items() if not k.startswith("_") and isinstance(v, dict)]
    for k in entries[:2]:  # two entries as written before provenance was kept
        shot[k].pop("provenance", None)
    unknown = [k for k in entries if not isinstance(shot[k].get("provenance"), dict)]
    shot[unknown[0]]["provenance"] = run.entry()
    one.write_text(json.dumps(shot))
    report.run(tree)
    text = (tree / "docs" / "export.md").read_text()
    commit = run.git["commit"]
    if commit:
        assert f"commit `{commit[:10]}`" in text
    assert "`benchmarks/checkpoint_size.py --out x.json`" in text and report.UNKNOWN_PROVENANCE not in text
    readme = (tree / "README.md").read_text()
    m = re.search(r"(\d+) of (\d+) entries " + re.escape(report.UNKNOWN_PROVENANCE), readme)
    if len(unknown) > 1:
        assert m and int(m.group(1)) == len(unknown) - 1, "the stamped entry is still counted as unknown"
    else:
        assert not m, "the stamped entry is still counted as unknown"
    assert re.search(r"(?<![0-9])1 at commit `", readme)
    assert report.run(tree, check=True) == []


def test_old_json_says_provenance_unknown(tree: Path) -> None:
    """JSONs written before provenance was kept are labelled so in the generated text."""
    import json

    one = tree / "benchmarks" / "results" / "oneshot_llm.json"
    shot = json.loads(one.read_text())
    first = next(k for k in shot if not k.startswith("_"))
    shot[first].pop("provenance", None)  # an entry as written before provenance was kept
    one.write_text(json.dumps(shot))
    report.run(tree)
    text = (tree / "README.md").read_text()
    assert report.UNKNOWN_PROVENANCE in text
    assert report.provenance_note("x.json", {"rows": []}).endswith(report.UNKNOWN_PROVENANCE + ".")
    assert report.UNKNOWN_PROVENANCE not in (tree / "docs" / "export.md").read_text()  # rerun with it


@pytest.mark.parametrize(
    "line",
    [
        "SparseGPT is 0.92× of llm-compressor's",
        "about 1.5 s per block",
        "ours range 1.22–1.42 GiB",
        "14.9 → 26.7 tokens/s",
        "RigL reaches 90.07% at 3 epochs",
        "a gap of 1 point",
        "treat single numbers as roughly ±30%",
        "load average 4-5",
        "With `batch_size=1`, the 2:4 run gives 31.34.",
        "dense E16 perplexity **14.668**",
        "(331.27 with `torch.topk`'s order)",
    ],
)
def test_scan_flags_hand_written_measurements(line: str) -> None:
    assert scan("README.md", f"text\n{line}\n"), line


@pytest.mark.parametrize(
    "line",
    [
        "16 Adam steps, lr 3e-4, 1% dampening, `threshold=0.1`, `owl_lambda=0.08`",
        "`pattern=\"2:4\"` keeps 2 of every 4; `\"1:4\"` is 75% sparse; 64×512 calibration tokens",
        "llm-compressor 0.14.0.1, version 0.1.0, α = 0.3, ΔT = 100, (gap ≤ 1.0), 1e-5 noise",
        "--epochs 3 --calib-samples 64 --eval-windows 0 skips evaluation",
        "<!-- report:oneshot-table -->\n| x | 27.54 / 253 |\n<!-- /report:oneshot-table -->",
    ],
)
def test_scan_allows_settings_and_sections(line: str) -> None:
    assert not scan("README.md", line), scan("README.md", line)


def test_entries_from_different_cpus_are_labelled() -> None:
    """A merged JSON whose entries ran on two CPUs says which ran where (an entry that does not
    name its CPU takes its driver's, by commit) and that their seconds do not compare across."""
    entries = {"a@0.5": {"provenance": {"commit": "a" * 40, "cpu_model": "Intel Xeon", "load_before": [1.0]}},
               "b@0.5": {"provenance": {"commit": "b" * 40, "load_before": [2.0]}}}
    note = report.entries_note("x.json", entries, {"lane.json": {"commit": "b" * 40, "cpu_model": "AMD EPYC"}})
    assert "1 at commit `aaaaaaaaaa` on Intel Xeon" in note and "1 at commit `bbbbbbbbbb` on AMD EPYC" in note
    assert "different CPUs" in note
    one_cpu = report.entries_note("x.json", {"a@0.5": entries["a@0.5"]})
    assert " on " not in one_cpu and "different CPUs" not in one_cpu
