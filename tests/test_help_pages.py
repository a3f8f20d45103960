"""Every node has a help page (web/docs/<NodeId>.md, ComfyUI's node help through WEB_DIRECTORY) that names each
of its inputs and outputs and has the sections a user looks for, written out (no TODO left by
scripts/make_help_pages.py); the live server serves each page at the URL the front end asks for
(comfyui-frontend-package: /extensions/<pack folder>/docs/<NodeId>.md); rendered as the front end renders it
(CommonMark, raw HTML allowed), a page loses no text to HTML and lists its inputs (a table does not fit the
~250 px help panel)."""
import re
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import pytest

from conftest import REPO, require_package

DOCS = REPO / "web" / "docs"
SECTIONS = ("## Inputs", "## Outputs", "## Paper", "## Defaults and why", "## Common errors")


def _nodes():
    from diffprivacy.nodes import NODE_CLASS_MAPPINGS
    return NODE_CLASS_MAPPINGS


def test_every_node_has_a_help_page_naming_its_inputs_and_outputs():
    problems = []
    for node_id, cls in sorted(_nodes().items()):
        page = DOCS / f"{node_id}.md"
        if not page.is_file():
            problems.append(f"{node_id}: no {page.relative_to(REPO)} (bash scripts/dev.sh python "
                            "scripts/make_help_pages.py writes one to fill in)")
            continue
        text = page.read_text()
        if "TODO" in text:
            problems.append(f"{node_id}: its page still has TODO parts")
        problems += [f"{node_id}: no '{s}' section" for s in SECTIONS if s not in text]
        spec = cls.INPUT_TYPES()
        inputs = [name for section in ("required", "optional") for name in spec.get(section, {})]
        outputs = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        problems += [f"{node_id}: `{name}` is not on its page" for name in inputs + outputs if f"`{name}`" not in text]
        what = text.split("## Inputs")[0]
        if len(re.findall(r"[.!?](\s|$)", what.split("\n", 3)[-1])) < 2:
            problems.append(f"{node_id}: the page does not say what the node does (two sentences before Inputs)")
    assert not problems, "\n".join(problems)


def _help_url(info: dict, node_id: str) -> str:
    """The front end's NodeHelpService: /extensions/<custom node folder>/docs/<NodeId>.md, the folder taken
    from the node's python_module (custom_nodes.<folder>), a version suffix after '@' dropped."""
    module = info[node_id]["python_module"].split(".")
    assert module[0] == "custom_nodes", info[node_id]["python_module"]
    pack = module[1].split("@")[0]
    return f"/extensions/{urllib.parse.quote(pack)}/docs/{node_id}.md"


def test_the_server_serves_every_help_page_where_the_front_end_looks(comfy_server):
    ours = sorted(k for k in comfy_server.object_info if k in _nodes())
    assert ours, "no Diff-Privacy node in /object_info"
    for node_id in ours:
        url = comfy_server.url + _help_url(comfy_server.object_info, node_id)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                served = r.read().decode()
        except urllib.error.HTTPError as e:
            pytest.fail(f"{node_id}: {url} answered {e.code}")
        assert served == (DOCS / f"{node_id}.md").read_text(), node_id


class _Text(HTMLParser):
    """The text a browser shows of an HTML fragment: an unknown tag such as <pack> is a tag, not text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def rendered(markdown: str) -> tuple[str, str]:
    """(HTML, shown text) of a page rendered as CommonMark with raw HTML passed through, as the front end's
    help panel does (marked, then the browser)."""
    markdown_it = require_package("markdown_it", "pip install markdown-it-py")
    html = markdown_it.MarkdownIt("commonmark").render(markdown)
    parser = _Text()
    parser.feed(html)
    return html, "".join(parser.parts)


PLACEHOLDER = re.compile(r"(?:<|&lt;)([A-Za-z_][\w .-]*)(?:>|&gt;)")


def test_help_pages_show_every_placeholder_and_list_their_inputs():
    problems = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        html, shown = rendered(text)
        lost = sorted({f"<{m}>" for m in PLACEHOLDER.findall(text)} - {f"<{m}>" for m in PLACEHOLDER.findall(shown)})
        if lost:
            problems.append(f"{page.name}: {lost} are taken for HTML and not shown (put them in backticks)")
        inputs = html.split("<h2>Inputs</h2>", 1)[-1].split("<h2>", 1)[0]
        if "<table" in inputs or "<ul>" not in inputs and "None" not in inputs:
            problems.append(f"{page.name}: the inputs are not a list (scripts/make_help_pages.py writes one)")
    assert not problems, "\n".join(problems)


def test_placeholder_check_sees_a_placeholder_the_renderer_eats():
    _, shown = rendered("Put it in models/insightface/models/<pack>/ and `models/<name>/`.")
    assert "<pack>" not in shown and "<name>" in shown
