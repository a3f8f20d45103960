"""Transfer table of hiding from detectors: attack sets x R_p, each measured by every detector.

    bash scripts/dev.sh python benchmarks/hide_transfer_table.py --out /tmp/transfer \
        [--attacks "mtcnn;blazeface-short;blazeface-full;mtcnn,blazeface-short,blazeface-full"] [--ranges 3,8,12] \
        [--faces13-limit 6] [--max-side 640] [--cnn-limit 0]

Runs ``scripts/hide_from_detectors.py`` once per (attack set, R_p, folder) into ``<out>/<attack>/rp<R>/<folder>/``
(a run whose ``report.json`` exists is not repeated), with ``--evaluate --no-baselines`` and every other detector
measured (MTCNN, BlazeFace short, BlazeFace full, dlib HOG, and dlib CNN on the first ``--cnn-limit`` photos), then
prints the Markdown table (``--print-only``: only the cells already measured, nothing run): per row the private
faces hidden from each detector (among the faces that detector found on the original), kept faces still found by the
attacked ones, SSIM (min-max, and how many photos reach 0.98), and seconds per photo. The photos folder runs with
faces 0, 2, 4... private (``--private alternate``), faces-13id with every face private.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import hide_from_detectors  # scripts/, on the path through scripts/dev.sh

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MEASURED = ("mtcnn", "blazeface-short", "blazeface-full", "dlib-hog", "dlib-cnn")
LABEL = {"mtcnn": "MTCNN", "blazeface-short": "BF short", "blazeface-full": "BF full", "dlib-hog": "dlib HOG",
         "dlib-cnn": "dlib CNN"}


def run(out: Path, attack: str, rp: float, folder: Path, args) -> dict | None:
    dst = out / attack.replace(",", "+") / f"rp{rp:g}" / folder.name
    report = dst / "report.json"
    if not report.is_file() and args.print_only:
        return None
    if not report.is_file():
        argv = ["--input", str(folder), "--out", str(dst), "--detectors", attack, "--range", str(rp),
                "--evaluate", "--no-baselines", "--transfer", ",".join(MEASURED), "--max-side", str(args.max_side),
                "--cnn-limit", str(args.cnn_limit), "--threads", str(args.threads)]
        if folder.name == "photos":
            argv += ["--private", "alternate"]
        else:
            argv += ["--limit", str(args.faces13_limit)]
        if args.cnn_limit == 0:
            argv[argv.index("--transfer") + 1] = ",".join(m for m in MEASURED if m != "dlib-cnn")
        hide_from_detectors.main(argv)
    return json.loads(report.read_text())


def cells(rep: dict, attacked: list[str]) -> list[str]:
    rows = [r for r in rep["photos"] if "detectors" in r]
    out = []
    for d in MEASURED:
        hidden = [v for r in rows for v in r["detectors"].get(d, {}).get("private_hidden", [])]
        out.append(f"{sum(hidden)}/{len(hidden)}" if hidden else "–")
    kept = [v for r in rows for d in attacked for v in r["detectors"].get(d, {}).get("kept_found", [])]
    out.append(f"{sum(kept)}/{len(kept)}" if kept else "–")
    ssim = [r["distortion"]["ssim"] for r in rows]
    out.append(f"{min(ssim):.3f}–{max(ssim):.3f}" if ssim else "–")
    out.append(f"{sum(v >= 0.98 for v in ssim)}/{len(ssim)}" if ssim else "–")
    secs = [r["seconds"] for r in rows]
    out.append(f"{sum(secs) / len(secs):.1f}" if secs else "–")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--attacks", default="mtcnn;blazeface-short;blazeface-full;mtcnn,blazeface-short,blazeface-full",
                    help="attack sets separated by ';', detectors of one set by ','")
    ap.add_argument("--ranges", default="3,8,12")
    ap.add_argument("--folders", default="photos,faces-13id")
    ap.add_argument("--faces13-limit", type=int, default=6, help="the first N photos of faces-13id (by name)")
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--cnn-limit", type=int, default=0, help="dlib CNN on the first N photos per run (0: not run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--print-only", action="store_true",
                    help="run nothing: print the cells already measured (a partial table while others still run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    head = ["attack", "R_p", "photos"] + [f"hidden from {LABEL[d]}" for d in MEASURED] + \
        ["kept found (attacked)", "SSIM", "SSIM ≥ 0.98", "s / photo"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for attack in args.attacks.split(";"):
        attacked = attack.split(",")
        for rp in (float(v) for v in args.ranges.split(",")):
            for folder in args.folders.split(","):
                rep = run(out, attack, rp, SHARED / folder, args)
                if rep is None:
                    continue
                label = " + ".join(LABEL[a] for a in attacked)
                lines.append("| " + " | ".join([label, f"{rp:g}", folder] + cells(rep, attacked)) + " |")
                (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
