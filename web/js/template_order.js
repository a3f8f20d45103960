// Diff-Privacy nodes: list this pack's templates in the template browser with the recommended first one on top.
//
// The server (/workflow_templates) lists a pack's example_workflows/*.json in the order the file system returns
// them, and the front end the host ships (1.32.9) keeps that order. This puts FIRST at the top, the rest
// alphabetically. Only this pack's list is touched: the one holding all of FIRST.
import { api } from "../../../scripts/api.js";  // served at /extensions/<pack folder>/js/

const FIRST = ["anonymize-text-key", "anonymize-fast", "anonymize-learn-key-e", "recover"];

const fetchTemplates = api.getWorkflowTemplates.bind(api);
api.getWorkflowTemplates = async function () {
  const templates = await fetchTemplates();
  for (const [pack, names] of Object.entries(templates ?? {})) {
    if (!Array.isArray(names) || !FIRST.every((n) => names.includes(n))) continue;
    const rest = names.filter((n) => !FIRST.includes(n)).sort();
    templates[pack] = [...FIRST, ...rest];
  }
  return templates;
};
