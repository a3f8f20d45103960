"""Evaluation nodes: the dlib recognizer, the paper's metrics, and a full report shown as images.

Every metric node takes IMAGE batches (image i of one input pairs with image i of the other)
and returns its headline numbers as FLOATs plus a JSON STRING with per-image details; images
without a detectable face are reported in that STRING, not raised.
"""
from __future__ import annotations

import json
import math

import torch

from ..evaluation.analysis import analyse_face, embed_at
from ..evaluation.identity import cos_ie, diversity_summary, identity_distance, leave_one_out_identification
from ..evaluation.images import match_size
from ..evaluation.key_security import key_security_figure, key_security_table
from ..evaluation.pixel_metrics import all_pixel_metrics
from ..evaluation.utility import utility_pair
from .images import rgb_batch

CATEGORY = "Diff-Privacy/evaluation"
REQUIRES = {"DiffPrivacyDlibFaceModel": ("dlib", "face_recognition_models"),
            "DiffPrivacyIdentityDiversity": ("matplotlib", "sklearn"),
            "DiffPrivacyKeySecurity": ("matplotlib",),
            "DiffPrivacyEvaluationReport": ("matplotlib", "sklearn")}

_FACE_MODEL = ("FACE_MODEL", {"tooltip": "Recognizer (and detector) to measure with, at its own threshold: "
                                         "dlib L2 0.6, FaceNet L2 1.1, ArcFace cosine."})


# -- helpers ------------------------------------------------------------------------------------
def paired(a, b, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = rgb_batch(a, name_a), rgb_batch(b, name_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} image(s) but {name_b} has {b.shape[0]}: image i of one is "
                         f"compared with image i of the other, so the batches must be equally long")
    return a, b


def parse_labels(text: str, n: int) -> list[str]:
    """One identity label per image, separated by commas or new lines."""
    labels = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
    if len(labels) != n:
        raise ValueError(f"identities lists {len(labels)} label(s) but there are {n} image(s): give one label per "
                         f"image, in batch order, separated by commas (e.g. 'anna, anna, ben')")
    return labels


def _progress(total: int):
    try:
        import comfy.utils
        return comfy.utils.ProgressBar(total)
    except Exception:  # no server (plain-function use)
        return None


def _interrupted():
    try:
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
    except ImportError:
        pass


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _dump(obj) -> str:
    from ..evaluation.report import _json_safe
    return json.dumps(_json_safe(obj), indent=1)


def stack_figures(figs) -> torch.Tensor:
    """Figures -> one IMAGE batch, each padded with white to the largest size."""
    from ..evaluation.plots import figure_to_image
    imgs = [figure_to_image(f)[0] for f in figs]
    h = max(i.shape[0] for i in imgs)
    w = max(i.shape[1] for i in imgs)
    out = torch.ones(len(imgs), h, w, 3)
    for k, i in enumerate(imgs):
        out[k, :i.shape[0], :i.shape[1]] = i
    return out


# -- nodes --------------------------------------------------------------------------------------
class DiffPrivacyDlibFaceModel:
    DESCRIPTION = ("dlib's face recognizer (ResNet, 128-D, L2 threshold 0.6) with its HOG detector and 68-point "
                   "landmarks, as a FACE_MODEL for evaluation only (not differentiable: it cannot guide "
                   "sampling). Files come from the face_recognition_models package.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "detect_size": ("INT", {"default": 1600, "min": 320, "max": 4096, "step": 32,
                                    "tooltip": "HOG detection runs on a copy with this longest side (faces from about "
                                               "5% of it are found); larger finds smaller faces, slower."}),
            "threshold": ("FLOAT", {"default": 0.6, "min": 0.05, "max": 2.0, "step": 0.01,
                                    "tooltip": "Same person iff L2 distance < threshold; dlib's standard is 0.6."}),
        }}

    RETURN_TYPES = ("FACE_MODEL",)
    OUTPUT_TOOLTIPS = ("dlib detector + recognizer for the evaluation and baseline nodes.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, detect_size, threshold):
        import copy
        from ..guidance.face.dlib_face import load_dlib_face_model
        model = load_dlib_face_model(detect_size)
        if abs(threshold - model.threshold) > 1e-9:
            model = copy.copy(model)  # the loaded model is shared: never change its threshold in place
            model.threshold = float(threshold)
        return (model,)


class DiffPrivacyProtectionRate:
    DESCRIPTION = ("Protection success rate (paper Table 1, DIFP Eq. 23): the share of faces the recognizer no "
                   "longer matches to their original (distance >= its threshold).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": _FACE_MODEL,
            "original": ("IMAGE", {"tooltip": "The unprotected images."}),
            "protected": ("IMAGE", {"tooltip": "The protected images, in the same order."}),
            "alignment": (["own detection", "original landmarks"], {
                "default": "own detection",
                "tooltip": "own detection: the protected face is found by the detector; none found counts as "
                           "protected (Eq. 23). original landmarks: the protected image is aligned where the "
                           "original's face was (a stronger attacker)."}),
        }}

    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("success_rate", "details")
    OUTPUT_TOOLTIPS = ("NP / NT over images whose original has a face (NaN if none has).",
                       "JSON: per image distance and outcome; images skipped and why.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, original, protected, alignment):
        original, protected = paired(original, protected, "original", "protected")
        rows, outcomes = [], []
        bar = _progress(original.shape[0])
        for i, (o, p) in enumerate(zip(original, protected)):
            _interrupted()
            p = match_size(p, o)
            ao = analyse_face(face_model, o)
            if not ao.detected:
                rows.append({"index": i, "skipped": "no face detected in the original"})
            else:
                if alignment == "own detection":
                    ap = analyse_face(face_model, p)
                    e = ap.embedding
                else:
                    e = embed_at(face_model, p, ao.landmarks)
                d = None if e is None else identity_distance(face_model, ao.embedding, e)
                ok = d is None or d >= face_model.threshold
                outcomes.append(ok)
                rows.append({"index": i, "distance": d, "protected": ok,
                             **({"note": "no face detected in the protected image"} if d is None else {})})
            if bar:
                bar.update(1)
        rate = sum(outcomes) / len(outcomes) if outcomes else float("nan")
        return rate, _dump({"success_rate": rate, "recognizer": face_model.name, "threshold": face_model.threshold,
                            "faces": len(outcomes), "images": rows})


class DiffPrivacyIdentificationAccuracy:
    DESCRIPTION = ("Identification accuracy (paper §3.2.1, Table 3): each original in turn is the probe; a pair "
                   "(probe, evaluated image of the same person) is correct when that image is nearer to the probe "
                   "than every original of another person.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": _FACE_MODEL,
            "originals": ("IMAGE", {"tooltip": "Unprotected photos of several people, at least two per person."}),
            "evaluated": ("IMAGE", {"tooltip": "The images to identify (e.g. encrypted), in the same order; connect "
                                               "the originals again to measure the originals' accuracy."}),
            "identities": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "One label per image in batch order, comma or line separated, e.g. "
                                                 "'anna, anna, ben, ben'."}),
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("accuracy", "accuracy_originals", "details")
    OUTPUT_TOOLTIPS = ("Accuracy with the evaluated images as the same-identity set.",
                       "Accuracy of the originals themselves (the paper's 'Original' column).",
                       "JSON: pairs counted, images without a face.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, originals, evaluated, identities):
        originals, evaluated = paired(originals, evaluated, "originals", "evaluated")
        labels = parse_labels(identities, originals.shape[0])
        orig, ev, skipped = {}, {}, []
        bar = _progress(originals.shape[0])
        for i, (o, e) in enumerate(zip(originals, evaluated)):
            _interrupted()
            ao = analyse_face(face_model, o)
            if not ao.detected:
                skipped.append({"index": i, "problem": "no face detected in the original"})
            else:
                orig[i] = ao.embedding
                ae = analyse_face(face_model, match_size(e, o))
                ev[i] = ae.embedding if ae.detected else embed_at(face_model, match_size(e, o), ao.landmarks)
            if bar:
                bar.update(1)
        lab = dict(enumerate(labels))
        acc, pairs = leave_one_out_identification(face_model, orig, ev, lab)
        acc0, _ = leave_one_out_identification(face_model, orig, orig, lab)
        if pairs == 0:
            raise ValueError("no probe has another photo of the same person with a detected face, and someone else's "
                             "photo to compare with: give at least two people with two photos each")
        return acc, acc0, _dump({"accuracy": acc, "accuracy_originals": acc0, "pairs": pairs, "skipped": skipped})


class DiffPrivacyImageQuality:
    DESCRIPTION = ("Recovery quality (paper Table 2, DIFP): MSE, RMSE, MAE, PSNR (inf for identical images), SSIM; "
                   "LPIPS when its weights are in models/lpips/; Cos-IE and re-identification with a face model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "Reference images."}),
            "other": ("IMAGE", {"tooltip": "Recovered (or protected) images in the same order; resized to the "
                                           "original's size if they differ."}),
        }, "optional": {"face_model": ("FACE_MODEL", {"tooltip": "Optional: adds Cos-IE (cosine similarity of identity "
                                                                 "embeddings) and re-identification."})}}

    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("psnr", "ssim", "mse", "details")
    OUTPUT_TOOLTIPS = ("Mean PSNR in dB (inf when every pair is identical).", "Mean SSIM.", "Mean MSE ([0, 1] scale).",
                       "JSON: every metric per image and the means.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, original, other, face_model=None):
        from ..evaluation.lpips import LPIPSUnavailable, load_lpips
        original, other = paired(original, other, "original", "other")
        try:
            lp = load_lpips()
            lp_note = None
        except LPIPSUnavailable as e:
            lp, lp_note = None, str(e)
        rows = []
        for i, (o, x) in enumerate(zip(original, other)):
            _interrupted()
            x = match_size(x, o)
            row = {"index": i, **all_pixel_metrics(o, x)}
            if lp is not None:
                row["lpips"] = lp.distance(o, x)
            if face_model is not None:
                ao = analyse_face(face_model, o)
                if ao.detected:
                    e = embed_at(face_model, x, ao.landmarks)
                    row["cos_ie"] = cos_ie(ao.embedding, e)
                    row["same_person"] = identity_distance(face_model, ao.embedding, e) < face_model.threshold
                else:
                    row["cos_ie"] = None
                    row["note"] = "no face detected in the original"
            rows.append(row)
        means = {}
        for k in ("mse", "rmse", "mae", "psnr", "ssim", "lpips", "cos_ie"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                means[k] = sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else float("inf")
        return (_num(means.get("psnr")), _num(means.get("ssim")), _num(means.get("mse")),
                _dump({"mean": means, "lpips": lp_note or "present", "images": rows}))


class DiffPrivacyFaceUtility:
    DESCRIPTION = ("Face utility (paper Table 4): is the original's face still detected in the protected image, and "
                   "how far did its box and landmarks move (pixels; 68 points with the dlib model, else 5)?")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": ("FACE_MODEL", {"tooltip": "Its detector is evaluated (MTCNN, SCRFD or dlib)."}),
            "original": ("IMAGE", {"tooltip": "The unprotected images."}),
            "protected": ("IMAGE", {"tooltip": "The protected images, in the same order."}),
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("detection_rate", "box_distance", "landmark_distance", "details")
    OUTPUT_TOOLTIPS = ("Share of originals with a face whose face is found again in the protected image.",
                       "Mean box-corner distance in pixels.", "Mean landmark distance in pixels.",
                       "JSON: face counts and distances per image.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, original, protected):
        original, protected = paired(original, protected, "original", "protected")
        rows = []
        bar = _progress(original.shape[0])
        for i, (o, p) in enumerate(zip(original, protected)):
            _interrupted()
            rows.append({"index": i, **utility_pair(analyse_face(face_model, o, embed=False),
                                                    analyse_face(face_model, match_size(p, o), embed=False))})
            if bar:
                bar.update(1)
        det = [r["detected"] for r in rows if r["detected"] is not None]
        if not det:
            raise ValueError("no face was detected in any original image, so detection cannot be compared")
        mean = lambda k: (lambda v: sum(v) / len(v) if v else float("nan"))(  # noqa: E731
            [r[k] for r in rows if r[k] is not None])
        rate = sum(det) / len(det)
        return rate, mean("box_distance"), mean("landmark_distance"), _dump({"detection_rate": rate, "images": rows})


class DiffPrivacyIdentityDiversity:
    DESCRIPTION = ("Diversity of identities (paper Fig. 9): pairwise identity distances among a set of outputs "
                   "(e.g. one face protected with many keys) and a t-SNE plot of their embeddings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": _FACE_MODEL,
            "images": ("IMAGE", {"tooltip": "The outputs to compare (at least 3 with faces for the plot)."}),
            "identities": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Optional: one source-identity label per image (comma separated) to "
                                                 "colour the plot; empty colours all the same."}),
        }}

    RETURN_TYPES = ("FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("mean_distance", "tsne_plot", "details")
    OUTPUT_TOOLTIPS = ("Mean pairwise identity distance (higher = more diverse).", "t-SNE of the embeddings.",
                       "JSON: mean/min/max distance, share of pairs judged different people, skipped images.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, images, identities):
        from ..evaluation.plots import table_figure, tsne_figure
        images = rgb_batch(images, "images")
        labels = parse_labels(identities, images.shape[0]) if identities.strip() else ["outputs"] * images.shape[0]
        embs, labs, skipped = [], [], []
        for i, img in enumerate(images):
            _interrupted()
            a = analyse_face(face_model, img)
            if a.detected:
                embs.append(a.embedding)
                labs.append(labels[i])
            else:
                skipped.append(i)
        if len(embs) < 2:
            raise ValueError(f"diversity needs at least two images with a detected face; {len(embs)} had one")
        e = torch.stack(embs)
        summary = diversity_summary(face_model, e)
        if len(embs) >= 3:
            fig = tsne_figure(face_model.name, e.numpy(), labs)
        else:
            fig = table_figure("Diversity", list(summary), [list(summary.values())])
        return summary["mean_distance"], stack_figures([fig]), _dump({**summary, "skipped_no_face": skipped})


class DiffPrivacyKeySecurity:
    DESCRIPTION = ("Key security (paper A.3.1, Fig. 7): compares recoveries made with a wrong Key-I, a wrong Key-E, "
                   "UC as Key-E and the correct key against the original.")

    @classmethod
    def INPUT_TYPES(cls):
        img = lambda what: ("IMAGE", {"tooltip": f"Recovered with {what} (first image of the batch is used)."})  # noqa: E731
        return {"required": {"original": ("IMAGE", {"tooltip": "The original image (first of the batch)."}),
                             "correct_key": img("the correct Key-I and Key-E")},
                "optional": {"wrong_key_i": img("a wrong Key-I"), "wrong_key_e": img("a wrong Key-E"),
                             "uc_as_key_e": img("the correct Key-I and the unconditional embedding as Key-E"),
                             "wrong_keys": img("both keys wrong"),
                             "face_model": ("FACE_MODEL", {"tooltip": "Optional: adds identity distance, Cos-IE and "
                                                                      "'same person' per variant."})}}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("figure", "table")
    OUTPUT_TOOLTIPS = ("The recoveries side by side with PSNR/SSIM, and the table as an image.",
                       "JSON: one row per variant.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, original, correct_key, wrong_key_i=None, wrong_key_e=None, uc_as_key_e=None, wrong_keys=None,
                face_model=None):
        from ..evaluation.plots import table_figure
        o = rgb_batch(original, "original")[0]
        rec = {"wrong Key-I": wrong_key_i, "wrong Key-E": wrong_key_e, "UC as Key-E": uc_as_key_e,
               "wrong keys": wrong_keys, "correct key": correct_key}
        rec = {k: rgb_batch(v, k)[0] for k, v in rec.items() if v is not None}
        models = {face_model.name: face_model} if face_model is not None else {}
        rows = key_security_table(o, rec, models)
        header = list(rows[0])
        figs = [key_security_figure(o, rec, rows), table_figure("Key security", header, [list(r.values()) for r in rows])]
        return stack_figures(figs), _dump(rows)


class DiffPrivacyEvaluationReport:
    DESCRIPTION = ("Every metric at once (protection, identification, recovery, utility, diversity) for up to three "
                   "face models, shown as tables and plots; the same report scripts/evaluate.py writes for folders.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": _FACE_MODEL,
            "originals": ("IMAGE", {"tooltip": "The unprotected images."}),
            "protected": ("IMAGE", {"tooltip": "The protected images, in the same order."}),
            "identities": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Optional: one identity label per image (comma separated) for "
                                                 "identification accuracy and the t-SNE colours."}),
        }, "optional": {
            "recovered": ("IMAGE", {"tooltip": "Optional: recovered images in the same order (recovery quality)."}),
            "face_model_2": ("FACE_MODEL", {"tooltip": "Optional second recognizer."}),
            "face_model_3": ("FACE_MODEL", {"tooltip": "Optional third recognizer."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("report", "json")
    OUTPUT_TOOLTIPS = ("Tables and plots, one image each.", "All numbers, per image and summarised.")
    FUNCTION = "report"
    CATEGORY = CATEGORY

    def report(self, face_model, originals, protected, identities, recovered=None, face_model_2=None,
               face_model_3=None):
        from ..evaluation.plots import table_figure
        from ..evaluation.report import report_figures, summary_tables
        from ..evaluation.run import Item, evaluate
        originals, protected = paired(originals, protected, "originals", "protected")
        if recovered is not None:
            _, recovered = paired(originals, recovered, "originals", "recovered")
        n = originals.shape[0]
        labels = parse_labels(identities, n) if identities.strip() else [None] * n
        models = {}
        for m in (face_model, face_model_2, face_model_3):
            if m is not None:
                name = m.name if m.name not in models else f"{m.name} ({len(models) + 1})"
                models[name] = m
        items = [Item(f"image {i}", (lambda i=i: originals[i]), (lambda i=i: protected[i]),
                      (lambda i=i: recovered[i]) if recovered is not None else None, labels[i]) for i in range(n)]
        bar = _progress(n)

        def progress(done, total, name):
            _interrupted()
            if bar:
                bar.update_absolute(done, total)

        rep = evaluate(items, models, progress=progress)
        figs = [table_figure(*t) for t in summary_tables(rep)]
        figs += list(report_figures(rep, models).values())
        if rep["problems"]:
            figs.append(table_figure(f"Problems ({len(rep['problems'])})", ["image", "input", "problem"],
                                     [[p["file"], p["folder"], p["problem"][:90]] for p in rep["problems"]]))
        return stack_figures(figs), _dump(rep)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyDlibFaceModel": DiffPrivacyDlibFaceModel,
    "DiffPrivacyProtectionRate": DiffPrivacyProtectionRate,
    "DiffPrivacyIdentificationAccuracy": DiffPrivacyIdentificationAccuracy,
    "DiffPrivacyImageQuality": DiffPrivacyImageQuality,
    "DiffPrivacyFaceUtility": DiffPrivacyFaceUtility,
    "DiffPrivacyIdentityDiversity": DiffPrivacyIdentityDiversity,
    "DiffPrivacyKeySecurity": DiffPrivacyKeySecurity,
    "DiffPrivacyEvaluationReport": DiffPrivacyEvaluationReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyDlibFaceModel": "Diff-Privacy dlib Face Model (evaluation)",
    "DiffPrivacyProtectionRate": "Diff-Privacy Protection Success Rate",
    "DiffPrivacyIdentificationAccuracy": "Diff-Privacy Identification Accuracy",
    "DiffPrivacyImageQuality": "Diff-Privacy Image Quality (MSE/PSNR/SSIM/LPIPS)",
    "DiffPrivacyFaceUtility": "Diff-Privacy Face Utility (detection, box, landmarks)",
    "DiffPrivacyIdentityDiversity": "Diff-Privacy Identity Diversity (t-SNE)",
    "DiffPrivacyKeySecurity": "Diff-Privacy Key Security",
    "DiffPrivacyEvaluationReport": "Diff-Privacy Evaluation Report",
}
