"""The documentation cannot drift: the CLI reference is the parser's, the README stays short, links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 12 * 1024  # bytes (issue #45)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parser():
    expected = _generator().render()
    actual = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/cli.md is stale: run `python docs/gen_cli.py > docs/cli.md`"


def test_cli_reference_names_every_option():
    from slim.cli.commands import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"## slim {name}\n" in text
        for a in p._actions:
            for opt in a.option_strings:
                if opt in ("-h", "--help"):
                    continue
                forms = [f"`{opt}", f"`--[no-]{opt[5 if opt.startswith('--no-') else 2:]}"]
                assert any(f in text for f in forms), f"slim {name} {opt} is missing from docs/cli.md"


def test_readme_size():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _relative_links(path: Path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # absolute URL, mailto:, in-page anchor
        yield unquote(target.split("#", 1)[0])


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((DOCS / "results").rglob("*.md"))]
    missing = []
    for page in pages:
        for target in _relative_links(page):
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "broken relative links:\n" + "\n".join(missing)


# Measured figures live on the results pages only (issue #45): docs/*.md explain how and why and link to
# docs/results/ for what was measured. A measured figure is recognised by its shape; definitions, defaults and
# arithmetic on the format ("576 = 4 × 128 + 64", "3.628 bits per weight", "128 × 512 tokens") pass.
_DEC = r"\d+\.\d+"
_NUM = r"\d+(?:\.\d+)?"
MEASURED = {
    "scientific notation": re.compile(r"\d\s?×\s?10[⁰¹²³⁴⁵⁶⁷⁸⁹^]|\d\.\d+e[+-]\d\d\b"),
    "a speedup or ratio": re.compile(rf"(?<![\w.]){_NUM}\s?[×x](?![\w\s]*\d)(?=[\s,.;:)]|$)"),
    "a duration": re.compile(
        rf"(?<![\w.:/-]){_NUM}(?:\s?[-–]\s?{_NUM})?\s?(?:s|ms|µs|min|h|hours?|minutes?|seconds?)(?![\w/])"
    ),
    "a throughput": re.compile(rf"{_NUM}\s?(?:[KMGT]i?B/s|tokens/s|tok/s|it/s)"),
    "a decimal or signed percentage": re.compile(rf"(?:{_DEC}|(?:^|(?<=[\s(]))[−+-]{_NUM})\s?%"),
    "a perplexity": re.compile(rf"(?:\bppl|perplexit(?:y|ies)|WikiText-2)\s*(?:of|:|=|is|was)?\s*~?{_DEC}", re.I),
    "a before/after pair": re.compile(rf"{_DEC}\s?(?:→|->|vs\.?)\s?{_DEC}"),
}


def measured_figures(text: str) -> list[str]:
    """'line N: what (match)' for every line of a markdown page that carries a measured-looking figure."""
    found = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"`[^`]*`", "``", raw)  # option values and commands in code spans are not figures
        if line.lstrip().startswith("|") and len(re.findall(rf"(?<![\w.]){_DEC}(?![\w.])", line)) >= 2:
            found.append(f"line {n}: a table row of measured decimals ({raw.strip()[:80]})")
        for what, pattern in MEASURED.items():
            m = pattern.search(line)
            if m:
                found.append(f"line {n}: {what} ({m.group(0)})")
    return found


def test_measured_figures_are_recognised():
    measured = [
        "| Wanda + GPTQ g128 | 155.68 | 251 | 3.135 | 0.0397 |",
        "| Wanda + SLiM-Quant (per tensor) | 7.64 × 10⁵ | 177 | 3.000 | — |",
        "expensive on a CPU (SmolLM2, 2-core AMD EPYC: 7254 s, WikiText-2 159.15 at 2:4)",
        "a row costs 13-20 min on this CPU",
        "slim's default (70.30 at 626 s, ~13x less compression time)",
        "the share rising from 0.3-3.7 % to 2.3-10.2 %, by up to 3.4×",
        "tuning 459 s instead of 544 s (−16 %, separate runs)",
        "decode at 41.5 tokens/s, 180 GB/s",
        "the default checkpoint 76.26 → 39.53",
        "128.22 vs 159.15, the best compared method",
        "perplexity 21.61 for the dense model",
    ]
    definitions = [
        "Group sizes that do not divide a width leave a shorter last group (576 = 4 × 128 + 64).",
        "2:4 sparsity with 4-bit values costs 3 bits per dense weight; the default stores 3.628 bits per weight.",
        "| `tune.lr` | 3e-2 | learning rate, relative to each tensor's RMS |",
        "| `--lr`, `--warmup` | 1e-4, 0 | the paper's lr suits its ~470 steps (`--lr 1e-3`, `--max-tokens 2031616`) |",
        "| calibration | 128 windows × 512 tokens of the bundled C4 sample, seed 0 | 2048-token windows |",
        "`slim-o`: SLiM-Quant with outlier input channels scaled ×2; `--sparsity 0.5` or `50%`; 1 % damping of H",
        "two d × d fp16 matrices per block (on SmolLM2 they would add 83 % to the block's bits per weight)",
        "`--max-memory 12G`; `torchrun --nproc-per-node 2`; a budget of 7 x 11008 x 11008 float64 values",
    ]
    for line in measured:
        assert measured_figures(line), f"not recognised as a measured figure: {line}"
    for line in definitions:
        assert not measured_figures(line), f"a definition taken for a measured figure: {measured_figures(line)}"


def test_docs_pages_carry_no_measured_figures():
    """docs/*.md (the generated CLI reference aside) link to docs/results/ instead of quoting measurements."""
    bad = []
    for page in sorted(DOCS.glob("*.md")):
        if page.name == "cli.md":
            continue
        bad += [f"{page.relative_to(ROOT)} {hit}" for hit in measured_figures(page.read_text(encoding="utf-8"))]
    assert not bad, (
        "measured figures outside docs/results/ (move them, with their command and commit, to a results page "
        "and link to it):\n" + "\n".join(bad)
    )


def _table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.lstrip().startswith("|") and not re.fullmatch(r"[|\s:-]+", line.strip())
    ]


def _numbers(cell: str) -> list[str]:
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", re.sub(r"`[^`]*`", "", cell).replace("*", ""))


def test_readme_results_are_on_the_results_page():
    """Each row of the README's results table has its perplexity and times on one row of docs/results/README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    header, *rows = _table_rows(section)
    figure_columns = [i for i, h in enumerate(header) if "ppl" in h.lower() or "time" in h.lower()]
    assert figure_columns and rows, "the README's results table has no perplexity or time column"
    results_rows = [
        set(_numbers(" ".join(r))) for r in _table_rows((DOCS / "results" / "README.md").read_text(encoding="utf-8"))
    ]
    missing = []
    for row in rows:
        figures = {n for i in figure_columns if i < len(row) for n in _numbers(row[i])}
        if figures and not any(figures <= r for r in results_rows):
            missing.append(f"{row[0]}: {sorted(figures)}")
    assert not missing, "README results not on one row of docs/results/README.md:\n" + "\n".join(missing)


def test_results_index_links_every_results_folder():
    index = (DOCS / "results" / "README.md").read_text(encoding="utf-8")
    targets = {t.split("/", 1)[0] for t in _relative_links(DOCS / "results" / "README.md")}
    folders = sorted(p.name for p in (DOCS / "results").iterdir() if p.is_dir())
    unlinked = [f for f in folders if f not in targets]
    assert index and not unlinked, f"docs/results/README.md does not link these results folders: {unlinked}"
