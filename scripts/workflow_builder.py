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
"""
from __future__ import annotations

from collections import defaultdict

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs the front end adds to the prompt that /object_info does not list: PreviewAny's read-only
# "preview" text (a widget of its front-end extension, not stored in the workflow), posted empty.
FRONT_END_INPUTS = {"PreviewAny": {"preview": ""}}


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
    def __init__(self, name: str, description: str = ""):
        self.name, self.description = name, description
        self.nodes: list[Node] = []

    def node(self, type_: str, title: str | None = None, **inputs) -> Node:
        n = Node(self, len(self.nodes) + 1, type_, title, inputs)
        self.nodes.append(n)
        return n

    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are created after their inputs
            ups = [v.node.id for v in n.inputs.values() if isinstance(v, Output)]
            depth[n.id] = 1 + max((depth[u] for u in ups), default=-1)
        return depth

    def to_ui(self, object_info: dict) -> dict:
        links, link_id = [], 0
        out_links: dict[tuple[int, int], list[int]] = defaultdict(list)
        depth = self._depths()
        rows: dict[int, int] = defaultdict(int)
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
                    literal = given if given is not None and not isinstance(given, Output) else default_value(type_, opts)
                    values += [literal] + extra_widget_values(name, type_, opts)
            col = depth[n.id]
            ui_nodes.append({
                "id": n.id, "type": n.type, "pos": [40 + 380 * col, 40 + 330 * rows[col]], "size": [340, 280],
                "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
                "outputs": [{"name": nm, "type": t, "links": None, "slot_index": i}
                            for i, (t, nm) in enumerate(zip(info["output"], info.get("output_name", info["output"])))],
                "properties": {"Node name for S&R": n.type}, "widgets_values": values,
                **({"title": n.title} if n.title else {}),
            })
            rows[col] += 1
        for node in ui_nodes:
            for o in node["outputs"]:
                o["links"] = out_links.get((node["id"], o["slot_index"])) or None
        return {"last_node_id": len(self.nodes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"info": {"name": self.name, "description": self.description}},
                "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt the front end would queue for a UI-format workflow."""
    links = {l[0]: l for l in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) == 2:  # muted
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
