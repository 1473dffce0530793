"""README.md and docs/ stay true to the repository: the two set-up commands come first and are
the ones the Makefile and CI run; every relative link and image points at a file that exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_readme_opens_with_exactly_the_two_setup_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]  # after the Spaces front matter
    first_block = body.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make app", "make test"]
    assert body.index("```bash") < body.index("\n## ")  # before any section
    targets = (ROOT / "Makefile").read_text()
    assert re.search(r"^app: ", targets, re.M) and re.search(r"^test: ", targets, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert len(text.splitlines()) < 200  # the product page; the rest lives in docs/


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    assert len(pages) >= 14
