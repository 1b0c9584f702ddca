"""docs/python.md is executed: its code blocks, in order, in one namespace (each continues the ones before)."""
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def code_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_page_runs():
    blocks = code_blocks(PAGE.read_text())
    assert len(blocks) >= 8
    namespace: dict = {"__name__": "docs_python"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i + 1}]", "exec"), namespace)   # noqa: S102 - our own page
