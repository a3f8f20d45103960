"""DP-Image on the identity embedding (thesis ch. 4, adapted to SD 1.5 + FaceID): the mechanism and its ε.

The mechanism (one round). The face's identity embedding x (ArcFace 512, unit norm as FaceID reads it) is

    clip_C(x) = x * min(1, C / ||x||)          (1-Lipschitz, lands in the L2 ball of radius C)
    z         = clip_C(x) + N(0, sigma^2 I)     (the Gaussian mechanism)
    z'        = z / ||z||                        (optional renormalisation: post-processing, costs nothing)

Any two faces' clipped embeddings lie at most Δ = 2C apart (the ball's diameter): that is the sensitivity, for
*any* two photos (the thesis's Definition 4.4.1 compares any two images, not neighbouring datasets).

The thesis's iterated form (Alg. 6): T rounds, each re-embedding the face rendered from the previous round's
noised embedding. Accounting here is composition: round t's input may depend on the original however it likes
(adaptively), its clip still bounds the sensitivity by 2C, so the T noised embeddings together are a T-fold
adaptive composition of Gaussian mechanisms. For Gaussian mechanisms that composition is exactly one Gaussian
mechanism with μ = √T·Δ/σ (Dong, Roth & Su 2019, Gaussian DP), so ε comes from the analytic Gaussian mechanism
(Balle & Wang 2018) at that μ; dp-accounting's ``get_epsilon_gaussian`` gives it (and its PLD accountant agrees,
``tests/test_dp_identity.py``); its RDP accountant is the second, looser line. Composition grows with T.

In *strict* rendering, rounds 2..T see only images generated from round 1's output, so the final image is
post-processing of round 1's release and the single-round ε also bounds it; the report states both.

The thesis's own figure, Theorem 4.4.1: (α, αΔ²/(2Tσ²))-RDP, i.e. (αΔ²/(2Tσ²) + log(1/δ)/(α−1), δ)-DP, which
*shrinks* with T. It rests on privacy amplification by iteration (Feldman et al. 2018), which needs every
render→re-embed map to be a contraction and the intermediate rounds to stay hidden; neither is shown for a
generator + face recognizer. It is reported beside the accountant's ε, labelled as the thesis's bound, never used.

Pure torch; dp_accounting is imported inside the functions that use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SIGMA_RANGE = (1e-3, 1e4)   # noise std the target-ε solver may choose (per coordinate, embedding units)
MAX_ROUNDS = 1000
THESIS_ALPHA = 2.0          # the thesis's worked example (σ = 0.2, T = 10^4, α = 2, Δ = 3840 -> 36 864)
EMBEDDING_DIM = 512


# -- checks -------------------------------------------------------------------------------------------------------
def check_parameters(clip_radius: float, sigma: float | None, delta: float, rounds: int) -> None:
    """Raise ValueError naming the parameter for C <= 0, sigma <= 0, delta outside (0, 1), rounds outside 1..MAX."""
    if not (isinstance(clip_radius, (int, float)) and math.isfinite(clip_radius) and clip_radius > 0):
        raise ValueError(f"clip radius C must be a finite number > 0 (the sensitivity is 2C); got {clip_radius}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise sigma must be a finite number > 0 (sigma = 0 releases the identity itself); "
                         f"got {sigma}")
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must lie strictly between 0 and 1 (typically 1e-5 or below, far under 1/number of "
                         f"people); got {delta}")
    if int(rounds) != rounds or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds T must be a whole number from 1 to {MAX_ROUNDS} (T = 1: one noised release); "
                         f"got {rounds}")


# -- the mechanism ------------------------------------------------------------------------------------------------
def clip_to_ball(x: torch.Tensor, clip_radius: float) -> torch.Tensor:
    """Each row scaled into the L2 ball of radius C (rows already inside are unchanged)."""
    if x.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(x.shape)}")
    norm = x.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip_radius / norm.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)
    return x * scale


def release(embedding: torch.Tensor, clip_radius: float, sigma: float, generator: torch.Generator,
            renormalize: bool = True) -> torch.Tensor:
    """One round of the Gaussian mechanism: clip_C(x) + N(0, sigma^2 I), then optionally onto the unit sphere.

    ``embedding`` (N, D); the noise is drawn in float64 on the CPU from ``generator`` (a fixed seed gives the same
    release on any machine). Returns float32 (N, D).
    """
    check_parameters(clip_radius, sigma, 0.5, 1)
    x = embedding.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("the face embedding holds NaN or infinity")
    z = clip_to_ball(x, clip_radius) + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    if renormalize:
        z = torch.nn.functional.normalize(z, dim=1)
    return z.float()


SECRET_SEED = 0  # noise_seed 0: fresh noise from the OS's entropy, never stored anywhere


def seeded(seed: int, round_index: int = 0) -> torch.Generator:
    """The noise generator of round ``round_index`` (0-based).

    ``seed`` 0 (:data:`SECRET_SEED`): seeded from ``secrets`` (OS entropy), known to nobody: the only private
    choice. Any other seed is reproducible, for tests and comparisons: whoever knows it (it is a widget value, so
    it travels in the workflow JSON) regenerates the noise and subtracts it, and the release is not private.
    """
    if int(seed) == SECRET_SEED:
        import secrets
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed((int(seed) + 1_000_003 * int(round_index)) % (2 ** 63))


def noise_source(seed: int) -> str:
    return ("secret: fresh from the OS's entropy, not stored" if int(seed) == SECRET_SEED else
            f"fixed seed {int(seed)}: reproducible, so NOT private (the seed travels in the workflow; whoever has "
            f"it regenerates the noise and removes it)")


# -- the analytic Gaussian mechanism, closed form (Balle & Wang 2018, Theorem 8) -------------------------------------
def _log_phi(x: float) -> float:
    """log Φ(x) for the standard normal CDF, accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # asymptotic series of Mills' ratio: Φ(x) ~ φ(x)/|x| * (1 - 1/x² + 3/x⁴ - 15/x⁶)
    x2 = x * x
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x2 + 3 / x2 ** 2 - 15 / x2 ** 3)


def analytic_gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with μ = Δ/σ: Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ) (exact, tight)."""
    a = math.exp(_log_phi(mu / 2 - epsilon / mu))
    b = math.exp(epsilon + _log_phi(-mu / 2 - epsilon / mu))
    return max(a - b, 0.0)


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float, rounds: int = 1) -> float:
    """The smallest ε with (ε, δ)-DP for ``rounds`` composed Gaussian releases of L2 sensitivity Δ at noise σ.

    Closed form, independent of dp-accounting: T Gaussian mechanisms compose exactly to one with μ = √T·Δ/σ;
    ε solves δ(ε; μ) = δ by bisection (δ(ε) falls monotonically in ε).
    """
    mu = math.sqrt(rounds) * sensitivity / sigma
    if analytic_gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(hi, mu) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e9:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return hi


# -- the accountant (dp-accounting) -----------------------------------------------------------------------------------
def epsilon_accountant(sigma: float, sensitivity: float, delta: float, rounds: int = 1) -> float:
    """ε from dp-accounting's analytic Gaussian mechanism for T composed rounds (noise multiplier σ/(Δ√T))."""
    import dp_accounting
    return float(dp_accounting.get_epsilon_gaussian(sigma / (sensitivity * math.sqrt(rounds)), delta))


def epsilon_pld(sigma: float, sensitivity: float, delta: float, rounds: int = 1) -> float:
    """ε from dp-accounting's privacy-loss-distribution accountant (T self-composed Gaussian events).

    Exact up to its discretisation, and slow for large ε·T (seconds for T = 10 at ε ≈ 46): used as a check.
    """
    import dp_accounting
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / sensitivity), int(rounds)))
    return float(acc.get_epsilon(delta))


def epsilon_rdp(sigma: float, sensitivity: float, delta: float, rounds: int = 1) -> float:
    """ε from dp-accounting's RDP accountant (Rényi orders, converted to (ε, δ)): a valid, looser second line."""
    import dp_accounting
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / sensitivity), int(rounds)))
    return float(acc.get_epsilon(delta))


def sigma_for_epsilon(target_epsilon: float, delta: float, clip_radius: float, rounds: int = 1) -> float:
    """The noise σ at which T rounds reach exactly (target ε, δ) (dp-accounting's analytic Gaussian, inverted).

    Raises ValueError when no σ in :data:`SIGMA_RANGE` reaches the target.
    """
    check_parameters(clip_radius, None, delta, rounds)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be a finite number > 0; got {target_epsilon}")
    import dp_accounting
    sensitivity = 2.0 * clip_radius
    sigma = float(dp_accounting.get_sigma_gaussian(target_epsilon, delta)) * sensitivity * math.sqrt(rounds)
    lo, hi = SIGMA_RANGE
    if not lo <= sigma <= hi:
        eps_at = [epsilon_accountant(s, sensitivity, delta, rounds) for s in (hi, lo)]
        raise ValueError(f"target epsilon {target_epsilon:g} (delta {delta:g}, C {clip_radius:g}, T {rounds}) is "
                         f"unreachable: it needs sigma = {sigma:.4g}, outside the allowed {lo:g}..{hi:g}, where "
                         f"epsilon runs from {eps_at[0]:.4g} to {eps_at[1]:.4g}. Choose a target in that range.")
    return sigma


# -- the thesis's bound (Theorem 4.4.1), labelled as such --------------------------------------------------------------
def thesis_rdp_bound(sensitivity: float, sigma: float, rounds: int, alpha: float = THESIS_ALPHA) -> float:
    """αΔ²/(2Tσ²): the thesis's RDP ε at order α (amplification by iteration; assumes contractive rounds)."""
    return alpha * sensitivity ** 2 / (2.0 * rounds * sigma ** 2)


def thesis_dp_bound(sensitivity: float, sigma: float, rounds: int, delta: float, alpha: float = THESIS_ALPHA) -> float:
    """The thesis's (ε, δ) conversion: αΔ²/(2Tσ²) + log(1/δ)/(α − 1)."""
    if alpha <= 1:
        raise ValueError(f"the Rényi order alpha must be > 1; got {alpha}")
    return thesis_rdp_bound(sensitivity, sigma, rounds, alpha) + math.log(1.0 / delta) / (alpha - 1.0)


def expected_cosine(norm: float, sigma: float, dim: int = EMBEDDING_DIM) -> float:
    """≈ cosine between a released embedding and the clipped original of L2 norm ``norm``: r / √(r² + dσ²)."""
    return norm / math.sqrt(norm ** 2 + dim * sigma ** 2)


@dataclass
class DPReport:
    """Everything the node shows and the label carries."""
    clip_radius: float
    sensitivity: float
    sigma: float
    delta: float
    rounds: int
    renormalize: bool
    epsilon: float               # T rounds composed, dp-accounting analytic Gaussian (exact for Gaussian rounds)
    epsilon_first_round: float   # one round: bounds a strict render's final image (post-processing of round 1)
    epsilon_rdp: float           # T rounds, dp-accounting RDP accountant (second line)
    epsilon_closed_form: float   # T rounds, this module's own closed form (independent check of ``epsilon``)
    thesis_alpha: float
    thesis_rdp_epsilon: float    # αΔ²/(2Tσ²)
    thesis_dp_epsilon: float     # + log(1/δ)/(α−1)
    expected_cosine: float
    sigma_from_target: float | None = None
    noise: str = "secret: fresh from the OS's entropy, not stored"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def text(self) -> str:
        lines = [
            f"(ε, δ) = ({self.epsilon:.4g}, {self.delta:.3g}) for the {self.rounds} noised identity embedding(s) "
            f"released in {self.rounds} round(s): dp-accounting, analytic Gaussian, composition over T rounds",
            f"  RDP accountant (second line): ε = {self.epsilon_rdp:.4g}",
        ]
        if self.rounds > 1:
            lines.append(f"  strict render's final image alone: ε = {self.epsilon_first_round:.4g} (rounds 2..T only "
                         f"see round 1's output: post-processing)")
        lines += [
            f"  mechanism: clip to L2 radius C = {self.clip_radius:g} (sensitivity Δ = 2C = {self.sensitivity:g}), "
            f"Gaussian noise σ = {self.sigma:.4g} per coordinate"
            + (" (solved from the target ε)" if self.sigma_from_target is not None else "")
            + (", renormalised to the unit sphere" if self.renormalize else ""),
            f"  noise: {self.noise}",
            f"  expected cosine of a released embedding to the original ≈ {self.expected_cosine:.3f} "
            f"(512-d: at any useful ε the released identity is essentially random)",
            f"  thesis's own bound, Thm 4.4.1 (amplification by iteration, assumes contractive render→re-embed "
            f"rounds; not shown, not used): ε_RDP(α={self.thesis_alpha:g}) = αΔ²/(2Tσ²) = "
            f"{self.thesis_rdp_epsilon:.4g}; as (ε, δ): {self.thesis_dp_epsilon:.4g}",
        ]
        return "\n".join(lines)


def account(clip_radius: float, sigma: float | None, delta: float, rounds: int = 1, renormalize: bool = True,
            target_epsilon: float | None = None, alpha: float = THESIS_ALPHA, seed: int = SECRET_SEED) -> DPReport:
    """The ε report for given (C, σ, δ, T), or with σ solved from ``target_epsilon`` when σ is None."""
    if sigma is None:
        if target_epsilon is None:
            raise ValueError("give sigma or a target epsilon")
        sigma = sigma_for_epsilon(target_epsilon, delta, clip_radius, rounds)
        solved = sigma
    else:
        solved = None
    check_parameters(clip_radius, sigma, delta, rounds)
    sens = 2.0 * clip_radius
    return DPReport(
        clip_radius=float(clip_radius), sensitivity=sens, sigma=float(sigma), delta=float(delta), rounds=int(rounds),
        renormalize=bool(renormalize),
        epsilon=epsilon_accountant(sigma, sens, delta, rounds),
        epsilon_first_round=epsilon_accountant(sigma, sens, delta, 1),
        epsilon_rdp=epsilon_rdp(sigma, sens, delta, rounds),
        epsilon_closed_form=analytic_gaussian_epsilon(sigma, sens, delta, rounds),
        thesis_alpha=alpha, thesis_rdp_epsilon=thesis_rdp_bound(sens, sigma, rounds, alpha),
        thesis_dp_epsilon=thesis_dp_bound(sens, sigma, rounds, delta, alpha),
        expected_cosine=expected_cosine(min(1.0, clip_radius), sigma), sigma_from_target=solved,
        noise=noise_source(seed))


# -- the release label that travels with every output --------------------------------------------------------------
STRICT, IN_PHOTO = "strict", "in the photo"
RENDER_MODES = (STRICT, IN_PHOTO)


def provenance_leaks(provenance: dict | None) -> list[str]:
    """What, in the record of what went into a render, can carry the original besides the noised embedding.

    ``provenance`` (made by :func:`methods.dp_render.inputs_provenance`): ``photo_read`` (bool), ``model`` and
    ``clip`` (lists of what they carry beyond the checkpoint as loaded), ``conditioning`` ("built" when the renderer
    encoded the prompt text itself). None: nothing was recorded, so nothing can be claimed.
    """
    if provenance is None:
        return ["no record of the render's inputs: nothing was checked"]
    leaks = []
    if provenance.get("photo_read", True):
        leaks.append("the original photo was read (its pixels outside the embedding reach the image)")
    leaks += [f"MODEL carries {what}" for what in provenance.get("model", ["unknown additions"])]
    leaks += [f"CLIP carries {what}" for what in provenance.get("clip", ["unknown additions"])]
    if provenance.get("conditioning") != "built":
        leaks.append("the conditioning was connected from outside, not encoded from the prompt text by the renderer")
    return leaks


def release_label(report: DPReport | dict, mode: str, provenance: dict | None = None) -> dict:
    """What is, and is not, private about an output: the node's output string, the sidecar JSON, the report.

    The DP claim is computed from ``provenance`` (what actually went into the render, see :func:`provenance_leaks`),
    never asserted from the mode: a strict render is labelled differentially private only when the photo was not
    read, the MODEL and CLIP carried nothing beyond the checkpoint as loaded, the conditioning was encoded from the
    prompt text by the renderer, and the noise was secret.
    """
    if mode not in RENDER_MODES:
        raise ValueError(f"render mode must be one of {RENDER_MODES}; got {mode!r}")
    r = report.to_dict() if isinstance(report, DPReport) else dict(report)
    secret = str(r.get("noise", "")).startswith("secret")
    leaks = provenance_leaks(provenance)
    if mode == STRICT and leaks:
        eps = r["epsilon_first_round"] if r["rounds"] > 1 else r["epsilon"]
        statement = ("strict rendering whose inputs can carry the original besides the noised embedding: NOT "
                     "differentially private (" + "; ".join(leaks) + ").")
        dp = False
    elif mode == STRICT and not secret:
        eps = r["epsilon_first_round"] if r["rounds"] > 1 else r["epsilon"]
        statement = ("strict rendering with a FIXED noise seed: NOT private. The seed is stored with the workflow; "
                     "whoever has it regenerates the noise and recovers the clipped identity embedding. Use noise "
                     "seed 0 (fresh secret noise) for a release; fixed seeds are for tests and comparisons.")
        dp = False
    elif mode == STRICT:
        eps = r["epsilon_first_round"] if r["rounds"] > 1 else r["epsilon"]
        statement = (f"strict: differentially private identity release, (ε, δ) = ({eps:.4g}, {r['delta']:.3g}). "
                     f"The image depends on the original only through the noised identity embedding: it was "
                     f"generated from fresh noise, the photo was not read, the MODEL and CLIP carried nothing beyond "
                     f"the checkpoint as loaded, and the conditioning was encoded here from the prompt text (recorded "
                     f"in 'inputs'; the statement assumes that text does not describe the original). ε bounds what "
                     f"the image reveals about which face went in, for any two faces.")
        dp = True
    else:
        eps = r["epsilon"]
        statement = ("in the photo: NOT differentially private. Pose, background, hair, light and everything "
                     "outside the face come from the original photo, which identifies the person by themselves; "
                     f"only the identity embedding fed to the face region is noised ((ε, δ) = ({eps:.4g}, "
                     f"{r['delta']:.3g}) for that embedding alone).")
        dp = False
    reasons = [] if dp else leaks + ([] if secret else ["a fixed noise seed (stored with the workflow)"]) + (
        [] if mode == STRICT else ["in the photo: the rest of the image comes from the original photo"])
    return {"release": mode, "differentially_private": dp, "statement": statement, "epsilon": eps,
            "delta": r["delta"], "mechanism": r, "inputs": provenance, "not_private_because": reasons}


def label_text(label: dict) -> str:
    import json
    return json.dumps(label, indent=1, ensure_ascii=False)


# -- the thesis's iterated form ----------------------------------------------------------------------------------------
def iterate(first_release: torch.Tensor, rounds: int, clip_radius: float, sigma: float, seed: int,
            render, embed, renormalize: bool = True, progress=None):
    """Rounds 2..T of Alg. 6: render the previous round's noised embedding, re-embed the rendered face, noise again.

    ``first_release`` is round 1's output z_1 (N, D) (from :func:`release` with ``seeded(seed, 0)``); ``render(z,
    t)`` -> images, ``embed(images, t)`` -> (N, D) embeddings (raising the no-face error when a render has no
    face). Returns (z_T, [cosine of z_t to z_1 for t = 1..T]); the caller renders z_T for the final image.
    ``progress`` gets a :class:`~.progress.Step` after each round (``detail["cosine"]``: the trace so far).
    """
    from .progress import report
    check_parameters(clip_radius, sigma, 0.5, rounds)
    z, trace = first_release, [1.0]
    for t in range(1, rounds):
        images = render(z, t)
        e = embed(images, t)
        z = release(e, clip_radius, sigma, seeded(seed, t), renormalize)
        trace.append(float(torch.nn.functional.cosine_similarity(z, first_release, dim=1).mean()))
        report(progress, t + 1, rounds, f"round {t + 1} of {rounds}", cosine=list(trace))
    return z, trace
