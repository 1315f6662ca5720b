"""``worldflow eval``: held-out open-loop rollouts scored per horizon, tokenizer reconstruction, plots.

Protocol: condition on C context frames of held-out episodes, roll out H frames with the
true actions, decode, and compare with the real frames (context excluded). Baselines: repeating the last
context frame, and the same rollout with actions shuffled across the batch (action sensitivity).

JSON keys (a public contract): ``psnr``, ``ssim`` (maps horizon -> mean), ``baseline_copy_last`` and
``shuffled_actions`` (each {"psnr": map, "ssim": map}), ``steps``, ``frames_per_second``, optional
``steps_sweep`` (map K -> mean PSNR over the requested horizons), ``lpips`` and ``fvd`` (null: absent
unless their weights are configured locally), ``context``, ``clips``; ``--tokenizer-only`` writes
``recon_psnr`` and ``recon_ssim``; ``--env ID --episodes N`` writes ``policy_return``, ``random_return``,
``expert_return`` (where the env has an expert) and ``bc_return`` (where a BC policy exists), each the
mean over the episodes.

For envs whose sprites can be read off the pixels (Catch, see worldflow.envs.object_reader) it adds
``objects`` ({object: map horizon -> fraction of clips whose predicted object cells equal the true ones},
also inside both baselines) and, with a sweep, ``steps_sweep_objects`` (map K -> {object: mean accuracy
over the horizons}).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from worldflow import flow
from worldflow.argtypes import nonneg_int, positive_int, power_of_two
from worldflow.config import Config
from worldflow.data.clips import ClipBank
from worldflow.data.dataset import select_episodes
from worldflow.data.episodes import load_manifest
from worldflow.dynamics.model import DynamicsModel
from worldflow.errors import InputError
from worldflow.eval.metrics import ObjectReader, object_match, psnr, ssim
from worldflow.eval.visual import comparison_video, plot_curves, write_media
from worldflow.io import atomic_write_text
from worldflow.tokenizer.model import CausalTokenizer

DEFAULT_HORIZONS = (1, 2, 4, 8, 16, 32, 64)


def decode_rollout(tok: CausalTokenizer, context_latents: torch.Tensor, pred_latents: torch.Tensor
                   ) -> torch.Tensor:
    """Decode predicted latents (B, H, N, D) after their context (B, C, N, D) -> frames (B, H, ...) in [0,1].

    The decoder is causal in time, so predicted frames are decoded with the context in front of them.
    """
    z = torch.cat([context_latents, pred_latents], dim=1)
    return tok.decode(z)[:, context_latents.shape[1]:]


class RolloutEvaluator:
    """Scores open-loop rollouts on a fixed set of held-out clips (same clips at every call)."""

    def __init__(self, tok: CausalTokenizer, bank: ClipBank, cfg: Config, device: torch.device,
                 context: int, horizon: int, clips: int = 32, seed: int = 0,
                 reader: ObjectReader | None = None):
        self.tok, self.cfg, self.device, self.reader = tok, cfg, device, reader
        self._truth_objects: dict | None = None
        self.context, self.horizon = context, horizon
        self.batch = {k: v.to(device) for k, v in bank.fixed_batch(clips, context + horizon).items()}
        self.seed = seed

    def truth_frames(self) -> torch.Tensor:
        """Ground-truth frames (B, H, h, w, 3) in [0, 1] of the predicted span."""
        return self.batch["frames"][:, self.context:].float() / 255.0

    @torch.no_grad()
    def predict(self, model, steps: int, shuffle_actions: bool = False, chunk: int = 32) -> torch.Tensor:
        from worldflow.dynamics import rollout

        b = self.batch
        actions, mask = b["actions"], b["action_mask"]
        if shuffle_actions:  # a fixed derangement across the batch: every clip gets another clip's actions
            perm = torch.roll(torch.arange(actions.shape[0], device=actions.device), 1)
            actions, mask = actions[perm], mask[perm]
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        c = self.context
        frames = []
        for i in range(0, actions.shape[0], chunk):
            sl = slice(i, i + chunk)
            z = rollout(model, b["latents"][sl, :c], actions[sl], self.horizon, steps,
                        action_mask=mask[sl], generator=gen)
            frames.append(decode_rollout(self.tok, b["latents"][sl, :c], z))
        return torch.cat(frames)

    def copy_last(self) -> torch.Tensor:
        last = self.batch["frames"][:, self.context - 1 : self.context].float() / 255.0
        return last.expand(-1, self.horizon, *last.shape[2:])

    def per_horizon(self, pred: torch.Tensor, horizons: list[int]) -> dict[str, dict[int, float]]:
        truth = self.truth_frames()
        p, s = psnr(pred, truth).mean(0), ssim(pred, truth).mean(0)
        hs = [h for h in horizons if h <= self.horizon]
        out: dict = {"psnr": {h: float(p[h - 1]) for h in hs}, "ssim": {h: float(s[h - 1]) for h in hs}}
        if self.reader is not None:
            acc = self.object_accuracy(pred)
            out["objects"] = {k: {h: float(v[h - 1]) for h in hs} for k, v in acc.items()}
        return out

    def truth_objects(self) -> dict:
        """The objects read off the ground-truth frames: fixed clips, so read once and kept."""
        if self._truth_objects is None:
            self._truth_objects = self.reader(self.truth_frames().cpu().numpy())
        return self._truth_objects

    def object_accuracy(self, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per object: the fraction of clips, per horizon (H,), whose predicted cells equal the truth."""
        match = object_match(self.reader(pred.cpu().numpy()), self.truth_objects(), lead=2)
        return {k: torch.as_tensor(m.mean(0)) for k, m in match.items()}

    def quick(self, model, step: int, media_dir: Path | None = None) -> dict[str, float]:
        """Mean PSNR over horizons 1..H with the configured K, against copy-last; writes a video."""
        was = model.training
        model.eval()
        pred = self.predict(model, self.cfg.dynamics.steps)
        model.train(was)
        truth = self.truth_frames()
        out = {"psnr": float(psnr(pred, truth).mean()), "psnr_copy_last": float(psnr(self.copy_last(),
                                                                                    truth).mean())}
        if self.reader is not None:
            out.update({f"{k}_accuracy": float(v.mean()) for k, v in self.object_accuracy(pred).items()})
        if media_dir is not None:
            self.write_video(pred, Path(media_dir) / f"rollout_{step:07d}")
        return out

    def write_video(self, pred: torch.Tensor, path: Path, n: int = 4) -> None:
        ctx = self.batch["frames"][:n, : self.context]
        truth = self.batch["frames"][:n]
        full_pred = torch.cat([ctx.float() / 255.0, pred[:n]], dim=1)
        write_media(comparison_video(truth, full_pred, context=self.context), path)


def _mean_over(m: dict[int, float], horizons: list[int]) -> float:
    vals = [m[h] for h in horizons if h in m]
    return sum(vals) / max(1, len(vals))


def heldout_rollouts(run: str | Path, data: str | Path, context: int, horizon: int, clips: int,
                     seed: int = 0, progress: bool = True, steps: Sequence[int] = ()
                     ) -> tuple[DynamicsModel, RolloutEvaluator]:
    """A run's dynamics model (eval mode) and a :class:`RolloutEvaluator` over held-out clips of ``data``.

    InputError (naming the flag) if ``context`` exceeds the frames the model was trained on, if context +
    horizon frames exceed the longest held-out episode, or if one of the sampling ``steps`` K is finer
    than the model's grid (K > k_max)."""
    from worldflow.distributed import device_of
    from worldflow.run import Run, latent_bank

    r = Run(run)
    model, cfg = r.dynamics()  # the config its checkpoint was trained with
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
    if context + horizon > longest:
        raise InputError(f"--context {context} + horizon {horizon} = {context + horizon} frames, but the "
                         f"longest held-out episode of {data} has {longest}: lower --context or the horizon")
    bank = with_frames(latent_bank(run, data, cfg, "heldout", tok, progress), data, cfg, progress)
    ev = RolloutEvaluator(tok, bank, cfg, device, context=context, horizon=horizon, clips=clips, seed=seed,
                          reader=reader_of(data))
    return model, ev


def evaluate_dynamics(run: str | Path, data: str | Path, context: int, horizons: list[int], steps: int,
                      steps_sweep: list[int] | None, clips: int, out_dir: Path, progress: bool = True
                      ) -> dict[str, Any]:
    """Everything ``worldflow eval`` reports for a run with a trained tokenizer and dynamics model."""
    model, ev = heldout_rollouts(run, data, context, max(horizons), clips, progress=progress,
                                 steps=[steps, *(steps_sweep or [])])
    t0 = time.time()
    pred = ev.predict(model, steps)
    fps = pred.shape[0] * pred.shape[1] / (time.time() - t0)
    res: dict[str, Any] = {"steps": steps, "context": context, "clips": int(pred.shape[0])}
    at_steps = ev.per_horizon(pred, horizons)
    res.update(at_steps)
    res["baseline_copy_last"] = ev.per_horizon(ev.copy_last(), horizons)
    res["shuffled_actions"] = ev.per_horizon(ev.predict(model, steps, shuffle_actions=True), horizons)
    res["frames_per_second"] = fps
    res["lpips"] = None  # absent: needs local LPIPS weights (tokenizer.lpips_path)
    res["fvd"] = None  # absent: needs local I3D weights
    if steps_sweep:
        # the same seed gives the same rollout, so K = steps is not generated a second time
        sweep = {k: at_steps if k == steps else ev.per_horizon(ev.predict(model, k), horizons)
                 for k in steps_sweep}
        res["steps_sweep"] = {k: _mean_over(r["psnr"], horizons) for k, r in sweep.items()}
        if ev.reader is not None:
            res["steps_sweep_objects"] = {k: {o: _mean_over(m, horizons) for o, m in r["objects"].items()}
                                          for k, r in sweep.items()}
    ev.write_video(pred, out_dir / "rollout")
    _plots(res, out_dir)
    return res


def reader_of(data: str | Path) -> ObjectReader | None:
    """The object reader of the dataset's env (worldflow.envs.object_reader), or None."""
    from worldflow.envs import object_reader

    return object_reader(load_manifest(data).get("env_id"))


def with_frames(bank: ClipBank, data, cfg: Config, progress: bool) -> ClipBank:
    """Attach the real frames to a latent bank (ground truth for scoring)."""
    frames = ClipBank.load(data, cfg.data, split="heldout", progress=progress)
    by_id = dict(zip(frames.ids, frames.episodes))
    eps = [{**e, "frames": by_id[i]["frames"]} for i, e in zip(bank.ids, bank.episodes)]
    return ClipBank(eps, bank.ids)


def _plots(res: dict[str, Any], out_dir: Path) -> None:
    for metric in ("psnr", "ssim"):
        plot_curves(out_dir / f"{metric}_vs_horizon.png",
                    {f"model (K={res['steps']})": res[metric],
                     "copy last frame": res["baseline_copy_last"][metric],
                     "shuffled actions": res["shuffled_actions"][metric]},
                    "horizon (frames)", metric.upper(), title=f"{metric.upper()} vs horizon")
    if "objects" in res:
        curves = {f"{k} (model)": v for k, v in res["objects"].items()}
        curves.update({f"{k} (copy last)": v for k, v in res["baseline_copy_last"]["objects"].items()})
        plot_curves(out_dir / "objects_vs_horizon.png", curves, "horizon (frames)",
                    "clips with the object in the right cells", title="object accuracy vs horizon")
    if "steps_sweep" in res:
        plot_curves(out_dir / "psnr_vs_steps.png", {"model": res["steps_sweep"]}, "sampling steps K",
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
                                args.steps_sweep, args.clips, media, progress=not args.no_progress)
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
    p.add_argument("--horizons", type=_ints, default=list(DEFAULT_HORIZONS), help="e.g. 1,2,4,8,16,32,64")
    p.add_argument("--steps", type=power_of_two, default=4, help="sampling steps K per frame")
    p.add_argument("--steps-sweep", type=_powers_of_two, default=None,
                   help="also score these K, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--clips", type=positive_int, default=32, help="held-out clips to score")
    p.add_argument("--tokenizer-only", action="store_true", help="only tokenizer reconstruction PSNR/SSIM")
    p.add_argument("--env", help="evaluate the agent in this real env (policy/bc/random/expert return)")
    p.add_argument("--episodes", type=positive_int, default=20,
                   help="real-env episodes per policy (with --env)")
    p.add_argument("--seed", type=nonneg_int, default=12345, help="first env seed (with --env)")
    p.add_argument("--out", help="JSON file to write (default <run>/eval.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
