"""Folders in, report out: pairs the folders, runs :func:`.run.evaluate`, writes ``report.json``
and ``report.html`` (tables + PNG plots) into an output folder. The evaluation node shows the
same tables and plots (:func:`summary_tables`, :func:`report_figures`)."""
from __future__ import annotations

import html
import json
from functools import partial
from pathlib import Path

import torch

from .formatting import format_value, json_safe
from .images import list_images, load_image, pair_names
from .identity import UNDETECTED_CONVENTIONS, UNDETECTED_SEPARATE
from .run import Item, evaluate


# -- identities ---------------------------------------------------------------------------------
def load_identities(path: str | Path) -> dict[str, str]:
    """File name -> identity label from a JSON file.

    Accepted layouts: ``{"identities": [[file, ...], ...]}`` (faces-13id; labels "id0", "id1", ...),
    ``{"identities": {label: [file, ...]}}``, ``{label: [file, ...]}`` or ``{file: label}``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read identities file {path}: {e}") from e
    groups = data.get("identities", data) if isinstance(data, dict) else data
    out: dict[str, str] = {}
    if isinstance(groups, list):
        for i, g in enumerate(groups):
            if not isinstance(g, list):
                raise ValueError(f"{path}: 'identities' must be a list of lists of file names")
            out.update({str(f): f"id{i}" for f in g})
    elif isinstance(groups, dict):
        for k, v in groups.items():
            if isinstance(v, list):
                out.update({str(f): str(k) for f in v})
            elif isinstance(v, (str, int)):
                out[str(k)] = str(v)
    if not out:
        raise ValueError(f"{path} holds no identities "
                         f"(expected e.g. {{\"identities\": [[\"a.jpg\", \"b.jpg\"], ...]}})")
    return out


def label_for(name: str, identities: dict[str, str]) -> str | None:
    if name in identities:
        return identities[name]
    stem = Path(name).stem
    hits = {v for k, v in identities.items() if Path(k).stem == stem}
    return hits.pop() if len(hits) == 1 else None


# -- folders -> items ---------------------------------------------------------------------------
def folder_items(originals: str | Path, protected: str | Path | None = None, recovered: str | Path | None = None,
                 identities: dict[str, str] | None = None, problems: list | None = None) -> list[Item]:
    """Items for every original; missing/extra files and unknown identities go to ``problems``."""
    problems = problems if problems is not None else []
    orig = list_images(originals)
    if not orig:
        raise ValueError(f"no images in {originals}")
    pairs = {}
    for what, folder in (("protected", protected), ("recovered", recovered)):
        if folder is None:
            continue
        files = list_images(folder)
        matched, missing, extra = pair_names(orig, files)
        pairs[what] = {k: files[v] for k, v in matched.items()}
        problems.extend({"file": n, "folder": what, "problem": f"no {what} counterpart of this original"}
                        for n in missing)
        problems.extend({"file": n, "folder": what, "problem": "no original with this name"} for n in extra)
    items = []
    for name, path in orig.items():
        label = label_for(name, identities) if identities else None
        if identities and label is None:
            problems.append({"file": name, "folder": "identities", "problem": "not in the identities file"})
        p = pairs.get("protected", {}).get(name)
        r = pairs.get("recovered", {}).get(name)
        items.append(Item(name, partial(load_image, path), partial(load_image, p) if p else None,
                          partial(load_image, r) if r else None, label))
    if identities:
        known = {Path(n).stem for n in orig}
        problems.extend({"file": n, "folder": "originals", "problem": "listed in the identities file, not found"}
                        for n in identities if Path(n).stem not in known)
    return items


def evaluate_folders(originals, protected=None, recovered=None, identities_path=None, models=None, *,
                     progress=None, lpips="auto", undetected: str = UNDETECTED_SEPARATE, distractors=None,
                     facemesh: str = "auto") -> dict:
    """The report over folders. ``undetected``: headline convention for protected images without a detected
    face (:data:`.identity.UNDETECTED_CONVENTIONS`); ``distractors``: a folder of other people's photos added
    to the identification protocol's different-identity set (it must not show anyone in the originals)."""
    problems: list = []
    identities = load_identities(identities_path) if identities_path else None
    items = folder_items(originals, protected, recovered, identities, problems)
    gallery = []
    if distractors is not None:
        files = list_images(distractors)
        if not files:
            raise ValueError(f"no images in the distractor folder {distractors}")
        gallery = [(f"{Path(distractors).name}/{name}", partial(load_image, path)) for name, path in files.items()]
    report = evaluate(items, models or {}, problems=problems, progress=progress, lpips=lpips, undetected=undetected,
                      distractors=gallery, facemesh=facemesh)
    report["inputs"] = {"originals": str(originals), "protected": str(protected) if protected else None,
                        "recovered": str(recovered) if recovered else None,
                        "identities": str(identities_path) if identities_path else None,
                        "distractors": str(distractors) if distractors else None, "distractor_images": len(gallery),
                        "undetected": UNDETECTED_CONVENTIONS[undetected]}
    return report


# -- tables and figures -------------------------------------------------------------------------
def summary_tables(report: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) for each table of the report (HTML page and node image alike)."""
    tables = []
    recs = report.get("recognizers", {})
    if recs:
        first = next(iter(recs.values()))["protection"]
        headline = first.get("convention_label", "")
        tables.append(("Protection success rate (paper Table 1). SR: " + headline,
                       ["recognizer", "threshold", "SR", "SR (§3.1.1: over faces detected)",
                        "SR (DIFP Eq. 23: undetected = protected)", "SR (aligned at original)", "not detected",
                        "faces", "mean distance"],
                       [[n, label, (a["success_rate_separate"] if s["protection"]["convention"] == UNDETECTED_SEPARATE
                                    else a["success_rate_eq23"]) if s["protection"]["n"] else None,
                         a["success_rate_separate"], a["success_rate_eq23"], a["success_rate_aligned"],
                         s["protection"]["n_undetected"], s["protection"]["n"], s["protection"]["mean_distance"]]
                        for n, s in recs.items() for label, a in s["protection"]["at_thresholds"].items()]))
        tables.append(("Identification accuracy (paper §3.2.1, Table 3); a protected face not detected counts as "
                       "not identified",
                       ["recognizer", "originals", "protected", "pairs", "protected not detected",
                        "distractors (Set_d)"],
                       [[n, s["identification"].get("original"), s["identification"].get("protected"),
                         s["identification"].get("pairs_protected", s["identification"].get("pairs_original")),
                         s["identification"].get("protected_not_detected"), _distractor_text(s["identification"])]
                        for n, s in recs.items()]))
        tables.append(("Face utility (paper Table 4)",
                       ["detector", "detection rate (originals)", "detection rate (protected)", "box distance (px)",
                        "landmark distance (px)", "landmarks"],
                       [[s["detector"], s["utility"]["detection_rate_original"],
                         s["utility"]["detection_rate_protected"], s["utility"]["box_distance"],
                         s["utility"]["landmark_distance"], s["utility"]["landmark_points"]]
                        for s in recs.values()]))
    for key, title in (("protected_pixels", "Protected vs original"),
                       ("recovered_pixels", "Recovered vs original (Table 2)")):
        px = report.get(key, {})
        if px.get("n"):
            header = ["images", "MSE", "RMSE", "MAE", "PSNR (dB)", "SSIM"]
            row = [px["n"], px["mse"], px["rmse"], px["mae"], px["psnr"], px["ssim"]]
            if key == "recovered_pixels":
                header.append("LPIPS")
                row.append(px.get("lpips") if report.get("lpips", {}).get("available") else "absent")
                for n, s in recs.items():
                    header += [f"Cos-IE {n}", f"re-identified {n}"]
                    row += [s["recovery"]["cos_ie"], s["recovery"]["identification_rate"]]
            tables.append((title, header, [row]))
    mesh = report.get("facemesh", {})
    if mesh.get("n"):
        tables.append(("Landmark preservation (MediaPipe FaceMesh, 468 points, the original's region; NME = mean "
                       "point move / inter-ocular distance)",
                       ["faces", "without face", "NME", "largest point move", "yaw change (deg)",
                        "pitch change (deg)", "roll change (deg)", "mesh still a face"],
                       [[mesh["n"], mesh["without_face"], mesh["nme"], mesh["max_point"], mesh["yaw_change"],
                         mesh["pitch_change"], mesh["roll_change"], mesh["mesh_found_protected"]]]))
    div = [(n, s["diversity"]) for n, s in recs.items() if "diversity" in s]
    if div:
        tables.append(("Diversity of protected identities (paper Fig. 9)",
                       ["recognizer", "outputs", "mean distance", "min", "max", "pairs judged different"],
                       [[n, d["n"], d["mean_distance"], d["min_distance"], d["max_distance"],
                         d["different_identity_rate"]] for n, d in div]))
    return tables


def _distractor_text(ident: dict) -> str:
    n = ident.get("distractors_external", 0)
    text = "originals of the other people"
    if "distractor_images" in ident:
        text += (f" + {n} external ({ident['distractor_images']} images, "
                 f"{ident['distractors_without_face']} without a face)")
    return text


def report_figures(report: dict, models: dict) -> dict[str, object]:
    """name -> matplotlib Figure: distance histograms and t-SNE plots per recognizer."""
    from .plots import distance_histogram, tsne_figure
    figs = {}
    emb = report.get("_embeddings", {})
    for mname, s in report.get("recognizers", {}).items():
        rows = [r["models"][mname] for r in report["per_file"] if mname in r.get("models", {})]
        dist = [r["distance"] for r in rows if r.get("distance") is not None]
        recd = [r["recovered_distance"] for r in rows if r.get("recovered_distance") is not None]
        if dist or recd:
            figs[f"distances_{mname}"] = distance_histogram(mname, dist, s["threshold"], recd)
        e = emb.get(mname, {})
        labels = {r["file"]: r["label"] for r in report["per_file"]}
        names_p = [n for n, v in e.get("protected", {}).items() if v is not None]  # undetected: no embedding
        names_o = list(e.get("original", {}))
        if len(names_p) + len(names_o) >= 5:
            vecs = [e["protected"][n] for n in names_p] + [e["original"][n] for n in names_o]
            labs = [labels.get(n) or n for n in names_p] + [labels.get(n) or n for n in names_o]
            marks = ["o"] * len(names_p) + ["x"] * len(names_o)
            try:
                figs[f"tsne_{mname}"] = tsne_figure(f"{mname} (o protected, x original)",
                                                    torch.stack(vecs).numpy(), labs, marks)
            except (ImportError, ValueError) as ex:
                report.setdefault("problems", []).append({"file": "", "folder": "plots", "problem": f"t-SNE: {ex}"})
    return figs


def batch_report(originals: torch.Tensor, protected: torch.Tensor, models: dict, labels: list | None = None,
                 recovered: torch.Tensor | None = None, progress=None,
                 undetected: str = UNDETECTED_SEPARATE) -> tuple[dict, list]:
    """The folder report's metrics over IMAGE batches (what the report node shows): (report, figures).

    ``models``: name -> FACE_MODEL; ``labels``: one identity per image or None; ``progress``: gets a
    :class:`~..guidance.progress.Step` per image, as :func:`.run.evaluate` sends them. Figures: the summary tables,
    the plots, and the problems.
    """
    from .plots import table_figure
    n = originals.shape[0]
    labels = labels if labels is not None else [None] * n
    items = [Item(f"image {i}", (lambda i=i: originals[i]), (lambda i=i: protected[i]),
                  (lambda i=i: recovered[i]) if recovered is not None else None, labels[i]) for i in range(n)]
    rep = evaluate(items, models, progress=progress, undetected=undetected)
    figs = [table_figure(*t) for t in summary_tables(rep)]
    figs += list(report_figures(rep, models).values())
    if rep["problems"]:
        figs.append(table_figure(f"Problems ({len(rep['problems'])})", ["image", "input", "problem"],
                                 [[p["file"], p["folder"], p["problem"][:90]] for p in rep["problems"]]))
    return rep, figs


# -- writing ------------------------------------------------------------------------------------
def _html_table(title, header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def write_report(report: dict, out_dir: str | Path, models: dict | None = None) -> dict[str, Path]:
    """Write report.json, report.html and the PNG plots; returns their paths."""
    from .plots import save_figure
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = report_figures(report, models or {})
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.png"
        save_figure(fig, paths[name])
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(json_safe(report), indent=1))
    parts = ["<!doctype html><meta charset='utf-8'><title>Diff-Privacy evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:center}</style>",
             "<h1>Diff-Privacy evaluation</h1>",
             f"<p>{html.escape(json.dumps(json_safe(report.get('inputs', {}))))}</p>"]
    if not report.get("lpips", {}).get("available"):
        parts.append(f"<p>LPIPS: {html.escape(str(report.get('lpips', {}).get('reason', 'absent')))}</p>")
    parts += [_html_table(*t) for t in summary_tables(report)]
    parts += [f"<h2>{html.escape(n)}</h2><img src='{p.name}'>" for n, p in paths.items() if p.suffix == ".png"]
    probs = report.get("problems", [])
    parts.append(_html_table(f"Problems ({len(probs)})", ["file", "folder", "problem"],
                             [[p["file"], p["folder"], p["problem"]] for p in probs]))
    mnames = list(report.get("recognizers", {}))
    header = ["file", "identity", "PSNR protected", "SSIM protected"] + [f"{m} distance" for m in mnames] \
        + [f"{m} protected" for m in mnames]
    rows = []
    for r in report.get("per_file", []):
        px = r.get("protected_pixels", {})
        ms = r.get("models", {})
        rows.append([r["file"], r.get("label"), px.get("psnr"), px.get("ssim")]
                    + [ms.get(m, {}).get("distance") for m in mnames]
                    + [ms.get(m, {}).get("protected") for m in mnames])
    parts.append(_html_table("Per file", header, rows))
    paths["html"] = out / "report.html"
    paths["html"].write_text("\n".join(parts))
    return paths
