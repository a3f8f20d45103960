"""DP-Image evaluation rows (thesis Table 4.1 style): FPPSR, ISS and SSIM per recognizer, per protected folder, with the
privacy label of each folder's renders (their Save DP Image sidecars) carried into report.json.

    bash scripts/dev.sh python scripts/evaluate_dp.py --originals ../shared/data/faces-13id \
        --protected /tmp/dp/strict,/tmp/bl/blur-strong,/tmp/bl/mosaic-strong --recognizers dlib,facenet-casia \
        --out /tmp/r
    bash scripts/dev.sh python scripts/evaluate_dp.py --originals ../shared/data/faces-13id \
        --embedding-sweep 0.02,0.05,0.1,0.2,0.5,1,2 --recognizers dlib,facenet-casia --out /tmp/r-emb

The first compares protected images with their originals (paired by file name). The second needs no images: it
noises each original's embedding in the recognizer's own space and reports ε, cosine and FPPSR of the embedding.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", required=True)
    ap.add_argument("--protected", default="", help="comma-separated folders of protected images")
    ap.add_argument("--embedding-sweep", default="", help="comma-separated σ values for the embedding-level rows")
    ap.add_argument("--recognizers", default="dlib,facenet-casia")
    ap.add_argument("--clip-radius", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from diffprivacy.evaluation import dp_image
    from diffprivacy.evaluation.analysis import analyse_face
    from diffprivacy.evaluation.images import list_images, load_image, pair_names
    from diffprivacy.evaluation.recognizers import load_evaluation_model

    models = {s: load_evaluation_model(s) for s in args.recognizers.split(",") if s.strip()}
    originals = list_images(args.originals)
    report: dict = {"originals": str(args.originals), "rows": [], "embedding_rows": {}}
    for folder in [f for f in args.protected.split(",") if f.strip()]:
        pairs, missing, extra = pair_names(originals, list_images(folder))
        a = [load_image(originals[o]) for o in pairs]
        b = [load_image(Path(folder) / p) for p in pairs.values()]
        label = dp_image.labels_of(folder)
        for spec, model in models.items():
            row = dp_image.dp_rows(model, a, b)
            row.update(protected=str(folder), recognizer_spec=spec, unpaired=missing + extra,
                       differentially_private=label["differentially_private"], epsilon=label["epsilon"],
                       privacy_labels=label["labels"])
            report["rows"].append(row)
            print(f"{folder} [{spec}] FPPSR {row['fppsr']} ISS {row['iss']} SSIM {row['ssim']} "
                  f"DP {row['differentially_private']}")
    if args.embedding_sweep:
        import torch
        sigmas = [float(s) for s in args.embedding_sweep.split(",")]
        for spec, model in models.items():
            embs = [analyse_face(model, load_image(p)).embedding for p in originals.values()]
            embs = torch.stack([e for e in embs if e is not None])
            rows = dp_image.embedding_rows(model, embs, sigmas, args.clip_radius, args.delta)
            report["embedding_rows"][spec] = {"faces": int(embs.shape[0]), "dim": int(embs.shape[1]), "rows": rows}
            for r in rows:
                print(f"[{spec}] σ {r['sigma']:g}: ε {r['epsilon']:.4g}, cosine {r['cosine']:.3f}, "
                      f"FPPSR(embedding) {r['fppsr_embedding']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    print("wrote", out / "report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
