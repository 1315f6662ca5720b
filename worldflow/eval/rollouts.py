"""``worldflow eval``: held-out open-loop rollouts scored per horizon, tokenizer reconstruction, plots.

Protocol: condition on C context frames of held-out episodes, roll out H frames (H = the largest of
``--horizons``) with the true actions, decode, and compare with the real frames (context excluded).
Baselines: repeating the last context frame, and the same rollout with actions shuffled across the batch
(action sensitivity). Every clip is scored in one batch, frame by frame, through the dynamics model's
bounded KV cache and the tokenizer's streaming decode cache: per horizon step only that frame's scores
and features are accumulated, so memory does not grow with H (horizons of 1000 frames and more).

**Past the truth.** A clip is a window of min(C + H, W) frames, W the longest that at least half the
held-out episodes hold (``truth_window``: longer windows would leave only the longest episode to score),
and no longer than C + the largest requested horizon that fits in it (``clip_window``: longer windows
pin every clip to its episode's start);
its true actions are used as far as the window goes, later frames get masked actions (the unlabeled
path), so any horizon can be rolled out. PSNR, SSIM and object accuracy need the real frame, so for
horizons beyond the window (``truth_horizon`` = window − C; e.g. action-free video whose episodes end)
they are null, while the Fréchet distance, which needs no frame-by-frame truth, is still reported.

**Fréchet distance** (Heusel et al. 2017; :func:`worldflow.eval.metrics.frechet_distance`). Features of a
frame: the run's own tokenizer encoder applied to that frame alone (a one-frame clip, as every training
clip starts), its latents (N_l, D_b) mean-pooled over the tokens and concatenated with their standard
deviation over the tokens: 2·D_b numbers. Generated frames are *decoded* and re-encoded, so real and
generated frames pass through exactly the same function (pixels -> encoder -> pool); comparing the
generated latents directly would score latents the decoder may render identically, and would put the
real frames (encoded by a causal encoder with history) and the generated ones on different footings.
Pooling keeps the dimension small enough for a covariance from a few hundred samples; no pretrained
network (Inception, I3D) is needed, so it runs offline. The value for horizon h is over the generated
frames of every clip in the window (previous requested horizon, h], against a reference of real frames.
The held-out episodes are split by episode into two halves A and B (alternately, in id order); the
reference is every frame of half B. **Estimator bias:** a Fréchet estimate from n samples is biased
upwards by roughly O(D/n), so the floor is matched in sample count: ``frechet_real_floor`` is a map keyed
by horizon whose value is the distance from n_h frames of half A (random subsets without replacement,
mean over 4 draws) to the same reference, n_h being the window's generated sample count
(``frechet_samples``; capped at half A's frame count, where the floor's sample is then smaller). Where
the window holds more frames than half A, ``frechet_matched`` is the model's distance from a uniform
subsample of the window's frames as large as the floor's (a reservoir, constant memory): compare it,
not ``frechet``, with the floor there (at equal counts the two keys are equal). The floor is
what a model whose frames were real frames of other episodes would score; note that the evaluated clips
may start in half-B episodes, which can only flatter the model. With fewer than two held-out episodes the
reference is every held-out frame and the floor is null.

JSON keys (a public contract): ``psnr``, ``ssim`` (maps horizon -> mean over clips, null past the truth),
``psnr_pooled`` (map horizon -> PSNR of the mean MSE over the clips: exact repeats, 100 dB each under
``psnr``, cannot dominate it; also inside both baselines, and as ``tokenizer_ceiling_pooled``),
``baseline_copy_last`` and ``shuffled_actions`` (each {"psnr": map, "ssim": map}; ``shuffled_actions`` is
null for an action-free run: no actions to shuffle), ``frechet`` (map horizon -> Fréchet distance of the
window ending there), ``frechet_real_floor`` (map horizon -> the matched real-vs-real floor, or null),
``tokenizer_ceiling`` (map horizon -> PSNR of the true future latents decoded after the context, null
past the truth: the best any dynamics model could decode to), ``frechet_samples`` (map horizon ->
generated frames in the window), ``frechet_matched`` (map horizon ->
the window's distance at the floor's sample count), ``truth_horizon``, ``steps``,
``frames_per_second`` (generated and decoded frames per second), optional ``steps_sweep`` (map K -> mean
PSNR over the requested horizons that have truth), ``lpips`` and ``fvd`` (null: absent unless their
weights are configured locally), ``context``, ``clips``; ``--tokenizer-only`` writes ``recon_psnr`` and
``recon_ssim``; ``--env ID --episodes N`` writes ``policy_return``, ``random_return``, ``expert_return``
(where the env has an expert) and ``bc_return`` (where a BC policy exists), each the mean over the
episodes.

For envs whose sprites can be read off the pixels (Catch, see worldflow.envs.object_reader) it adds
``objects`` ({object: map horizon -> fraction of clips whose predicted object cells equal the true ones},
also inside both baselines) and, with a sweep, ``steps_sweep_objects`` (map K -> {object: mean accuracy
over the horizons}).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from worldflow import flow, rng
from worldflow.argtypes import nonneg_int, positive_int, power_of_two
from worldflow.config import Config
from worldflow.data.clips import ClipBank, fixed_windows
from worldflow.data.dataset import select_episodes
from worldflow.data.episodes import load_manifest
from worldflow.dynamics.model import DynamicsModel
from worldflow.dynamics.rollout import rollout_stream
from worldflow.errors import InputError
from worldflow.eval.metrics import (
    FrameChecker,
    GaussianMoments,
    ObjectReader,
    Reservoir,
    object_match,
    pooled_psnr,
    psnr,
    spearman,
    ssim,
)
from worldflow.eval.visual import comparison_video, plot_curves, write_media
from worldflow.io import atomic_write_text
from worldflow.tokenizer.model import CausalTokenizer

DEFAULT_HORIZONS = (1, 2, 4, 8, 16, 32, 64)
VIDEO_FRAMES = 64  # predicted frames of eval's comparison video (kept in memory: bounded, not H)
VIDEO_CLIPS = 4  # clips in it
FLOOR_DRAWS = 4  # random real subsets averaged into each frechet_real_floor value


def decode_rollout(tok: CausalTokenizer, context_latents: torch.Tensor, pred_latents: torch.Tensor
                   ) -> torch.Tensor:
    """Decode predicted latents (B, H, N, D) after their context (B, C, N, D) -> frames (B, H, ...) in [0,1].

    The decoder is causal in time, so predicted frames are decoded with the context in front of them.
    """
    z = torch.cat([context_latents, pred_latents], dim=1)
    return tok.decode(z)[:, context_latents.shape[1]:]


@torch.no_grad()
def decoded_stream(tok: CausalTokenizer, context_latents: torch.Tensor, latents: Iterator[torch.Tensor]
                   ) -> Iterator[torch.Tensor]:
    """Frames (B, H, W, 3) in [0, 1], one per streamed latent (B, 1, N, D), decoded through a bounded
    decode cache (``tok.new_decode_cache``) after the context latents (B, C, N, D): the decoder is causal,
    so each frame sees the same past as :func:`decode_rollout` gives it, in constant memory."""
    cache = tok.new_decode_cache(context_latents.shape[0])
    if context_latents.shape[1]:
        tok.decode(context_latents, cache)
    for z in latents:
        yield tok.decode(z, cache)[:, 0]


@torch.no_grad()
def frame_features(tok: CausalTokenizer, frames: torch.Tensor) -> torch.Tensor:
    """Fréchet features of frames (B, H, W, 3), uint8 or float [0, 1] -> (B, 2·D_b): each frame encoded
    alone, its latents' mean and standard deviation over the N_l tokens (see the module docstring)."""
    z = tok.encode(frames[:, None])[:, 0].float()  # (B, N_l, D_b)
    return torch.cat([z.mean(1), z.std(1, unbiased=False)], dim=-1)


@dataclass
class Scores:
    """What one scoring pass accumulates: means over clips at the requested horizons (None past the
    truth), Fréchet moments per horizon window, the kept video frames and the generation time."""

    psnr: dict[int, float | None]
    ssim: dict[int, float | None]
    objects: dict[str, dict[int, float | None]] | None = None
    validity: dict[int, float | None] | None = None  # share of clips whose frame at h is a valid frame
    psnr_pooled: dict[int, float | None] | None = None  # PSNR of the mean MSE over clips (pooled_psnr)
    moments: dict[int, GaussianMoments] | None = None
    samples: dict[int, Reservoir] | None = None  # per window, a uniform subsample of its features
    video: torch.Tensor | None = None  # (VIDEO_CLIPS, T, H, W, 3) float [0, 1], T <= VIDEO_FRAMES
    seconds: float = 0.0
    frames: int = 0

    def __post_init__(self) -> None:
        if self.psnr_pooled is None:  # keyed like psnr, null until scored
            self.psnr_pooled = {h: None for h in self.psnr}

    def metrics(self) -> dict[str, Any]:
        """The JSON part: {"psnr": map, "psnr_pooled": map, "ssim": map[, "objects": {object: map}]}."""
        out: dict[str, Any] = {"psnr": self.psnr, "psnr_pooled": self.psnr_pooled, "ssim": self.ssim}
        if self.objects is not None:
            out["objects"] = self.objects
        if self.validity is not None:
            out["validity"] = self.validity
        return out


def truth_window(lengths: torch.Tensor, context: int) -> int:
    """The longest clip window (frames) that at least half of the held-out episodes hold (and never
    shorter than ``context`` + 1 where one episode allows it). Windows of the longest episode's length
    would leave only that episode eligible, and every scored clip would be the same clip."""
    ranked = sorted((int(n) for n in lengths), reverse=True)
    half = ranked[(len(ranked) - 1) // 2]  # the length at least ceil(E / 2) episodes reach
    return max(half, min(context + 1, ranked[0]))


def clip_window(lengths: torch.Tensor, context: int, horizon: int, scored: Sequence[int] | None = None
                ) -> int:
    """Frames per scored clip: C + H capped at :func:`truth_window`, and no longer than the largest
    ``scored`` horizon that fits needs. A window longer than the scores need pins every clip to the start
    of its episode (one window per episode): on Catch, where each ball falls for 8 frames, all 32 clips
    then had their respawn at the same horizon and the per-horizon scores came out phase-locked."""
    full = min(context + horizon, truth_window(lengths, context))
    fits = [h for h in (scored or ()) if context + h <= full]
    return context + max(fits) if fits else full


@dataclass(frozen=True)
class FrechetScores:
    """Per horizon window (maps keyed by the requested horizon ending it):

    - ``distance``: the Fréchet distance of all the window's generated frames to the reference (``frechet``);
    - ``floor``: real-vs-real, half A to the reference, at min(window samples, half A's frames) samples
      (``frechet_real_floor``; None with fewer than 2 held-out episodes);
    - ``samples``: the window's generated frames (``frechet_samples``);
    - ``matched``: the distance of a uniform subsample of the window's frames, as many as half A holds
      (``frechet_matched``): equal to ``distance`` where the window is no larger, and the like-for-like
      comparison with ``floor`` where it is (the estimate's upward bias depends on the sample count).
    """

    distance: dict[int, float | None]
    floor: dict[int, float | None] | None
    samples: dict[int, int]
    matched: dict[int, float | None]


class RolloutEvaluator:
    """Scores open-loop rollouts on a fixed set of held-out clips (same clips at every call).

    ``bank``: held-out episodes with ``latents`` and ``frames`` (see :func:`with_frames`). Clips are
    windows of min(context + horizon, :func:`truth_window`) frames; see the module docstring for horizons past
    them. Nothing of size horizon × frame is held: frames are fetched from the bank one step at a time.
    """

    def __init__(self, tok: CausalTokenizer, bank: ClipBank, cfg: Config, device: torch.device,
                 context: int, horizon: int, clips: int = 32, seed: int = 0,
                 reader: ObjectReader | None = None, checker: FrameChecker | None = None,
                 scored: Sequence[int] | None = None):
        self.tok, self.cfg, self.device, self.reader = tok, cfg, device, reader
        self.checker = checker  # frames -> bool per frame: a frame the env can show (validity)
        self.bank, self.context, self.horizon, self.seed = bank, context, horizon, seed
        self.window = clip_window(bank.lengths, context, horizon, scored)
        self.truth_horizon = self.window - context  # horizons 1..truth_horizon have a real frame
        self.eps, self.starts = fixed_windows(bank.lengths, clips, self.window)
        self.context_latents = self._gather("latents", 0, context).to(device)  # (B, C, N, D)
        self.actions = self._gather("actions", 0, self.window).to(device)  # (B, W, ...) dataset-aligned
        self.action_mask = self._gather("action_mask", 0, self.window).to(device)  # (B, W)
        self._real_features: list[torch.Tensor] | None = None

    @property
    def clips(self) -> int:
        return len(self.eps)

    def _gather(self, key: str, lo: int, hi: int, clips: int | None = None) -> torch.Tensor:
        """Window offsets lo..hi-1 of ``key`` for the first ``clips`` clips, (B, hi - lo, ...)."""
        pairs = list(zip(self.eps, self.starts))[:clips]
        return torch.stack([self.bank.episodes[e][key][s + lo : s + hi] for e, s in pairs])

    def truth_at(self, h: int, clips: int | None = None) -> torch.Tensor:
        """Real frames (B, H, W, 3) uint8 at horizon h (1-based, h <= truth_horizon)."""
        return self._gather("frames", self.context + h - 1, self.context + h, clips)[:, 0].to(self.device)

    def real_frames(self, frames: int, clips: int) -> torch.Tensor:
        """The first ``frames`` frames (context included) of the first ``clips`` clips, uint8 (B, T, H, W, 3);
        black past the truth."""
        have = self._gather("frames", 0, min(frames, self.window), clips)
        pad = have.new_zeros((have.shape[0], frames - have.shape[1], *have.shape[2:]))
        return torch.cat([have, pad], dim=1)

    def stream(self, model, steps: int, shuffle_actions: bool = False, seed: int | None = None
               ) -> Iterator[torch.Tensor]:
        """Predicted frames (B, H, W, 3) in [0, 1] for horizons 1, 2, ..., ``self.horizon``, every clip in
        one batch, with the true actions (masked past the window) or, ``shuffle_actions``, another clip's.
        ``seed`` (default the evaluator's): the sampling noise; the same seed gives the same rollout."""
        actions, mask = self.actions, self.action_mask
        if shuffle_actions:  # a fixed derangement across the batch: every clip gets another clip's actions
            perm = torch.roll(torch.arange(actions.shape[0], device=actions.device), 1)
            actions, mask = actions[perm], mask[perm]
        gen = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        latents = rollout_stream(model, self.context_latents, actions, self.horizon, steps, generator=gen,
                                 action_mask=mask)
        return decoded_stream(self.tok, self.context_latents, latents)

    @torch.no_grad()
    def predict(self, model, steps: int, shuffle_actions: bool = False) -> torch.Tensor:
        """All predicted frames (B, H, H_px, W_px, 3) in [0, 1]: short horizons only (it holds them all)."""
        return torch.stack(list(self.stream(model, steps, shuffle_actions)), dim=1)

    @torch.no_grad()
    def score(self, model, steps: int, horizons: Sequence[int], shuffle_actions: bool = False,
              frechet: bool = False, video: int = 0, progress: bool = False) -> Scores:
        """One pass over horizons 1..H: PSNR/SSIM (and object accuracy) means over clips at each requested
        horizon that has truth; with ``frechet``, Gaussian moments of the generated frames' features per
        window (previous requested horizon, h]; the first ``video`` frames of the first VIDEO_CLIPS clips.
        Memory is constant in H (moments are O(D^2) per window)."""
        hs = sorted(set(horizons))
        out = Scores({h: None for h in hs}, {h: None for h in hs},
                     objects=None if self.reader is None else {},
                     validity=None if self.checker is None else {h: None for h in hs})
        dim = 2 * self.tok.cfg.latent_dim
        moments = {h: GaussianMoments(dim) for h in hs} if frechet else None
        # a subsample the size of the floor's real sample: the like-for-like distance (frechet_matched)
        gen = torch.Generator().manual_seed(self.seed + 1)
        samples = {h: Reservoir(max(2, self.floor_frames()), dim, gen) for h in hs} if frechet else None
        kept = []
        frames = self.stream(model, steps, shuffle_actions)
        bar = tqdm(range(1, self.horizon + 1), desc=f"rollout K={steps}", disable=not progress, leave=False)
        for h in bar:
            t0 = time.perf_counter()
            pred = next(frames)
            out.seconds += time.perf_counter() - t0
            out.frames += pred.shape[0]
            if h in out.psnr and h <= self.truth_horizon:
                self._score_step(out, h, pred, self.truth_at(h))
            if out.validity is not None and h in out.validity:  # needs no truth: every horizon
                out.validity[h] = float(self.checker(pred.cpu().numpy()).mean())
            if moments is not None and h <= hs[-1]:  # into the window (previous horizon, next horizon]
                feats, window = frame_features(self.tok, pred), hs[bisect.bisect_left(hs, h)]
                moments[window].add(feats)
                samples[window].add(feats)
            if h <= video:
                kept.append(pred[:VIDEO_CLIPS].cpu())
        out.moments, out.samples = moments, samples
        if kept:
            out.video = torch.stack(kept, dim=1)
        return out

    def _score_step(self, out: Scores, h: int, pred: torch.Tensor, truth: torch.Tensor) -> None:
        """Record the clip means at horizon h: pred (B, H, W, 3) float, truth uint8."""
        out.psnr[h] = float(psnr(pred, truth).mean())
        out.psnr_pooled[h] = pooled_psnr(pred, truth)
        out.ssim[h] = float(ssim(pred, truth).mean())
        if self.reader is not None:
            match = object_match(self.reader(pred.cpu().numpy()), self.reader(truth.cpu().numpy()), lead=1)
            for k, m in match.items():
                out.objects.setdefault(k, {g: None for g in out.psnr})[h] = float(m.mean())

    @torch.no_grad()
    def uncertainty(self, model, steps: int, horizons: Sequence[int], samples: int = 3) -> dict[str, Any]:
        """Two hallucination signals per generated frame, and how well each ranks the frame's real error.

        - ``sample_spread``: the rollout at the evaluator's seed and ``samples − 1`` more from the same
          context (other seeds), the per-pixel standard deviation across them, averaged over the frame;
        - ``step_disagreement``: the mean squared difference between the rollout at K = ``steps`` and the
          same-seed rollout at 2K (None where 2K exceeds K_max).

        Each is a map horizon → mean over clips, for the requested horizons up to ``truth_horizon``
        (null beyond). ``spearman_vs_error``: per signal, Spearman's rank correlation between the signal
        and the scored rollout's real per-frame MSE over every (clip, horizon ≤ truth_horizon) pair.
        Costs ``samples`` + 1 extra rollouts of that length (the 2K one at twice the calls).
        """
        if samples < 2:
            raise InputError(f"uncertainty needs at least 2 samples, got {samples}")
        hs = sorted(set(horizons))
        last = min(hs[-1], self.truth_horizon)
        main = self.stream(model, steps)
        others = [self.stream(model, steps, seed=self.seed + 1 + i) for i in range(samples - 1)]
        fine = self.stream(model, 2 * steps) if 2 * steps <= model.cfg.k_max else None
        out = {"sample_spread": {h: None for h in hs}, "step_disagreement": {h: None for h in hs}}
        per_frame: dict[str, list[torch.Tensor]] = {"sample_spread": [], "step_disagreement": [], "error": []}
        for h in range(1, last + 1):
            pred = next(main)
            spread = torch.stack([pred, *(next(o) for o in others)]).std(0).mean((-1, -2, -3))  # (B,)
            per_frame["sample_spread"].append(spread.cpu())
            if fine is not None:
                per_frame["step_disagreement"].append(((pred - next(fine)) ** 2).mean((-1, -2, -3)).cpu())
            truth = self.truth_at(h).float() / 255.0
            per_frame["error"].append(((pred - truth) ** 2).mean((-1, -2, -3)).cpu())
            if h in out["sample_spread"]:
                for key in ("sample_spread", "step_disagreement"):
                    if per_frame[key]:
                        out[key][h] = float(per_frame[key][-1].mean())
        error = torch.cat(per_frame["error"]) if per_frame["error"] else torch.empty(0)
        out["spearman_vs_error"] = {
            key: spearman(torch.cat(per_frame[key]), error) if per_frame[key] else None
            for key in ("sample_spread", "step_disagreement")}
        out["samples"], out["steps"] = samples, [steps, 2 * steps if fine is not None else None]
        return out

    @torch.no_grad()
    def ceiling(self, horizons: Sequence[int]) -> Scores:
        """The tokenizer's ceiling: the *true* future latents decoded after the context, scored like a
        rollout at the requested horizons that have truth. No dynamics model can decode to better frames
        than these (up to sampling luck), so a ceiling below copy-last caps the whole world model below
        copy-last whatever the dynamics learn."""
        hs = sorted(set(horizons))
        out = Scores({h: None for h in hs}, {h: None for h in hs},
                     objects=None if self.reader is None else {})
        last = min(max(hs), self.truth_horizon)
        c = self.context
        true = (self._gather("latents", c + h - 1, c + h).to(self.device) for h in range(1, last + 1))
        for h, frame in enumerate(decoded_stream(self.tok, self.context_latents, true), start=1):
            if h in out.psnr:
                self._score_step(out, h, frame, self.truth_at(h))
        return out

    def copy_last(self, horizons: Sequence[int]) -> Scores:
        """The copy-last-frame baseline at the requested horizons that have truth."""
        hs = sorted(set(horizons))
        out = Scores({h: None for h in hs}, {h: None for h in hs},
                     objects=None if self.reader is None else {})
        last = self._gather("frames", self.context - 1, self.context)[:, 0].to(self.device)
        for h in hs:
            if h <= self.truth_horizon:
                self._score_step(out, h, last.float() / 255.0, self.truth_at(h))
        return out

    # -------------------------------------------------------------------------------------- Fréchet

    def real_features(self, chunk: int = 256) -> list[torch.Tensor]:
        """Fréchet features of every frame of every held-out episode: a list of (L_i, 2·D_b), cached."""
        if self._real_features is None:
            feats = []
            for ep in self.bank.episodes:
                f = ep["frames"]
                feats.append(torch.cat([frame_features(self.tok, f[i : i + chunk].to(self.device)).cpu()
                                        for i in range(0, len(f), chunk)]))
            self._real_features = feats
        return self._real_features

    def _halves(self) -> tuple[list[int], list[int]]:
        """Held-out episode positions of half A (the floor's sample) and half B (the reference): alternate
        episodes in id order; with fewer than two episodes, A is empty and B holds every one."""
        order = sorted(range(len(self.bank.ids)), key=lambda i: self.bank.ids[i])
        return (order[0::2], order[1::2]) if len(order) >= 2 else ([], order)

    def floor_frames(self) -> int:
        """Frames in half A: the most real samples a floor value can use."""
        return int(sum(int(self.bank.lengths[i]) for i in self._halves()[0]))

    def frechet(self, scores: Scores) -> FrechetScores:
        """The Fréchet maps of a pass scored with ``frechet=True`` (see :class:`FrechetScores` and the
        module docstring for the reference, half B, and the sample-matched floor, half A). A window with
        fewer than 2 generated frames has distance None."""
        feats = self.real_features()
        a, b = self._halves()
        half_a = torch.cat([feats[i] for i in a]) if a else None
        ref = GaussianMoments.of(torch.cat([feats[i] for i in b]))
        gen = torch.Generator().manual_seed(self.seed)
        out = FrechetScores({}, {} if a else None, {}, {})
        for h, m in scores.moments.items():
            out.samples[h] = m.n
            ok = m.n >= 2 and ref.n >= 2
            out.distance[h] = m.frechet(ref) if ok else None
            kept = scores.samples[h].rows if scores.samples is not None else None
            out.matched[h] = GaussianMoments.of(kept).frechet(ref) if ok and kept is not None else None
            if a:
                n = min(m.n, len(half_a))
                subsets = [rng.randperm(len(half_a), gen)[:n] for _ in range(FLOOR_DRAWS)]
                draws = [GaussianMoments.of(half_a[i]).frechet(ref) for i in subsets] \
                    if n >= 2 and ref.n >= 2 else []
                out.floor[h] = sum(draws) / len(draws) if draws else None
        return out

    # ----------------------------------------------------------------------------------------- media

    def quick(self, model, step: int, media_dir: Path | None = None) -> dict[str, float]:
        """Mean PSNR over horizons 1..H with the configured K, against copy-last; writes a video."""
        was = model.training
        model.eval()
        hs = list(range(1, self.horizon + 1))
        res = self.score(model, self.cfg.dynamics.steps, hs, video=self.horizon if media_dir else 0)
        model.train(was)
        out = {"psnr": _mean_over(res.psnr, hs), "psnr_copy_last": _mean_over(self.copy_last(hs).psnr, hs)}
        if res.objects is not None:
            out.update({f"{k}_accuracy": _mean_over(v, hs) for k, v in res.objects.items()})
        if media_dir is not None:
            self.write_video(res.video, Path(media_dir) / f"rollout_{step:07d}")
        return out

    def write_video(self, pred: torch.Tensor, path: Path, n: int = VIDEO_CLIPS) -> None:
        """Ground truth | prediction | difference of the first ``n`` clips: pred (n', T, H, W, 3) in [0, 1]
        holds the first T predicted frames (mp4 and GIF at ``path``)."""
        n = min(n, pred.shape[0])
        truth = self.real_frames(self.context + pred.shape[1], n)
        full_pred = torch.cat([truth[:, : self.context].float() / 255.0, pred[:n].cpu()], dim=1)
        write_media(comparison_video(truth, full_pred, context=self.context), path)


def _mean_over(m: dict[int, float | None], horizons: Sequence[int]) -> float | None:
    vals = [m[h] for h in horizons if m.get(h) is not None]
    return sum(vals) / len(vals) if vals else None


def heldout_rollouts(run: str | Path, data: str | Path, context: int, horizon: int, clips: int,
                     seed: int = 0, progress: bool = True, steps: Sequence[int] = (),
                     sampler: str | None = None, scored: Sequence[int] | None = None
                     ) -> tuple[DynamicsModel, RolloutEvaluator]:
    """A run's dynamics model (eval mode) and a :class:`RolloutEvaluator` over held-out clips of ``data``.

    Any horizon is allowed (past the held-out truth the rollout continues unscored, see the module
    docstring). InputError (naming the flag) if ``context`` exceeds the frames the model was trained on or
    the longest held-out episode, or if one of the sampling ``steps`` K is finer than the model's grid
    (K > k_max). ``sampler`` (euler | heun) replaces the model's ``dynamics.sampler`` for these rollouts."""
    from worldflow.distributed import device_of
    from worldflow.run import Run, latent_bank

    r = Run(run)
    model, cfg = r.dynamics()  # the config its checkpoint was trained with
    if sampler is not None:
        flow.check_sampler(sampler)
        model.cfg = dataclasses.replace(model.cfg, sampler=sampler)  # what RolloutStream reads
    device = device_of(cfg)
    model.to(device)
    tok, _ = r.tokenizer(device)
    if context > model.cfg.context:
        raise InputError(f"--context {context} exceeds the context the model was trained for "
                         f"({model.cfg.context} frames)")
    for k in steps:
        flow.check_steps(k, cfg.dynamics.k_max, flag="--steps")
    held = select_episodes(load_manifest(data), "heldout", cfg.data.holdout_fraction)
    longest = max(int(e["num_frames"]) for e in held)  # from the manifest: fail before encoding anything
    if context > longest:
        raise InputError(f"--context {context} frames, but the longest held-out episode of {data} has "
                         f"{longest}: lower --context")
    bank = with_frames(latent_bank(run, data, cfg, "heldout", tok, progress), data, cfg, progress)
    ev = RolloutEvaluator(tok, bank, cfg, device, context=context, horizon=horizon, clips=clips, seed=seed,
                          reader=reader_of(data), checker=checker_of(data), scored=scored)
    return model, ev


def is_action_free(model: DynamicsModel) -> bool:
    """Whether the model was trained without actions (its dataset's action space is null)."""
    return model.action_encoder.space is None


def evaluate_dynamics(run: str | Path, data: str | Path, context: int, horizons: list[int], steps: int,
                      steps_sweep: list[int] | None, clips: int, out_dir: Path, progress: bool = True,
                      sampler: str | None = None, uncertainty_samples: int = 3) -> dict[str, Any]:
    """Everything ``worldflow eval`` reports for a run with a trained tokenizer and dynamics model.
    ``uncertainty_samples`` 0 leaves the hallucination signals out (``uncertainty`` null)."""
    model, ev = heldout_rollouts(run, data, context, max(horizons), clips, progress=progress,
                                 steps=[steps, *(steps_sweep or [])], sampler=sampler, scored=horizons)
    main = ev.score(model, steps, horizons, frechet=True, video=min(ev.horizon, VIDEO_FRAMES),
                    progress=progress)
    res: dict[str, Any] = {"steps": steps, "sampler": model.cfg.sampler,
                           "network_evaluations": flow.network_evaluations(steps, model.cfg.sampler),
                           "context": context, "clips": ev.clips, "truth_horizon": ev.truth_horizon}
    res.update(main.metrics())
    fr = ev.frechet(main)
    res.update(frechet=fr.distance, frechet_real_floor=fr.floor, frechet_samples=fr.samples,
               frechet_matched=fr.matched)
    res["baseline_copy_last"] = ev.copy_last(horizons).metrics()
    ceiling = ev.ceiling(horizons)
    res["tokenizer_ceiling"] = ceiling.psnr
    res["tokenizer_ceiling_pooled"] = ceiling.psnr_pooled
    res["shuffled_actions"] = None if is_action_free(model) else \
        ev.score(model, steps, horizons, shuffle_actions=True, progress=progress).metrics()
    res["frames_per_second"] = main.frames / max(main.seconds, 1e-9)
    res["uncertainty"] = ev.uncertainty(model, steps, horizons, uncertainty_samples) \
        if uncertainty_samples and ev.truth_horizon > 0 else None
    res["lpips"] = None  # absent: needs local LPIPS weights (tokenizer.lpips_path)
    res["fvd"] = None  # absent: needs local I3D weights
    if steps_sweep:
        # the same seed gives the same rollout, so K = steps is not generated a second time
        sweep = {k: main if k == steps else ev.score(model, k, horizons, frechet=True, progress=progress)
                 for k in steps_sweep}
        res["steps_sweep"] = {k: _mean_over(r.psnr, horizons) for k, r in sweep.items()}
        # the distribution per K: mean over the horizon windows of each window's Fréchet distance
        res["steps_sweep_frechet"] = {k: _mean_over(ev.frechet(r).distance, horizons)
                                      for k, r in sweep.items()}
        if ev.checker is not None:
            res["steps_sweep_validity"] = {k: _mean_over(r.validity, horizons) for k, r in sweep.items()}
        if ev.reader is not None:
            res["steps_sweep_objects"] = {k: {o: _mean_over(m, horizons) for o, m in r.objects.items()}
                                          for k, r in sweep.items()}
    ev.write_video(main.video, out_dir / "rollout")
    _plots(res, out_dir)
    return res


def reader_of(data: str | Path) -> ObjectReader | None:
    """The object reader of the dataset's env (worldflow.envs.object_reader), or None."""
    from worldflow.envs import object_reader

    return object_reader(load_manifest(data).get("env_id"))


def checker_of(data: str | Path) -> FrameChecker | None:
    """The frame-validity check of the dataset's env (worldflow.envs.frame_checker), or None."""
    from worldflow.envs import frame_checker

    return frame_checker(load_manifest(data).get("env_id"))


def with_frames(bank: ClipBank, data, cfg: Config, progress: bool) -> ClipBank:
    """Attach the real frames to a latent bank (ground truth for scoring)."""
    frames = ClipBank.load(data, cfg.data, split="heldout", progress=progress)
    by_id = dict(zip(frames.ids, frames.episodes))
    eps = [{**e, "frames": by_id[i]["frames"]} for i, e in zip(bank.ids, bank.episodes)]
    return ClipBank(eps, bank.ids)


def _known(curve: dict | None) -> dict:
    """A curve without its null points (horizons past the truth)."""
    return {k: v for k, v in (curve or {}).items() if v is not None}


def _plots(res: dict[str, Any], out_dir: Path) -> None:
    shuffled = res.get("shuffled_actions")  # null on an action-free run: nothing to plot
    for metric in ("psnr", "ssim"):
        curves = {f"model (K={res['steps']})": _known(res[metric]),
                  "copy last frame": _known(res["baseline_copy_last"][metric])}
        if shuffled is not None:
            curves["shuffled actions"] = _known(shuffled[metric])
        if metric == "psnr" and res.get("tokenizer_ceiling") is not None:
            curves["tokenizer ceiling (true latents)"] = _known(res["tokenizer_ceiling"])
        plot_curves(out_dir / f"{metric}_vs_horizon.png", curves, "horizon (frames)", metric.upper(),
                    title=f"{metric.upper()} vs horizon")
    curves = {f"model (K={res['steps']}), all window frames": _known(res["frechet"])}
    if res.get("frechet_real_floor") is not None:
        curves[f"model (K={res['steps']}), sample-matched"] = _known(res["frechet_matched"])
        curves["real vs real (floor, sample-matched)"] = _known(res["frechet_real_floor"])
    plot_curves(out_dir / "frechet_vs_horizon.png", curves, "horizon window end (frames)",
                "Fréchet distance (tokenizer features)", title="Fréchet distance per horizon window")
    if "objects" in res:
        curves = {f"{k} (model)": _known(v) for k, v in res["objects"].items()}
        copy = res["baseline_copy_last"]["objects"]
        curves.update({f"{k} (copy last)": _known(v) for k, v in copy.items()})
        plot_curves(out_dir / "objects_vs_horizon.png", curves, "horizon (frames)",
                    "clips with the object in the right cells", title="object accuracy vs horizon")
    if "steps_sweep" in res:
        plot_curves(out_dir / "psnr_vs_steps.png", {"model": _known(res["steps_sweep"])}, "sampling steps K",
                    "mean PSNR (dB)", title="quality vs K")


def evaluate_tokenizer_run(run: str | Path, data: str | Path, clips: int, progress: bool = True
                           ) -> dict[str, Any]:
    from worldflow.distributed import device_of
    from worldflow.eval.reconstruction import evaluate_tokenizer
    from worldflow.run import Run

    tok, cfg = Run(run).tokenizer("cpu")
    device = device_of(cfg)
    tok.to(device)
    held = ClipBank.load(data, cfg.data, split="heldout", progress=progress)
    frames = held.fixed_clips(clips, cfg.data.clip_len).to(device)
    r = evaluate_tokenizer(tok, frames, reader=reader_of(data))
    out = {"recon_psnr": r["recon_psnr"], "recon_ssim": r["recon_ssim"], "clips": int(frames.shape[0]),
           "clip_len": int(frames.shape[1])}
    if "objects" in r:
        out["recon_objects"] = r["objects"]
    return out


def evaluate_agent_run(run: str | Path, env_id: str, episodes: int, seed: int = 12345, progress: bool = True
                       ) -> dict[str, Any]:
    """Real-env returns: the imagination-trained policy, behaviour cloning alone, random and expert.

    Each ``*_return`` is the mean over ``episodes`` episodes with the stochastic policy (the policy that
    was trained); ``*_return_mode`` repeats it acting with the policy's mode. The same env seeds are used
    for every policy.
    """
    from worldflow.eval.returns import baseline_returns, policy_returns
    from worldflow.run import AGENT_PHASES, Run

    rd = Run(run)
    cfg = rd.phase_config("agent_bc")
    res: dict[str, Any] = {"env": env_id, "episodes": episodes, "seed": seed}
    phases = [p for p in AGENT_PHASES if rd.has(p)]
    for phase in phases:
        key = "policy" if phase == "agent" else "bc"
        for mode, sample in (("", True), ("_mode", False)):
            r = policy_returns(run, env_id, episodes, phase, sample, seed, progress)
            res[f"{key}_return{mode}"] = r["mean"]
            res[f"{key}_return{mode}_std"] = r["std"]
    if "policy_return" not in res and "bc_return" in res:
        res["policy_return"] = res["bc_return"]  # no imagination phase: the BC policy is the policy
    for kind in ("random", "expert"):
        r = baseline_returns(env_id, cfg.data.size, episodes, kind, seed)
        if r is not None:
            res[f"{kind}_return"] = r["mean"]
            res[f"{kind}_return_std"] = r["std"]
    return res


def _ints(s: str) -> list[int]:
    try:
        values = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return values


def _powers_of_two(s: str) -> list[int]:
    return [power_of_two(x) for x in _ints(s)]


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.run) / "eval.json"
    media = out.parent / (out.stem + "_media")
    if args.tokenizer_only:
        res = evaluate_tokenizer_run(args.run, args.data, args.clips, progress=not args.no_progress)
    elif args.env:
        res = evaluate_agent_run(args.run, args.env, args.episodes, args.seed, progress=not args.no_progress)
    else:
        if args.data is None:
            raise SystemExit("worldflow eval: --data is required for rollout evaluation")
        res = evaluate_dynamics(args.run, args.data, args.context, args.horizons, args.steps,
                                args.steps_sweep, args.clips, media, progress=not args.no_progress,
                                sampler=args.sampler, uncertainty_samples=args.uncertainty_samples)
    atomic_write_text(out, json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=None))
    print(f"wrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run: rollout PSNR/SSIM per horizon, baselines, plots",
                       description=__doc__)
    p.add_argument("--run", required=True, help="run directory with trained checkpoints")
    p.add_argument("--data", help="dataset directory (held-out episodes are used)")
    p.add_argument("--context", type=positive_int, default=8, help="context frames C")
    p.add_argument("--horizons", type=_ints, default=list(DEFAULT_HORIZONS),
                   help="e.g. 1,2,4,8,16,32,64 (any, e.g. up to 1000: past the held-out truth only the "
                        "Fréchet distance is scored)")
    p.add_argument("--steps", type=power_of_two, default=4, help="sampling steps K per frame")
    p.add_argument("--steps-sweep", type=_powers_of_two, default=None,
                   help="also score these K, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--sampler", choices=flow.SAMPLERS, default=None,
                   help="euler (one model call a step) or heun (2K - 1 calls a frame); default: the run's "
                        "dynamics.sampler")
    p.add_argument("--clips", type=positive_int, default=32, help="held-out clips to score")
    p.add_argument("--uncertainty-samples", type=nonneg_int, default=3,
                   help="rollouts from the same context for the sample-spread signal (0: no uncertainty "
                        "signals; each sample costs one more rollout)")
    p.add_argument("--tokenizer-only", action="store_true", help="only tokenizer reconstruction PSNR/SSIM")
    p.add_argument("--env", help="evaluate the agent in this real env (policy/bc/random/expert return)")
    p.add_argument("--episodes", type=positive_int, default=20,
                   help="real-env episodes per policy (with --env)")
    p.add_argument("--seed", type=nonneg_int, default=12345, help="first env seed (with --env)")
    p.add_argument("--out", help="JSON file to write (default <run>/eval.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
