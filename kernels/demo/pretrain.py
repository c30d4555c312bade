"""Pretrain the demo base model on the demo world, on a CPU, from scratch, in one resumable command.

``python -m fewshot_personalize.kernels.demo.pretrain [--out DIR] [--work DIR] [--seed 0] [--images N]
[--vae-minutes M] [--unet-minutes M] [--patterns S] [--pattern-words] [--pair-patterns S] [--two-objects S] [--decoder-minutes M]
[--decoder-patterns S] [--deepen L] [--object-weight W] [--threads T]``
runs five stages:

1. render ``N`` captioned world scenes (hold-out caption combinations excluded, model.HOLDOUT; half of them with
   two objects);
2. train the VAE for ``--vae-minutes`` (vae_training.py), then measure what it keeps of the bundled concepts and
   of colours outside the world's palette (vae_quality.py);
3. encode every scene once (latent means), scaled to unit variance;
4. train the UNet and the text encoder for ``--unet-minutes`` (unet_training.py); the EMA weights are saved;
   with ``--patterns S`` (per session) its scenes are rendered again with a share S of patterned objects
   (world_patterns.py) and encoded once more; ``--pair-patterns S`` gives its two-object scenes share S instead
   (0: pairs stay flat, since captions do not name patterns and a second colour beside another object's colour
   blurs which colour belongs to which object); ``--pattern-words`` (per session) names those patterns in the
   captions ("a red ball with yellow stripes", world.PATTERN_NOUNS; a model from before the nouns grows its text
   encoder to them, vocabulary_growth.py); ``--two-objects S`` (per session) renders them again with a share S
   of two-object scenes instead of the run's half; ``--deepen L`` (from this session on) gives every
   cross-attention block of the trained UNet L transformer layers, the new ones starting as no-ops
   (unet_deepening.py), before this session's UNet steps; ``--object-weight W`` (per session) weighs the loss on
   object pixels W times the background's (objects cover a few percent of a scene);
5. once the UNet's budget is spent, fine-tune the VAE's decoder alone for ``--decoder-minutes`` on the frozen
   encoder's latents (vae_training.train_decoder: the UNet's latent space does not move), and measure the VAE again;
   with ``--decoder-patterns S`` (per session) on scenes where a share S of objects carries any of the world's
   patterns, faces on toys and marks on boxes preferred (world_patterns.ALL_PATTERNS; never a concept's own
   combination), so the decoder learns to draw fine detail it otherwise rarely sees;

and writes the diffusers folder to ``--out`` beside a staging copy that is renamed into place (never
half-written), with ``pretrain_log.json``: settings, every session's stage times, loss curves, measurements.

Every stage checkpoints into ``--work`` every 5 minutes. The same command run again with the same ``--work`` —
after an interruption, in another session — continues where it stopped; a larger ``--unet-minutes`` extends a
finished run (the learning-rate schedule stretches to the new budget), and a larger ``--vae-minutes`` extends the
VAE stage as long as the UNet has not started (``--unet-minutes 0`` stops after the VAE, for a look at it). A resumed session draws fresh batches
(seed + session number), so resuming is not bit-identical to an uninterrupted run.

Across machines (the work folder lives in the user cache, and a new machine starts without it):
``--session-minutes M`` trains at most ``M`` minutes in this session and then writes ``--out`` from the state
reached (``pretrain_log.json`` says ``"finished": false``); ``--from DIR`` starts a new work folder from such a
folder: its log (same settings), its VAE, and (once the UNet stage has begun) its EMA UNet and text encoder as both
the training and the EMA weights; a folder of the VAE alone (``vae/`` and the log) is enough before that; the scenes are rendered and encoded again (the same seed gives the same latents), the optimizer's moments
start afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.cache import cache_root
from ..core.errors import UserInputError
from ..core.atomic_write import atomic_write_text
from ..formats.checkpoint import load_checkpoint, save_checkpoint
from ..formats.safetensors_io import atomic_save, load_safetensors
from .model import DEFAULT_SCHEDULE, HOLDOUT, MODEL_DIR, RESOLUTION, SCHEDULES, VAE_CONFIG, build_untrained
from .unet_deepening import deepen_unet, transformer_layers
from .unet_training import caption_ids, make_optimizer, object_loss_weights, train_unet, with_ema
from .vae_training import decoder_parameters, pixel_error, to_pixels, train_decoder, train_vae

N_SCENES = 32000
P_TWO_OBJECTS = 0.5
UNET_LR, TEXT_LR, UNET_BATCH, VAE_LR, VAE_BATCH = 5e-4, 2e-4, 32, 1e-3, 16
DECODER_LR, DECODER_BATCH = 5e-4, 8
DECODER_PREFER_SHAPE = 0.7  # share of toys drawn with a face and boxes with a mark in the decoder's patterned scenes

log = logging.getLogger(__name__)


def render_dataset(n: int, seed: int, p_two: float = P_TWO_OBJECTS, pattern_share: float = 0.0,
                   patterns: tuple[str, ...] | None = None, prefer_shape: float = 0.0,
                   pair_share: float | None = None,
                   name_patterns: bool = False) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` world scenes (uint8 [n, 64, 64, 3]), their captions and object masks (bool [n, 64, 64]); no
    hold-out combination appears; a share ``p_two`` has two objects; each object carries a random two-colour
    pattern with probability ``pattern_share`` (world_patterns.py; 0: the flat world, the same scenes as ever),
    drawn from ``patterns`` (default world_patterns.PATTERNS, the two-colour ones; ``prefer_shape`` as in
    world_patterns.add_patterns); ``pair_share``: the share in two-object scenes instead (None: ``pattern_share``);
    ``name_patterns``: captions name each two-colour pattern ("a red ball with yellow stripes", world.PATTERN_NOUNS)."""
    from .world import render, sample_scene
    from .world_patterns import PATTERNS, add_patterns, excluded_combinations

    rng = np.random.default_rng(seed)
    excluded = excluded_combinations()
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    masks = np.empty((n, RESOLUTION, RESOLUTION), dtype=bool)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, holdout=HOLDOUT, p_two=p_two)
        share = pattern_share if pair_share is None or len(scene.objects) < 2 else pair_share
        add_patterns(scene, rng, share, excluded, patterns or PATTERNS, prefer_shape)
        im, masks[i], _ = render(scene, RESOLUTION)
        images[i] = np.asarray(im)
        captions.append(scene.caption(name_patterns))
    return images, captions, masks


def object_pixels(masks: np.ndarray, cell: int) -> torch.Tensor:
    """Object pixels in each ``cell`` × ``cell`` square of the images (uint8 [n, H / cell, W / cell]): with ``cell``
    the VAE's downsampling, how much of each latent pixel's footprint is object."""
    if cell * cell > 255:
        raise ValueError(f"cells of {cell}x{cell} pixels do not fit a uint8 count")
    n, h, w = masks.shape
    m = torch.from_numpy(np.ascontiguousarray(masks))
    return m.view(n, h // cell, cell, w // cell, cell).sum((2, 4), dtype=torch.int32).to(torch.uint8)


def _objects_file(latents_file: Path) -> Path:
    """Where the object-pixel counts of a latents file's scenes are kept (``objects…`` beside ``latents…``)."""
    return latents_file.with_name("objects" + latents_file.name[len("latents"):])


def _save_objects(latents_file: Path, masks: np.ndarray, cell: int) -> torch.Tensor:
    counts = object_pixels(masks, cell)
    atomic_save({"object_pixels": counts}, _objects_file(latents_file), {"cell": str(cell)}, overwrite=True)
    return counts


def _latent_object_pixels(latents_file: Path, captions: list[str], render: Callable, cell: int,
                          session: dict) -> torch.Tensor:
    """The object-pixel counts of the scenes encoded in ``latents_file``, from its ``objects`` file, or (a work
    folder from before they were kept) by rendering the same scenes again with ``render`` (deterministic: the
    captions must come out the same, or the world changed and the masks cannot be recovered)."""
    file = _objects_file(latents_file)
    if file.is_file():
        return load_safetensors(file)[0]["object_pixels"]
    t0 = time.perf_counter()
    _, again, masks = render()
    session["render_s"] = session.get("render_s", 0.0) + time.perf_counter() - t0
    if again != captions:
        raise UserInputError(f"{latents_file}: its scenes rendered again come out with other captions (the world "
                             "has changed since they were encoded), so their object masks cannot be recovered; "
                             "start a new --work folder for --object-weight")
    log.info("rendered the scenes of %s again for their object masks", latents_file.name)
    return _save_objects(latents_file, masks, cell)


@torch.no_grad()
def reconstruction_check(vae, seed: int, n: int = 256) -> dict:
    """Held-out renders through encode → decode: pixel MSE overall and on object pixels (in [-1, 1] units)."""
    images, _, masks = render_dataset(n, seed + 1)
    x = to_pixels(images)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample for i in range(0, n, 64)])
    err = (rec.clamp(-1, 1) - x) ** 2
    m = torch.from_numpy(masks).unsqueeze(1).expand_as(err)
    return {"mse": float(err.mean()), "object_mse": float(err[m].mean()),
            "l1_plus_mse": float(pixel_error(rec.clamp(-1, 1), x).mean()), "images": n}


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(to_pixels(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


def _drop_local_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` from the saved component configs: a shipped model carries no local path."""
    for cfg_path in folder.glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def default_work_dir(settings: dict) -> Path:
    """The user cache (core/cache.py)/pretrain/<settings hash>: outside the repo."""
    return cache_root() / "pretrain" / _fingerprint(settings)


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class WorkFolder:
    """The resumable state of one pretraining run: ``progress.json`` plus one checkpoint file per stage, each
    written atomically (temp + rename)."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings, self.fingerprint = path, settings, _fingerprint(settings)
        path.mkdir(parents=True, exist_ok=True)
        file = path / "progress.json"
        self.progress = json.loads(file.read_text()) if file.is_file() else {"settings": settings, "sessions": []}
        if self.progress["settings"] != settings:
            changed = sorted(k for k in settings if self.progress["settings"].get(k) != settings[k])
            raise UserInputError(f"{path} holds a run with other settings ({', '.join(changed)}); use another --work "
                             "folder or the same settings")

    def save(self) -> None:
        atomic_write_text(self.path / "progress.json", json.dumps(self.progress, indent=1))

    def stage(self, name: str) -> dict:
        return self.progress.setdefault(name, {"done_s": 0.0, "steps": 0, "loss_curve_per_50": []})

    @staticmethod
    def _params(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        return {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}

    def save_state(self, name: str, modules: dict[str, torch.nn.Module], optimizer, steps: int) -> None:
        save_checkpoint(self.path / f"{name}_state.safetensors", step=steps, params=self._params(modules),
                        optimizer=optimizer, scheduler=None, losses=[], fingerprint=self.fingerprint)

    def load_state(self, name: str, modules: dict[str, torch.nn.Module], optimizer) -> bool:
        file = self.path / f"{name}_state.safetensors"
        if not file.is_file():
            return False
        load_checkpoint(file, params=self._params(modules), optimizer=optimizer, scheduler=None,
                        fingerprint=self.fingerprint)
        return True


def _checkpointer(work: WorkFolder, name: str, modules: dict, optimizer, session: dict):
    """``on_checkpoint(done_s, steps in all sessions, this session's losses)`` of one stage: state file, stage
    progress and this session's seconds in ``progress.json``."""
    stage = work.stage(name)
    start_s, start_curve = stage["done_s"], list(stage["loss_curve_per_50"])

    def on_checkpoint(done_s: float, steps: int, losses: list[float]) -> None:
        work.save_state(name, modules, optimizer, steps)
        stage.update(done_s=done_s, steps=steps,
                     loss_curve_per_50=start_curve + [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)])
        session[f"{name}_s"] = done_s - start_s
        work.save()

    return on_checkpoint


def pretrain(out_dir: str | Path = MODEL_DIR, *, work_dir: str | Path | None = None, seed: int = 0,
             n_images: int = N_SCENES, vae_minutes: float = 60, unet_minutes: float = 300, threads: int = 2,
             latent_channels: int | None = None, cooldown: float = 0.2, checkpoint_every_s: float = 300.0,
             measure: bool = True, session_minutes: float = float("inf"), from_dir: str | Path | None = None,
             schedule: str = DEFAULT_SCHEDULE, decoder_minutes: float = 0, patterns: float = 0.0,
             decoder_patterns: float = 0.0, rewarm: float | None = None,
             decoder_prefer_shape: float = DECODER_PREFER_SHAPE, pair_patterns: float | None = None,
             two_objects: float | None = None, deepen: int | None = None, pattern_words: bool = False,
             object_weight: float = 1.0) -> dict:
    """Run (or continue) the stages until both budgets are spent or ``session_minutes`` have passed, then write
    ``out_dir``; returns the log. ``from_dir``: a model folder written by an earlier run of the same settings, to
    continue from where no work folder exists yet. ``schedule``: the noise schedule of this session's UNet steps
    (model.SCHEDULES; recorded per session, like the budgets, so a run may switch part-way; the folder written
    carries the last session's). ``patterns``: the share of objects that carry a random two-colour pattern in the
    scenes of this session's UNet steps (world_patterns.py; recorded per session; 0: the flat world);
    ``pair_patterns``: the share in its two-object scenes instead (None: ``patterns``; 0 keeps pairs flat);
    ``pattern_words``: this session's captions name those patterns ("a red ball with yellow stripes"; recorded per
    session; a model from before the pattern nouns joined the vocabulary grows its text encoder to them).
    ``two_objects``: the share of this session's UNet scenes with two objects (None: the run's setting,
    ``p_two_objects``); scenes rendered again at that share and encoded once, recorded per session.
    ``object_weight``: this session's UNet loss weighs each latent pixel 1 + (w − 1) × its share of object pixels
    (unet_training.object_loss_weights; 1: the plain loss; recorded per session; the scenes' object masks are kept
    beside their latents, and rendered again for a work folder from before).
    ``deepen``: the UNet's transformer layers per cross-attention block from this session on (unet_deepening.py;
    more than it has, and only where this session trains the UNet; recorded in the stage, so later sessions and
    ``--from`` build the deeper UNet; Adam's moments start afresh, as with ``--from``).
    ``decoder_patterns``: the same for the decoder stage's scenes, drawn from every pattern of the world;
    ``decoder_prefer_shape``: of those, the share of toys given a face and of boxes given a mark first (per session).
    ``rewarm``: when this session extends the UNet's budget, give the extension a schedule of its own (warm-up to
    ``rewarm`` × the peak learning rates, then the cooldown over the extension's last ``cooldown`` fraction),
    recorded in the stage so that later sessions of the same extension keep it; without it the one schedule of the
    whole run stretches to the new budget, and an extension of a finished run trains at its cooldown's tail."""
    from diffusers import StableDiffusionPipeline

    if rewarm is not None and not 0.0 < rewarm <= 1.0:
        raise UserInputError(f"rewarm is a share of the peak learning rate, above 0 and at most 1; got {rewarm}")
    for name, share, of in (("patterns", patterns, "objects"), ("decoder patterns", decoder_patterns, "objects"),
                            ("decoder prefer shape", decoder_prefer_shape, "objects"),
                            ("pair patterns", pair_patterns, "objects"), ("two objects", two_objects, "scenes")):
        if share is not None and not 0.0 <= share <= 1.0:
            raise UserInputError(f"{name} is a share of {of}, 0 to 1; got {share}")
    if not 1.0 <= object_weight < float("inf"):
        raise UserInputError("object weight multiplies the loss on object pixels: a finite number, 1 (the plain "
                             f"loss) or more; got {object_weight}")
    if deepen is not None and (not isinstance(deepen, int) or deepen < 1):
        raise UserInputError(f"deepen is a number of transformer layers per block, 1 or more; got {deepen!r}")
    if pattern_words and patterns == 0:
        raise UserInputError("pattern words name the patterns of a patterned session's objects; give --patterns "
                             "above 0 as well (this session's scenes are flat)")
    if pair_patterns is not None and patterns == 0:
        raise UserInputError("pair patterns sets the pattern share of a patterned session's two-object scenes; "
                         "give --patterns above 0 as well (this session's scenes are flat)")
    torch.set_num_threads(threads)
    settings = {"seed": seed, "n_images": n_images, "p_two_objects": P_TWO_OBJECTS, "resolution": RESOLUTION,
                "latent_channels": latent_channels or VAE_CONFIG["latent_channels"], "vae_lr": VAE_LR,
                "vae_batch": VAE_BATCH, "unet_lr": UNET_LR, "text_lr": TEXT_LR, "unet_batch": UNET_BATCH,
                "cooldown": cooldown, "holdout": [dict(h) for h in HOLDOUT]}
    out_dir = Path(out_dir)
    deadline = time.perf_counter() + session_minutes * 60
    work = WorkFolder(Path(work_dir) if work_dir else default_work_dir(settings), settings)
    seeded = from_dir is not None and not work.progress["sessions"]
    if seeded:
        _continue_log(work, Path(from_dir))
    progress = work.progress
    session_no = len(progress["sessions"])
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "torch": torch.__version__,
               **({"continued_from": str(from_dir)} if seeded else {}),
               "machine": f"{platform.machine()} {platform.processor()}".strip(),
               "vae_budget_s": vae_minutes * 60, "unet_budget_s": unet_minutes * 60,
               "decoder_budget_s": decoder_minutes * 60, "schedule": schedule, "patterns": patterns,
               "decoder_patterns": decoder_patterns,
               **({"pair_patterns": pair_patterns} if pair_patterns is not None else {}),
               **({"two_objects": two_objects} if two_objects is not None else {}),
               **({"pattern_words": True} if pattern_words else {}),
               **({"deepen": deepen} if deepen is not None else {}),
               **({"object_weight": object_weight} if object_weight != 1.0 else {}),
               **({"decoder_prefer_shape": decoder_prefer_shape} if decoder_patterns > 0 else {})}
    progress["sessions"].append(session)
    run_seed = seed + 1000 * session_no
    unet, vae, text, tokenizer, scheduler = build_untrained(work.path / "tokenizer", seed, schedule=schedule,
                                                            latent_channels=settings["latent_channels"])
    depth = work.stage("unet").get("transformer_layers", transformer_layers(unet))
    if depth != transformer_layers(unet):  # an earlier session deepened the UNet: load into its architecture
        unet = deepen_unet(unet, depth, seed)
    unet_left = work.stage("unet")["done_s"] < unet_minutes * 60  # only UNet steps move it, and they come later
    if deepen is not None and deepen < depth:
        raise UserInputError(f"--deepen {deepen}: the UNet already has {depth} transformer layers per block "
                             "(a UNet is deepened, never made shallower)")
    if deepen is not None and deepen > depth and not unet_left:
        raise UserInputError(f"--deepen {deepen}: the UNet's budget is spent ({work.stage('unet')['done_s'] / 60:.0f} "
                             f"of {unet_minutes:g} min); give a larger --unet-minutes so that the new layers train")
    if seeded:  # a folder written after the VAE stage only (--unet-minutes 0) carries a VAE and nothing else
        nets = {"vae": vae} if work.stage("unet")["steps"] == 0 else {"vae": vae, "unet": unet, "text": text}
        _load_weights(Path(from_dir), tokenizer.get_vocab(), **nets)
    latents_file = work.path / "latents.safetensors"
    vae_more = vae_minutes * 60 > work.stage("vae")["done_s"]
    if vae_more and work.stage("unet")["steps"] > 0:
        raise UserInputError(f"the VAE stage of {work.path} is finished ({work.stage('vae')['done_s'] / 60:.0f} min) "
                         "and the UNet trains on its latents; a longer --vae-minutes needs a new --work folder")
    if vae_more and latents_file.is_file():
        latents_file.unlink()  # the UNet has not started: the VAE may still train on

    scenes = None  # the rendered scenes, when this session renders them (the decoder stage reuses them)
    if not latents_file.is_file():  # stages 1-3
        t0 = time.perf_counter()
        images, captions, masks = render_dataset(n_images, seed)
        session["render_s"] = time.perf_counter() - t0
        log.info("rendered %d scenes in %.0f s", n_images, session["render_s"])
        vae_opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
        work.load_state("vae", {"vae": vae}, vae_opt)
        stage = work.stage("vae")
        train_vae(vae, vae_opt, images, masks, budget_s=vae_minutes * 60, done_s=stage["done_s"],
                  done_steps=stage["steps"], seed=run_seed, batch=VAE_BATCH, lr=VAE_LR, checkpoint_every_s=checkpoint_every_s,
                  on_checkpoint=_checkpointer(work, "vae", {"vae": vae}, vae_opt, session),
                  session_s=deadline - time.perf_counter())
        for p in vae.parameters():
            p.requires_grad_(False)
        stage["held_out_reconstruction"] = reconstruction_check(vae, seed, 256 if measure else 16)
        if measure and "quality" not in stage:
            from .evaluator import Evaluator
            from .vae_quality import vae_report

            stage["quality"] = vae_report(Evaluator.load(), vae)
            log.info("vae keeps ≥ %.0f %% of every concept's subject fidelity, ≥ %.0f %% of its pattern fidelity; "
                     "off-palette colour error %.1f %%", 100 * stage["quality"]["min_ratio"],
                     100 * stage["quality"]["min_pattern_ratio"], 100 * stage["quality"]["colour"]["mean_error_per_channel"])
        mean = encode_all(vae, images)
        scale = float(1.0 / mean.std())
        latents = (mean * scale).contiguous()
        atomic_save({"latents": latents}, latents_file,
                    {"scaling_factor": repr(scale), "captions": json.dumps(captions)}, overwrite=True)
        _save_objects(latents_file, masks, RESOLUTION // latents.shape[-1])
        scenes = (images, masks)
        del mean
        work.save()
    else:
        work.load_state("vae", {"vae": vae}, torch.optim.AdamW(vae.parameters()))
        tensors, meta = load_safetensors(latents_file)
        latents, scale, captions = tensors["latents"], float(meta["scaling_factor"]), json.loads(meta["captions"])
    vae.register_to_config(scaling_factor=scale)
    vae.eval()
    other_pairs = None if two_objects == P_TWO_OBJECTS else two_objects  # None: the run's share, as rendered
    used_file, render_again = latents_file, lambda: render_dataset(n_images, seed)
    if (patterns > 0 or other_pairs is not None) and unet_left:
        latents, captions, used_file, render_again = _session_latents(
            work, vae, scale, seed, n_images, patterns, session, pair_patterns, other_pairs, pattern_words)
    loss_weights = None
    if object_weight != 1.0 and unet_left:
        cell = RESOLUTION // latents.shape[-1]
        counts = _latent_object_pixels(used_file, captions, render_again, cell, session)
        loss_weights = object_loss_weights(counts, cell * cell, object_weight)

    nets = with_ema(unet, text)
    opt = make_optimizer(unet, text, UNET_LR, TEXT_LR)
    work.load_state("unet", nets, opt)
    stage = work.stage("unet")
    if deepen is not None and deepen > depth:  # the trained (and EMA) UNet grow; both start the new layers alike
        deeper = {k: deepen_unet(nets[k], deepen, run_seed) for k in ("unet", "ema_unet")}
        nets = nets | {"unet": deeper["unet"], "ema_unet": deeper["ema_unet"].requires_grad_(False)}
        opt = make_optimizer(nets["unet"], text, UNET_LR, TEXT_LR)
        stage["transformer_layers"] = deepen
        log.info("UNet deepened to %d transformer layers per block (%d parameters)", deepen,
                 sum(p.numel() for p in nets["unet"].parameters()))
    ema_unet, ema_text = nets["ema_unet"], nets["ema_text"]
    unet_budget_s = unet_minutes * 60
    recorded = stage.get("rewarm")  # the extension that began re-warmed, for the budget it extended to
    if rewarm is not None and (recorded or {}).get("budget_s") != unet_budget_s and stage["done_s"] < unet_budget_s:
        stage["rewarm"] = recorded = {"from_s": stage["done_s"], "from_step": stage["steps"], "peak": rewarm,
                                      "budget_s": unet_budget_s}
    extension = recorded if recorded and recorded["budget_s"] == unet_budget_s else None
    ids, empty_ids = caption_ids(tokenizer, captions)
    train_unet(nets, opt, scheduler.alphas_cumprod, latents, ids, empty_ids, budget_s=unet_budget_s,
               done_s=stage["done_s"], done_steps=stage["steps"], seed=run_seed, base_lrs=(UNET_LR, TEXT_LR),
               batch=UNET_BATCH, cooldown=cooldown, checkpoint_every_s=checkpoint_every_s,
               on_checkpoint=_checkpointer(work, "unet", nets, opt, session),
               session_s=max(0.0, deadline - time.perf_counter()),
               prediction_type=scheduler.config.prediction_type,
               rewarm=(extension["from_s"], extension["from_step"], extension["peak"]) if extension else None,
               loss_weights=loss_weights)
    _decoder_stage(work, vae, session, scenes, budget_s=decoder_minutes * 60, seed=run_seed, n_images=n_images,
                   unet_done=work.stage("unet")["done_s"] >= unet_minutes * 60, measure=measure,
                   session_s=deadline - time.perf_counter(), checkpoint_every_s=checkpoint_every_s,
                   pattern_share=decoder_patterns, prefer_shape=decoder_prefer_shape)

    record = {"settings": settings, "work": str(work.path), "sessions": progress["sessions"],
              "vae": work.stage("vae"), "latent_scaling_factor": scale, "unet": work.stage("unet"),
              **({"decoder": work.stage("decoder")} if "decoder" in progress else {}),
              "finished": (work.stage("vae")["done_s"] >= vae_minutes * 60
                           and work.stage("unet")["done_s"] >= unet_minutes * 60
                           and progress.get("decoder", {}).get("done_s", 0.0) >= decoder_minutes * 60),
              "budget_minutes": {"vae": vae_minutes, "unet": unet_minutes, "decoder": decoder_minutes},
              "cpu_minutes": sum(s.get("vae_s", 0) + s.get("unet_s", 0) + s.get("decoder_s", 0) + s.get("render_s", 0)
                                 for s in progress["sessions"]) / 60}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as staging:
        new = Path(staging) / "model"
        pipe.save_pretrained(str(new), safe_serialization=True)
        _drop_local_paths(new)
        (new / "pretrain_log.json").write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            out_dir.rename(Path(staging) / "old")
        new.rename(out_dir)
    work.save()
    return record


def _session_latents(work: WorkFolder, vae, scale: float, seed: int, n_images: int, share: float,
                     session: dict, pair_share: float | None = None,
                     two_objects: float | None = None,
                     name_patterns: bool = False) -> tuple[torch.Tensor, list[str], Path, Callable]:
    """Latents (scaled like the flat world's, same encoder) and captions of ``n_images`` scenes with a pattern
    share ``share`` (``pair_share`` in two-object scenes) and a share ``two_objects`` of two-object scenes (None:
    the run's), rendered and encoded once per combination of shares and kept in the work folder;
    ``name_patterns``: the captions name the patterns (the scenes are the same). Also returns the latents file and
    a function that renders its scenes again (for their object masks)."""
    pairs = "" if pair_share is None or pair_share == share else f"_pairs{pair_share:g}"
    two = "" if two_objects is None else f"_two{two_objects:g}"
    named = "_named" if name_patterns else ""
    file = work.path / f"latents_patterns{share:g}{pairs}{two}{named}.safetensors"

    def render():
        return render_dataset(n_images, seed, P_TWO_OBJECTS if two_objects is None else two_objects,
                              pattern_share=share, pair_share=pair_share, name_patterns=name_patterns)

    if file.is_file():
        tensors, meta = load_safetensors(file)
        return tensors["latents"], json.loads(meta["captions"]), file, render
    t0 = time.perf_counter()
    images, captions, masks = render()
    session["render_s"] = session.get("render_s", 0.0) + time.perf_counter() - t0
    latents = (encode_all(vae, images) * scale).contiguous()
    atomic_save({"latents": latents}, file, {"captions": json.dumps(captions), "pattern_share": repr(share),
                                             "two_objects": repr(two_objects)}, overwrite=True)
    _save_objects(file, masks, RESOLUTION // latents.shape[-1])
    log.info("rendered and encoded %d scenes with pattern share %g, two-object share %s", n_images, share,
             two_objects)
    return latents, captions, file, render


def _decoder_stage(work: WorkFolder, vae, session: dict, scenes, *, budget_s: float, seed: int, n_images: int,
                   unet_done: bool, measure: bool, session_s: float, checkpoint_every_s: float,
                   pattern_share: float = 0.0, prefer_shape: float = DECODER_PREFER_SHAPE) -> None:
    """Stage 5: load the decoder fine-tuned so far (its state file), and train it on while its budget is left, the
    UNet's is spent and this session has time; then measure the VAE (what the decoder keeps) into the stage.
    ``scenes``: (images, masks) rendered earlier in this session, or None to render them; with ``pattern_share``
    > 0 the stage renders its own scenes with every pattern of the world (faces and marks preferred)."""
    optimizer = torch.optim.AdamW(decoder_parameters(vae), lr=DECODER_LR, weight_decay=0.0)
    work.load_state("decoder", {"vae": vae}, optimizer)
    stage = work.progress.get("decoder")
    if not (budget_s > (stage or {}).get("done_s", 0.0) and unet_done and session_s > 0):
        return
    stage = work.stage("decoder")
    t0 = time.perf_counter()
    if pattern_share > 0 or scenes is None:  # at share 0 the same flat scenes as stage 1
        from .world_patterns import ALL_PATTERNS

        images, _, masks = render_dataset(n_images, work.settings["seed"], pattern_share=pattern_share,
                                          patterns=ALL_PATTERNS, prefer_shape=prefer_shape)
        session["render_s"] = session.get("render_s", 0.0) + time.perf_counter() - t0
    else:
        images, masks = scenes
    stage.update(lr=DECODER_LR, batch=DECODER_BATCH)
    stage.setdefault("pattern_share_per_session", []).append(pattern_share)
    train_decoder(vae, optimizer, images, masks, budget_s=budget_s, done_s=stage["done_s"], done_steps=stage["steps"],
                  seed=seed, batch=DECODER_BATCH, lr=DECODER_LR, checkpoint_every_s=checkpoint_every_s,
                  on_checkpoint=_checkpointer(work, "decoder", {"vae": vae}, optimizer, session),
                  session_s=max(0.0, session_s - (time.perf_counter() - t0)))
    del images, masks
    stage["held_out_reconstruction"] = reconstruction_check(vae, work.settings["seed"], 256 if measure else 16)
    if measure:
        from .evaluator import Evaluator
        from .vae_quality import vae_report

        stage["quality"] = vae_report(Evaluator.load(), vae)
        log.info("after the decoder fine-tune the vae keeps ≥ %.0f %% of every concept's subject fidelity, ≥ %.0f %% "
                 "of its pattern fidelity; off-palette colour error %.1f %%", 100 * stage["quality"]["min_ratio"],
                 100 * stage["quality"]["min_pattern_ratio"], 100 * stage["quality"]["colour"]["mean_error_per_channel"])
    work.save()


def _continue_log(work: WorkFolder, from_dir: Path) -> None:
    """Start ``work`` from the log of the model folder ``from_dir`` (same settings, or a clear error)."""
    log_file = from_dir / "pretrain_log.json"
    if not log_file.is_file():
        raise UserInputError(f"--from {from_dir}: no pretrain_log.json there (not a folder this command wrote)")
    record = json.loads(log_file.read_text())
    if record.get("settings") != work.settings:
        changed = sorted(k for k in work.settings if record.get("settings", {}).get(k) != work.settings[k])
        raise UserInputError(f"--from {from_dir}: written with other settings ({', '.join(changed)})")
    work.progress.update(sessions=record["sessions"], vae=record["vae"], unet=record["unet"])
    if "decoder" in record:  # the folder's VAE already holds the decoder fine-tuned that far
        work.progress["decoder"] = record["decoder"]
    work.save()


def _load_weights(from_dir: Path, vocab: dict[str, int] | None = None, **modules: torch.nn.Module) -> None:
    """Copy the weights of a diffusers model folder (``vae``, ``unet``, ``text`` = text_encoder) into modules of
    the same architecture (safetensors only, strict). A text encoder whose folder's tokenizer knows fewer words than
    ``vocab`` (this run's tokenizer; a model from before words were added to world.all_words()) is grown to it
    (vocabulary_growth.py)."""
    files = {"vae": "vae/diffusion_pytorch_model.safetensors", "unet": "unet/diffusion_pytorch_model.safetensors",
             "text": "text_encoder/model.safetensors"}
    for name, module in modules.items():
        tensors, _ = load_safetensors(from_dir / files[name])
        if name == "text" and vocab is not None:
            from transformers import CLIPTokenizer

            old_vocab = CLIPTokenizer.from_pretrained(str(from_dir / "tokenizer")).get_vocab()
            if old_vocab != vocab:
                from .vocabulary_growth import grow_text_state

                try:
                    tensors = grow_text_state(tensors, old_vocab, vocab)
                except ValueError as e:
                    raise UserInputError(f"--from {from_dir}: its tokenizer cannot grow to this version's "
                                         f"vocabulary ({e})") from None
                log.info("text encoder of %s grown from %d to %d tokens", from_dir, len(old_vocab), len(vocab))
        module.load_state_dict(tensors, strict=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(MODEL_DIR), help="the model folder to write (replaced when the run ends)")
    ap.add_argument("--work", help="folder of the resumable state (default: in the user cache, one per settings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=N_SCENES, help=f"scenes rendered (default {N_SCENES})")
    ap.add_argument("--vae-minutes", type=float, default=60)
    ap.add_argument("--unet-minutes", type=float, default=300)
    ap.add_argument("--latent-channels", type=int, help="VAE latent channels (default: model.VAE_CONFIG)")
    ap.add_argument("--decoder-minutes", type=float, default=0,
                    help="after the UNet, fine-tune the VAE decoder alone this long (the encoder and latents stay)")
    ap.add_argument("--patterns", type=float, default=0.0,
                    help="share of objects with a random two-colour pattern in this session's UNet scenes "
                         "(default 0: the flat world; recorded per session)")
    ap.add_argument("--pair-patterns", type=float,
                    help="the pattern share in the two-object scenes of this session's UNet scenes instead "
                         "(default: --patterns; 0 keeps them flat; recorded per session)")
    ap.add_argument("--pattern-words", action="store_true",
                    help="this session's captions name the patterns of --patterns (\"a red ball with yellow "
                         "stripes\"; recorded per session)")
    ap.add_argument("--two-objects", type=float,
                    help=f"share of this session's UNet scenes with two objects (default {P_TWO_OBJECTS}, the run's)")
    ap.add_argument("--object-weight", type=float, default=1.0,
                    help="this session's UNet loss weighs object pixels this many times the background's "
                         "(per latent pixel by its object share; default 1, the plain loss)")
    ap.add_argument("--rewarm", type=float,
                    help="extending the UNet's budget: warm up again to this share of the peak learning rate and "
                         "cool down over the extension (default: the whole run's schedule stretches)")
    ap.add_argument("--decoder-patterns", type=float, default=0.0,
                    help="share of objects with any world pattern (faces on toys, marks on boxes preferred) in the "
                         "decoder stage's scenes (default 0: the flat world; recorded per session)")
    ap.add_argument("--decoder-prefer-shape", type=float, default=DECODER_PREFER_SHAPE,
                    help="of the decoder stage's patterned objects, the share of toys drawn with a face and boxes "
                         f"with a mark first (default {DECODER_PREFER_SHAPE}; recorded per session)")
    ap.add_argument("--deepen", type=int,
                    help="from this session on, L transformer layers in every cross-attention block of the UNet, "
                         "the new ones starting as no-ops (needs UNet minutes left; recorded)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--session-minutes", type=float, default=float("inf"),
                    help="stop this session after M minutes and write --out from the state reached (resumable)")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default=DEFAULT_SCHEDULE,
                    help=f"noise schedule of this session's UNet steps (default {DEFAULT_SCHEDULE}; recorded per session)")
    ap.add_argument("--from", dest="from_dir", help="a model folder an earlier (unfinished) run wrote: continue "
                    "from it where the work folder is new (e.g. on another machine)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        rec = pretrain(a.out, work_dir=a.work, seed=a.seed, n_images=a.images, vae_minutes=a.vae_minutes,
                       unet_minutes=a.unet_minutes, threads=a.threads, latent_channels=a.latent_channels,
                       session_minutes=a.session_minutes, from_dir=a.from_dir, schedule=a.schedule,
                       decoder_minutes=a.decoder_minutes, patterns=a.patterns, decoder_patterns=a.decoder_patterns,
                       rewarm=a.rewarm, decoder_prefer_shape=a.decoder_prefer_shape, pair_patterns=a.pair_patterns,
                       two_objects=a.two_objects, deepen=a.deepen, pattern_words=a.pattern_words,
                       object_weight=a.object_weight)
    except UserInputError as e:  # the project's error policy: one line, exit 2
        ap.exit(2, f"error: {e}\n")
    log.info("done: %.0f CPU minutes in %d session(s) → %s", rec["cpu_minutes"], len(rec["sessions"]), a.out)


if __name__ == "__main__":
    main()
