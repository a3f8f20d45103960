// Diff-Privacy nodes: draw the text a node reports after a run on the node itself.
//
// Nodes of this pack return lines for the user in their `ui` dictionary (`{"ui": {"text": [...]}}`):
// Face Model Loader's automatic choice, Save Key's file name and whether it is sealed, Hide from
// Detectors' result, a report. The stock front end keeps them only in the queue history; this draws
// them under the node's widgets, growing the node when they need more room than it has.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack folder>/js/

const PACK_PREFIX = "DiffPrivacy";
const FONT = "12px Arial";
const LINE_H = 16;
const PAD = 8;
const MAX_LINES = 12;  // a longer report is cut (its full text is in the node's STRING output, if any)

function wrap(ctx, text, width) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) {
        lines.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    lines.push(line);
  }
  return lines.length > MAX_LINES ? [...lines.slice(0, MAX_LINES - 1), "…"] : lines;
}

function textTop(node) {
  // Below the slots and widgets: the height the front end computes for the node without the text.
  return node.computeSize()[1];
}

app.registerExtension({
  name: "DiffPrivacy.NodeText",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PACK_PREFIX)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null || message?.images?.length) return r;  // a node showing images keeps its preview area
      this.diffPrivacyText = (Array.isArray(text) ? text : [text]).join("\n");
      this.setDirtyCanvas(true, true);
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.diffPrivacyText || this.flags?.collapsed) return r;
      ctx.save();
      ctx.font = FONT;
      const lines = wrap(ctx, this.diffPrivacyText, this.size[0] - 2 * PAD);
      const top = textTop(this);
      const needed = top + lines.length * LINE_H + PAD;
      if (this.size[1] < needed) this.setSize([this.size[0], needed]);
      ctx.fillStyle = globalThis.LiteGraph?.WIDGET_TEXT_COLOR ?? "#ddd";
      ctx.textAlign = "left";
      ctx.textBaseline = "alphabetic";
      lines.forEach((line, i) => ctx.fillText(line, PAD, top + (i + 1) * LINE_H - 3));
      ctx.restore();
      return r;
    };
  },
});
