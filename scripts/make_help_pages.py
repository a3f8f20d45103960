#!/usr/bin/env python3
"""Keep the nodes' help pages (web/docs/<NodeId>.md, ComfyUI's node help) in step with the nodes.

    bash scripts/dev.sh python scripts/make_help_pages.py

For every node in NODE_CLASS_MAPPINGS, the page's "## Inputs" and "## Outputs" sections are rewritten from the
node's own definition (names, types, defaults, tooltips), so they never drift from what ComfyUI shows. The rest
of a page is written by hand and left as it is. A node without a page gets one whose hand-written parts say
TODO (tests/test_help_pages.py fails until they are written): what it does in two sentences, the paper's
equation or section, the defaults and why, the common errors with their fixes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "web" / "docs"


def _text(text) -> str:
    """Plain text for a Markdown page: one line, and ``<`` / ``>`` as entities, so that a placeholder such as
    models/insightface/models/<pack>/ is shown, not taken for an HTML tag and dropped by the renderer."""
    return str(text or "").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;").strip()


def _default(type_, options: dict) -> str:
    value = options.get("default")
    if value is None and isinstance(type_, (list, tuple)):
        value = type_[0] if type_ else ""
    if value is None:
        return ""
    return f"`{value}`" if value != "" else "empty"


def io_sections(cls) -> str:
    """The "## Inputs" and "## Outputs" sections of a node's page, from its definition: one list item per input
    and output (name, type, default, what it is), which reads in the front end's narrow help panel."""
    spec = cls.INPUT_TYPES()
    lines = ["## Inputs", ""]
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            type_, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            facts = ["list" if isinstance(type_, (list, tuple)) else str(type_)]
            default = _default(type_, options)
            facts += [f"default {default}"] if default else []
            facts += ["optional"] if section == "optional" else []
            lines.append(f"- **`{name}`** ({', '.join(facts)}): {_text(options.get('tooltip'))}")
    if len(lines) == 2:
        lines.append("None: its settings are its widgets.")
    lines += ["", "## Outputs", ""]
    names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    tips = list(getattr(cls, "OUTPUT_TOOLTIPS", None) or [""] * len(names))
    lines += [f"- **`{n}`** ({t}): {_text(tip)}" for n, t, tip in zip(names, cls.RETURN_TYPES, tips)]
    if not names:
        lines.append("None: it writes files under ComfyUI's output folder and shows them on the node.")
    return "\n".join(lines) + "\n\n"


def skeleton(node_id: str, cls, display: str | None) -> str:
    return (f"# {display or node_id}\n\n`{node_id}` · category {getattr(cls, 'CATEGORY', '')}\n\n"
            f"TODO: what it does, in two sentences.\n\n{io_sections(cls)}## Paper\n\nTODO: the equation or "
            "section it implements.\n\n## Defaults and why\n\n- TODO\n\n## Common errors\n\n"
            "- TODO: a message or symptom, and its fix.\n")


def main() -> int:
    import comfy.cli_args  # the host's own package (dev.sh puts it on the path)
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # as ComfyUI's --cpu: importing the nodes must not look for a GPU
    from diffprivacy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    DOCS.mkdir(parents=True, exist_ok=True)
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        page = DOCS / f"{node_id}.md"
        if not page.is_file():
            page.write_text(skeleton(node_id, cls, NODE_DISPLAY_NAME_MAPPINGS.get(node_id)))
            print(f"new: {page.relative_to(REPO)} (write its TODO parts)")
            continue
        text = page.read_text()
        updated = re.sub(r"## Inputs\n.*?(?=## Paper\n)", lambda _: io_sections(cls), text, count=1, flags=re.S)
        if updated != text:
            page.write_text(updated)
            print(f"updated: {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
