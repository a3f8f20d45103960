"""Write ComfyUI workflows in Python; emit the UI format users drag in; turn UI format into API format.

A workflow is defined once, in code that says what it means:

    g = Graph("anonymize")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    enc = g.node("VAEEncode", pixels=img.out(0), vae=ckpt.out(2))

and written (by scripts/make_workflows.py) as the UI-format JSON that ComfyUI's front end loads
from example_workflows/. Which inputs are widgets, their order in ``widgets_values``, and the
extra values the front end stores after some widgets are all read from the server's
/object_info, as the front end does. ``ui_to_api`` is the inverse the tests use: the committed
UI file, converted exactly as the front end's "queue prompt" would, is what they post to /prompt.

A definition also says how a person reads it: ``g.stage("Protect")`` puts the nodes created after it in
that stage (one titled group each, numbered left to right), and ``Graph(..., note=...)`` is the text of
the Note at the top left. Everything else about the drawing is decided here, the same for every
workflow (see ``layout``): columns left to right in the order data flows, nodes sized from their
widgets exactly as the front end sizes them (``node_size``), each node aligned with what feeds it.
"""
from __future__ import annotations

from collections import defaultdict

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs the front end adds to the prompt that /object_info does not list: PreviewAny's read-only
# "preview" text (a widget of its front-end extension, not stored in the workflow), posted empty.
FRONT_END_INPUTS = {"PreviewAny": {"preview": ""}}
# Front-end-only nodes: drawn, never queued (the front end's isVirtualNode).
VIRTUAL_NODES = {"Note", "MarkdownNote"}


def input_specs(info: dict):
    """(name, type, options) of a node's visible inputs, in the front end's order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            yield name, spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def is_widget(type_, options) -> bool:
    return (isinstance(type_, list) or type_ in WIDGET_TYPES) and not options.get("forceInput")


def extra_widget_values(name: str, type_, options) -> list:
    """Values the front end stores right after a widget's own value."""
    if type_ == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return ["fixed"]  # the "control after generate" combo
    if options.get("image_upload"):
        return ["image"]  # LoadImage's upload button
    return []


def default_value(type_, options):
    if "default" in options:
        return options["default"]
    if isinstance(type_, list):
        return type_[0] if type_ else ""
    if type_ == "COMBO":
        opts = options.get("options") or [""]
        return opts[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[type_]


class Output:
    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, graph: "Graph", id_: int, type_: str, title: str | None, inputs: dict):
        self.graph, self.id, self.type, self.title, self.inputs = graph, id_, type_, title, inputs

    def out(self, slot: int = 0) -> Output:
        return Output(self, slot)


class Graph:
    def __init__(self, name: str, description: str = "", note: str = ""):
        self.name, self.description, self.note = name, description, note
        self.nodes: list[Node] = []
        self._stage: str | None = None

    def stage(self, title: str) -> None:
        """Nodes created from now on belong to the stage ``title`` (drawn as one group, numbered by position)."""
        self._stage = title

    def node(self, type_: str, title: str | None = None, **inputs) -> Node:
        n = Node(self, len(self.nodes) + 1, type_, title, inputs)
        n.stage = self._stage
        self.nodes.append(n)
        return n

    def to_ui(self, object_info: dict) -> dict:
        links, link_id = [], 0
        out_links: dict[tuple[int, int], list[int]] = defaultdict(list)
        ui_nodes = []
        for order, n in enumerate(self.nodes):
            if n.type not in object_info:
                raise KeyError(f"{self.name}: node type {n.type} is not installed in the server")
            info = object_info[n.type]
            known = {name for name, _, _ in input_specs(info)}
            unknown = set(n.inputs) - known
            if unknown:
                raise KeyError(f"{self.name}: {n.type} has no input(s) {sorted(unknown)}; it has {sorted(known)}")
            ui_inputs, values = [], []
            for name, type_, opts in input_specs(info):
                given = n.inputs.get(name)
                widget = is_widget(type_, opts)
                if isinstance(given, Output):
                    link_id += 1
                    out_type = object_info[given.node.type]["output"][given.slot]
                    links.append([link_id, given.node.id, given.slot, n.id, len(ui_inputs), out_type])
                    out_links[(given.node.id, given.slot)].append(link_id)
                    entry = {"name": name, "type": out_type if widget else type_, "link": link_id}
                    if widget:
                        entry["widget"] = {"name": name}
                    ui_inputs.append(entry)
                elif not widget:
                    if name in info["input"].get("required", {}):
                        raise ValueError(f"{self.name}: required input {n.type}.{name} is not connected")
                    ui_inputs.append({"name": name, "type": type_, "link": None})
                if widget:
                    literal = given if given is not None and not isinstance(given, Output) \
                        else default_value(type_, opts)
                    values += [literal] + extra_widget_values(name, type_, opts)
            ui_nodes.append({
                "id": n.id, "type": n.type, "pos": [0, 0], "size": node_size(n, info),
                "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
                "outputs": [{"name": nm, "type": t, "links": None, "slot_index": i}
                            for i, (t, nm) in enumerate(zip(info["output"], info.get("output_name", info["output"])))],
                "properties": {"Node name for S&R": n.type}, "widgets_values": values,
                **({"title": n.title} if n.title else {}),
            })
        for node in ui_nodes:
            for o in node["outputs"]:
                o["links"] = out_links.get((node["id"], o["slot_index"])) or None
        groups = layout(self, ui_nodes, links)
        if self.note:
            ui_nodes.append(note_node(len(ui_nodes) + 1, self.note, ui_nodes, groups))
        return {"last_node_id": len(ui_nodes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
                "groups": groups, "config": {},
                "extra": {"info": {"name": self.name, "description": self.description},
                          "ds": opening_view(ui_nodes, groups)}, "version": 0.4}


# -- how the front end sizes a node (LiteGraph's LGraphNode.computeSize, comfyui-frontend-package 1.32) --------
SLOT_H, WIDGET_H, TITLE_H = 20, 24, 30     # a slot row; a widget row (20 + 4 spacing); a node's title bar
DOM_WIDGET_H = 54                          # a multiline text / markdown widget: minHeight 50 + 4
IMAGE_PREVIEW_H = 224                      # the image preview a node shows once it has images: minHeight 220 + 4
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)    # BaseWidget: minValueWidth + 2 (margin + arrowMargin + arrowWidth)
# Arial advance widths (1/1000 em) of ASCII 32..126: the fonts the front end measures titles (14 px) and
# slot labels (12 px) in; other characters count as an "M".
_ARIAL = [278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556, 556, 556, 556,
          556, 556, 556, 556, 278, 278, 584, 584, 584, 556, 1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667,
          556, 833, 722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, 333, 556,
          556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, 556, 556, 333, 500, 278, 556, 500, 722,
          500, 500, 500, 334, 260, 334, 584]
# Nodes that show images on the canvas (a loaded photo, or results after a run): room for the preview is kept
# so that nothing grows over a neighbour when the images arrive.
IMAGE_NODES = {"LoadImage", "PreviewImage", "SaveImage", "DiffPrivacySaveImageClean"}
IMAGE_NODE_WIDTH = 300  # wide enough to see a face in the preview
# Widgets a node's front-end extension adds: (label, height).
FRONT_END_WIDGETS = {"PreviewAny": [("preview", DOM_WIDGET_H)]}
MAX_READABLE_WIDTH = 460  # widen a node until its widget values are readable, up to this
# Nodes whose text after a run the pack's front-end extension draws under their widgets (web/js/node_text.js,
# 16 px lines): room for that many lines is kept so that the text does not grow the node over a neighbour.
REPORTED_TEXT_LINES = {"DiffPrivacyFaceModelLoader": 4, "DiffPrivacySaveKey": 3, "DiffPrivacySaveDIFPKey": 3,
                       "DiffPrivacyLearnKeyE": 3, "DiffPrivacyHideFromDetectors": 3}
REPORTED_LINE_H, REPORTED_PAD = 16, 8


def text_width(text: str, px: float) -> float:
    return sum(_ARIAL[ord(c) - 32] if 32 <= ord(c) < 127 else 833 for c in str(text)) * px / 1000


def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def node_size(n: "Node", info: dict) -> list[int]:
    """[width, height] of a node's body (the title bar is above it) as the front end computes it when the
    workflow loads, widened so widget values can be read and heightened for the images it will show.
    The front end keeps a stored size that is at least its own, so this is what the user sees (until a
    node's reported text needs more lines than ``REPORTED_TEXT_LINES`` keeps)."""
    title = n.title or info.get("display_name") or n.type
    slot_labels, widgets = [], []  # widgets: (label, shown value, height, arrows)
    for name, type_, opts in input_specs(info):
        if not is_widget(type_, opts):
            slot_labels.append(name)
            continue
        given = n.inputs.get(name)
        value = given if given is not None and not isinstance(given, Output) else default_value(type_, opts)
        multiline = type_ == "STRING" and opts.get("multiline")
        widgets.append((name, "" if multiline else _shown(value), DOM_WIDGET_H if multiline else WIDGET_H,
                        type_ != "STRING"))
        for extra in extra_widget_values(name, type_, opts):
            widgets.append(("control after generate", extra, WIDGET_H, True) if extra == "fixed"
                           else ("choose file to upload", "", WIDGET_H, False))
    widgets += [(label, "", h, False) for label, h in FRONT_END_WIDGETS.get(n.type, [])]
    out_labels = list(info.get("output_name") or info["output"])
    rows = max(len(slot_labels), len(out_labels), 1)
    in_w = max((text_width(t, 12) for t in slot_labels), default=0)
    out_w = max((text_width(t, 12) for t in out_labels), default=0)
    width = max(in_w + out_w + 2 * SLOT_H + (5 if in_w and out_w else 0),
                (max(text_width(w[0], 12) for w in widgets) + WIDGET_PADDING) if widgets else 0,
                TITLE_H * 1.33 + text_width(title, 14),
                140 * (1.5 if widgets else 1))
    readable = max((text_width(label, 12) + text_width(value, 12) + (2 * 31 if arrows else 2 * 15) + 24
                    for label, value, _, arrows in widgets), default=0)
    width = max(width, min(readable, MAX_READABLE_WIDTH),
                text_width(title, 14) + 2 * TITLE_H + 4)  # the title is cut to the width less 2 title heights
    height = 6 + rows * SLOT_H + (sum(w[2] for w in widgets) + 8 if widgets else 0)
    if n.type in REPORTED_TEXT_LINES:
        height += REPORTED_TEXT_LINES[n.type] * REPORTED_LINE_H + REPORTED_PAD
    if n.type in IMAGE_NODES:
        height += IMAGE_PREVIEW_H
        width = max(width, IMAGE_NODE_WIDTH)
    return [_round_up(width), _round_up(height)]


def _round_up(v: float, step: int = 10) -> int:
    return int(-(-v // step) * step)


# -- layout ---------------------------------------------------------------------------------------
COLUMN_GAP, NODE_GAP = 50, 30        # between columns in a group; between a node and the title of the next
GROUP_PAD, GROUP_TITLE_H = 20, 34    # inside a group's border; a group's title bar (font 24 x 1.4)
GROUP_GAP = 70                       # between groups
MAX_COLUMN_H = 1200                  # a taller column is split in two
ROW_MAX_W = 2000                     # groups wrap into rows this wide: a row fills a 1600 px window at 0.75
ORIGIN = (0, 0)
GROUP_COLORS = ["#3f789e", "#8A8", "#b06634", "#a1309b", "#88A", "#b58b2a"]
NOTE_MIN_WIDTH, NOTE_MAX_WIDTH = 460, 1300
NOTE_CHAR_W, NOTE_LINE_H = 6.2, 13   # the front end's textarea: 10 px monospace


def stage_order(declared: list, flows: set[tuple]) -> list:
    """Stages in the order data flows between them (a stage comes after every stage feeding it), ties and
    cycles broken by the order the definition declared them."""
    remaining = list(dict.fromkeys(declared))
    order = []
    while remaining:
        ready = [s for s in remaining if not any(a != s and a in remaining and b == s for a, b in flows)]
        order.append((ready or remaining)[0])
        remaining.remove(order[-1])
    return order


def layout(graph: "Graph", ui_nodes: list[dict], links: list[list]) -> list[dict]:
    """Place every node (sets ``pos``) and return the groups, one per stage.

    Stages go left to right in the order data flows between them, in rows (``_wrap_rows``); inside a stage, a
    node's column is the length of the longest chain of links from the stage's own inputs to it (loaders first, results
    last); a column is filled from the top in the order the definition created its nodes (so a
    definition lists parallel branches in the order they should be read), each node level with the
    node that feeds it from the column before, if any. Nodes of no stage form one ungrouped stage."""
    by_id = {n["id"]: n for n in ui_nodes}
    stage_of = {n.id: n.stage for n in graph.nodes}
    feeds: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # target -> (source, out slot, in slot)
    for _, src, out_slot, dst, in_slot, _ in links:
        feeds[dst].append((src, out_slot, in_slot))
    stages = stage_order([n.stage for n in graph.nodes],
                         {(stage_of[src], stage_of[dst]) for _, src, _, dst, _, _ in links})

    top = ORIGIN[1] + GROUP_TITLE_H + GROUP_PAD + TITLE_H  # the first node's body in every group
    x = ORIGIN[0]
    blocks = []
    for index, stage in enumerate(stages):
        members = [n.id for n in graph.nodes if stage_of[n.id] == stage]
        depth: dict[int, int] = {}
        for nid in members:  # creation order: inputs before the nodes they feed
            ups = [depth[s] for s, _, _ in feeds[nid] if s in depth]
            depth[nid] = 1 + max(ups, default=-1)
        columns: list[list[int]] = []
        for d in range(max(depth.values()) + 1):
            column, height = [], 0
            for nid in (m for m in members if depth[m] == d):
                h = by_id[nid]["size"][1] + TITLE_H + NODE_GAP
                if column and height + h > MAX_COLUMN_H:
                    columns.append(column)
                    column, height = [], 0
                column.append(nid)
                height += h
            columns.append(column)
        left = x + GROUP_PAD
        previous: set[int] = set()
        for column in columns:
            y = top
            for nid in column:  # from the top, in the definition's order (its reading order) ...
                node = by_id[nid]
                level = [by_id[s]["pos"][1] for s, _, _ in feeds[nid] if s in previous]
                node["pos"] = [left, max(y, min(level)) if level else y]
                y = node["pos"][1] + node["size"][1] + TITLE_H + NODE_GAP  # ... level with what feeds it
            previous = set(column)
            left += max(by_id[nid]["size"][0] for nid in column) + COLUMN_GAP
        right = left - COLUMN_GAP + GROUP_PAD
        blocks.append((stage, x, right, members))
        x = right + GROUP_GAP
    return _wrap_rows(blocks, by_id)


def _wrap_rows(blocks: list[tuple], by_id: dict[int, dict]) -> list[dict]:
    """Stages laid out in one line (``blocks``: stage, left, right, node ids) folded into rows at most
    ``ROW_MAX_W`` wide, read left to right then top to bottom, so that the opening view (``opening_view``)
    shows the first stages at a zoom where the front end draws them. Groups in a row are equally tall."""
    groups, rows, row = [], [], []
    x, y = ORIGIN
    for index, (stage, left, right, members) in enumerate(blocks):
        if row and x + (right - left) > ORIGIN[0] + ROW_MAX_W:
            rows.append(row)
            y = _close_row(row, by_id) + GROUP_GAP
            x, row = ORIGIN[0], []
        for nid in members:
            by_id[nid]["pos"] = [by_id[nid]["pos"][0] + x - left, by_id[nid]["pos"][1] + y - ORIGIN[1]]
        group = None
        if stage is not None:
            group = {"id": len(groups) + 1, "title": f"{len(groups) + 1} · {stage}",
                     "bounding": [x, y, right - left, 0],
                     "color": GROUP_COLORS[index % len(GROUP_COLORS)], "font_size": 24, "flags": {}}
            groups.append(group)
        row.append((group, members, y))
        x += right - left + GROUP_GAP
    _close_row(row, by_id)
    return groups


def _close_row(row: list[tuple], by_id: dict[int, dict]) -> float:
    """Make a row's groups as tall as its tallest content; the row's bottom."""
    bottom = max(by_id[nid]["pos"][1] + by_id[nid]["size"][1] for _, members, _ in row for nid in members)
    bottom += GROUP_PAD
    for group, _, top in row:
        if group is not None:
            group["bounding"][3] = bottom - top
    return bottom


# -- the view a workflow opens at --------------------------------------------------------------------
# The window the opening view is made for, and what the front end's own bars cover of it (1.32: the
# side bar on the left, the menu and workflow tabs at the top).
WINDOW = (1600, 1000)
WINDOW_MARGINS = (70, 160, 30, 40)  # left, top (a banner, the tabs, the workflow's name), right, bottom
MIN_SCALE = 0.75  # below ~0.57 the front end draws nodes as blank boxes; 0.75 keeps widgets readable


def opening_view(ui_nodes: list[dict], groups: list[dict]) -> dict:
    """``extra.ds`` (the view the front end restores on loading): the Read me and the first row of
    groups filling the window, at a zoom between ``MIN_SCALE`` and 1; when they do not fit at
    ``MIN_SCALE``, the top left of them at ``MIN_SCALE`` (the Read me first)."""
    first_row = [g["bounding"] for g in groups if g["bounding"][1] == min(h["bounding"][1] for h in groups)]
    notes = [[n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H]
             for n in ui_nodes if n["type"] in VIRTUAL_NODES]
    boxes = first_row + notes or [[n["pos"][0], n["pos"][1] - TITLE_H, *n["size"]] for n in ui_nodes]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    left, top, right, bottom = WINDOW_MARGINS
    fit = min((WINDOW[0] - left - right) / (x1 - x0), (WINDOW[1] - top - bottom) / (y1 - y0))
    scale = round(min(1.0, max(MIN_SCALE, fit)), 3)
    return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}


def note_node(id_: int, text: str, ui_nodes: list[dict], groups: list[dict]) -> dict:
    """The workflow's Note, across the top (as wide as the groups, within limits); everything else moves
    down to make room."""
    right = max([g["bounding"][0] + g["bounding"][2] for g in groups] +
                [n["pos"][0] + n["size"][0] for n in ui_nodes])
    width = _round_up(min(max(right - ORIGIN[0], NOTE_MIN_WIDTH), NOTE_MAX_WIDTH))
    per_line = int((width - 24) / NOTE_CHAR_W)
    lines = sum(max(1, -(-len(line) // per_line)) for line in text.splitlines())
    height = _round_up(6 + SLOT_H + 8 + 4 + 16 + NOTE_LINE_H * lines)
    shift = _round_up(height + TITLE_H + GROUP_GAP)
    for n in ui_nodes:
        n["pos"][1] += shift
    for g in groups:
        g["bounding"][1] += shift
    return {"id": id_, "type": "Note", "title": "Read me", "pos": [ORIGIN[0], ORIGIN[1] + TITLE_H],
            "size": [width, height], "flags": {}, "order": id_ - 1, "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt the front end would queue for a UI-format workflow."""
    links = {l[0]: l for l in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) == 2 or node["type"] in VIRTUAL_NODES:  # muted, or drawn only (a Note)
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed: not supported by this converter")
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: type {node['type']} is not installed in the server")
        info = object_info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, type_, opts in input_specs(info):
            link = linked.get(name)
            if link is not None:
                origin = links[link]
                inputs[name] = [str(origin[1]), origin[2]]
            if is_widget(type_, opts):
                value = values.pop(0) if values else default_value(type_, opts)
                del values[:len(extra_widget_values(name, type_, opts))]
                if link is None:
                    inputs[name] = value
        inputs.update(FRONT_END_INPUTS.get(node["type"], {}))
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api
