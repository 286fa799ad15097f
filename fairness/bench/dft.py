"""The adjusted-DFT iteration: the official code's flow against ours, on one model and batch.

``python -m fairness.bench dft --model tiny --out bench/results/dft-cpu.json``

Modes (each in a fresh interpreter, so peak memory is its own):

* ``official``: the official code's flow. A no-grad pass with the current model decides the
  targets, a no-grad pass with the frozen model gives the originals, then the gradient pass runs
  in micro-batches of 4 (mode ``adjusted``, checkpointed U-Net and VAE), each micro-batch's loss
  against the whole batch's targets;
* ``exact``: ours as the trainer ran it so far: originals regenerated, one pass with gradient
  (mode ``adjusted``, checkpointed) whose images decide the targets and receive the gradient;
* ``exact_batched`` / ``exact_batched_bank``: mode ``adjusted_batched`` with every step (the
  same gradient), originals regenerated / from the bank (precomputed, as an originals bank
  serves them);
* ``fast_k{K}``: bank + ``adjusted_batched`` through K of the T steps (unbiased estimate);
  then, on the smallest K whose every draw keeps cosine >= 0.99, the remaining levers one at a
  time (``--levers``): ``_bf16`` (bf16 autocast), ``_cl`` (channels-last U-Net and VAE),
  ``_compile`` (``torch.compile`` on the U-Net), ``_novaeckpt`` (no VAE checkpointing, where
  memory allows: one VAE forward less). SDPA attention is on in every mode
  (:func:`fairness.models.loading.load_pipeline`).

Per mode: seconds per training image (one iteration over the batch, losses included, divided
by the batch), peak memory, and the cosine of its gradient with ``exact``'s on the fixed batch
(the first draw's, and min / mean over ``--repeats`` further step draws for subsampled modes).
``generation`` compares audit sampling (:func:`fairness.dft.engine.generate`, mode ``none``) with a
plain ``StableDiffusionPipeline.__call__`` on the same model and batch, in images per second.

Models: ``tiny`` (a small SD-shaped pipeline with random weights, 64 px; on CPU only ratios mean
anything), ``sd15`` (SD-1.5 shapes with random weights, 512 px: for a GPU), or a diffusers folder
with ``--perception``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairness.bench.common import device_name, peak_memory_mb, run_case

PROMPT = "a photo of a doctor"
ATTRIBUTES = {"gender": ["male", "female"], "race": ["a", "b", "c", "d"]}
COSINE_BAR = 0.99
LEVERS: dict[str, dict[str, bool]] = {"bf16": {"autocast_bf16": True}, "cl": {"channels_last": True},
                                      "compile": {"compile_unet": True}, "novaeckpt": {"checkpoint_vae": False}}


def build_models(model: str, root: Path) -> tuple[str, str]:
    """(model folder, perception folder) for ``tiny`` / ``sd15``, built under ``root`` once."""
    from fairness.perception.tiny import build_tiny_bundle

    perception = root / "perception"
    if not perception.exists():
        build_tiny_bundle(perception, ATTRIBUTES)
    folder = root / model
    if not (folder / "model_index.json").exists():
        pipe = _tiny_shaped(64) if model == "tiny" else _sd15_shaped().to(torch.float16)  # loaded in --dtype
        pipe.save_pretrained(folder)
    return str(folder), str(perception)


def _tiny_shaped(image_size: int):
    from fairness.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, image_size=image_size)


def _sd15_shaped():
    """SD-1.5's U-Net, VAE and text encoder shapes with random weights, 77-token prompts (the
    tiny tokenizer's vocabulary: only the embedding table is smaller)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fairness.models.tiny import TINY_WORDS, dpm_solver
    from fairness.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(list(TINY_WORDS), tempfile.mkdtemp(prefix="sd15-tok-"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD-1.5's
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=dpm_solver(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@dataclasses.dataclass
class _WholeBatch:
    """The official flow's targets: decided once from the whole batch's no-grad images; each
    micro-batch's objective reads them as if gathered from the other workers."""

    arrays: list[np.ndarray]  # the whole batch's class probabilities and found flags
    rows: slice

    def all_gather(self, local: np.ndarray) -> np.ndarray:
        return next(a for a in self.arrays if a.shape[1] == local.shape[1])

    def local_slice(self, total: int) -> slice:
        return self.rows


def _take(orig, rows: slice):
    from fairness.training.objective import OriginalsInfo

    return OriginalsInfo({k: v[rows] for k, v in orig.classes.items()}, {k: v[rows] for k, v in orig.features.items()},
                         orig.found[rows])


def _images(deb, noise: torch.Tensor, steps: int, mode: str, draw: int | None) -> torch.Tensor:
    from fairness.dft.batched import step_seed

    with step_seed(draw) if draw is not None else contextlib.nullcontext():
        return deb.sample([PROMPT] * len(noise), noise, steps, mode)


def _official_iteration(deb, noise: torch.Tensor, steps: int, ot_seed: int, micro: int) -> None:
    n, obj = len(noise), deb.objective
    with torch.no_grad():
        regions, _, logits = obj.classify(deb.sample([PROMPT] * n, noise, steps, "none"))
        whole = [np.concatenate([logits[a].softmax(-1).double().cpu().numpy() for a in obj.attributes], axis=1),
                 regions.found.cpu().numpy()[:, None].astype(np.float64)]
        orig = obj.describe_originals(deb.sample_original([PROMPT] * n, noise, steps))
    for lo in range(0, n, micro):
        rows = slice(lo, min(lo + micro, n))
        images = deb.sample([PROMPT] * (rows.stop - lo), noise[rows], steps, "adjusted")
        out = obj(images, _take(orig, rows), seed=ot_seed, collective=_WholeBatch(whole, rows))
        (out.total * (rows.stop - lo) / n).backward()  # the micro-batch's share of the batch loss


def _dft_case(model: str, perception: str, batch: int, steps: int, guidance: float, repeats: int, dtype: str,
              flow: str, mode: str, grad_steps: int | None, bank: bool, autocast_bf16: bool, channels_last: bool,
              compile_unet: bool, checkpoint_vae: bool, vjp_batch: int, grad_file: str) -> dict[str, Any]:
    from fairness.config import DebiasConfig
    from fairness.models.loading import load_perception
    from fairness.seeding import image_noise, torch_generator
    from fairness.training.debiaser import Debiaser

    first_attribute = next(iter(load_perception(perception).attributes))
    cfg = DebiasConfig.model_validate({
        "model": {"path": model, "dtype": "bfloat16" if autocast_bf16 else dtype}, "perception": perception,
        "prompts": {"train": [{"prompts": [PROMPT]}]}, "target": {"marginals": {first_attribute: "uniform"}},
        "adapter": {"rank": 8}, "train": {"images_per_prompt": batch},
        "dft": {"mode": mode, "steps": steps, "guidance_scale": guidance, "grad_steps": grad_steps, "vjp_batch": vjp_batch,
                "checkpoint_vae": checkpoint_vae},
    })
    deb = Debiaser(cfg)
    gen = torch_generator(0, "bench-adapter")
    with torch.no_grad():  # a partly trained adapter: LoRA's B matrices start at 0, which hides A's gradient
        for p in deb.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * 0.02)
    if channels_last:
        deb.pipe.unet.to(memory_format=torch.channels_last)
        deb.pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        deb.pipe.unet = torch.compile(deb.pipe.unet)
    noise = image_noise(0, PROMPT, range(batch), deb.latent_shape)
    banked = None
    if bank:  # what an originals bank would serve: computed once, outside the timed iterations
        with torch.no_grad():
            banked = deb.objective.describe_originals(deb.sample_original([PROMPT] * batch, noise, steps))
    params = deb.adapter.parameters()

    def iteration(draw: int | None) -> torch.Tensor:
        for p in params:
            p.grad = None
        if flow == "official":
            _official_iteration(deb, noise, steps, ot_seed=1, micro=4)
        else:
            orig = banked
            if orig is None:
                with torch.no_grad():
                    orig = deb.objective.describe_originals(deb.sample_original([PROMPT] * batch, noise, steps))
            images = _images(deb, noise, steps, mode, draw)
            deb.objective(images, orig, seed=1).total.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double().cpu() for p in params])

    subsampled = grad_steps is not None and grad_steps < steps
    draws = [0, *range(1, repeats + 1)] if subsampled else [None] * (repeats + 1)
    grads = [iteration(draws[0])]  # warm-up, and the fixed-batch gradient
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with Clock() as clock:
        for d in draws[1:]:
            grads.append(iteration(d))
    torch.save(torch.stack(grads), grad_file)
    sec = clock.seconds / repeats
    return {"seconds_per_iteration": sec, "seconds_per_training_image": sec / batch, "clock": clock.kind,
            "wall_seconds_per_training_image": clock.wall / repeats / batch, "peak_memory_mb": peak_memory_mb()}


def _generation_case(model: str, batch: int, steps: int, guidance: float, repeats: int, dtype: str) -> dict[str, Any]:
    """Audit sampling (our loop, mode ``none``) against ``StableDiffusionPipeline.__call__``."""
    from fairness.dft.engine import SamplingConfig, generate
    from fairness.models.loading import load_pipeline
    from fairness.seeding import image_noise

    pipe = load_pipeline(model, dtype)
    c = pipe.unet.config
    noise = image_noise(0, PROMPT, range(batch), (c.in_channels, c.sample_size, c.sample_size)).to(pipe.device, pipe.unet.dtype)
    ours = SamplingConfig(num_steps=steps, guidance_scale=guidance, mode="none")
    runs = {
        "ours": lambda: generate(pipe, [PROMPT] * batch, noise, ours),
        "diffusers_pipeline": lambda: pipe(PROMPT, num_images_per_prompt=batch, latents=noise, num_inference_steps=steps,
                                           guidance_scale=guidance, output_type="pt").images,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved, so a change in the machine's load hits both alike
            for name, fn in runs.items():
                with Clock() as clock:
                    fn()
                times[name].append(clock.seconds)
    out: dict[str, Any] = {name: {"images_per_second": batch / float(np.median(t))} for name, t in times.items()}
    out["ratio_ours_over_pipeline"] = out["ours"]["images_per_second"] / out["diffusers_pipeline"]["images_per_second"]
    return out


class Clock:
    """Seconds of a block: CUDA wall time (synchronised); on CPU this process's CPU time, which a
    machine shared with other jobs does not inflate (the bench runs one thread per process)."""

    def __enter__(self) -> "Clock":
        self.kind = "wall" if torch.cuda.is_available() else "process_cpu"
        self._t0, self._w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._w0
        self.seconds = self.wall if self.kind == "wall" else time.process_time() - self._t0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _call(kind: str, case: dict[str, Any], in_process: bool) -> dict[str, Any]:
    """One case in a fresh interpreter (its own peak memory), or here (``--in-process``: quick,
    for tests; peak memory is then the whole run's)."""
    if in_process:
        return (_dft_case if kind == "dft" else _generation_case)(**case)
    return run_case(["dft"], {"kind": kind, **case})


def run(model: str, perception: str, batch: int, steps: int, guidance: float, repeats: int, dtype: str,
        ks: list[int], vjp_batch: int, levers: list[str], work: Path, in_process: bool = False) -> dict[str, Any]:
    base = {"model": model, "perception": perception, "batch": batch, "steps": steps, "guidance": guidance,
            "repeats": repeats, "dtype": dtype, "vjp_batch": vjp_batch}
    off = {"bank": False, "autocast_bf16": False, "channels_last": False, "compile_unet": False, "checkpoint_vae": True,
           "grad_steps": None}
    specs: dict[str, dict[str, Any]] = {
        "official": {**off, "flow": "official", "mode": "adjusted"},
        "exact": {**off, "flow": "ours", "mode": "adjusted"},
        "exact_batched": {**off, "flow": "ours", "mode": "adjusted_batched"},
        "exact_batched_bank": {**off, "flow": "ours", "mode": "adjusted_batched", "bank": True},
    }
    specs |= {f"fast_k{k}": {**specs["exact_batched_bank"], "grad_steps": k} for k in ks if k < steps}
    modes: dict[str, Any] = {}
    grads: dict[str, torch.Tensor] = {}

    def measure(name: str) -> None:
        grad_file = str(work / f"grad-{name}.pt")
        res = _call("dft", {**base, **specs[name], "grad_file": grad_file}, in_process)
        grads[name] = torch.load(grad_file)
        modes[name] = {"levers": specs[name], **res}
        print(f"{name}: {res['seconds_per_training_image']:.4f} s/image", flush=True)

    def cosines(name: str) -> None:
        g = grads[name]
        modes[name]["cosine_vs_exact"] = _cosine(g[0], grads["exact"][0])
        if specs[name]["grad_steps"] is not None:
            per_draw = [_cosine(x, grads["exact"][0]) for x in g]
            modes[name] |= {"cosine_min_over_draws": min(per_draw), "cosine_mean_over_draws": float(np.mean(per_draw)),
                            "cosine_of_draws_mean": _cosine(g.mean(0), grads["exact"][0]), "draws": len(per_draw)}

    def passes(name: str) -> bool:
        return modes[name].get("cosine_min_over_draws", modes[name]["cosine_vs_exact"]) >= COSINE_BAR

    for name in list(specs):
        measure(name)
    for name in list(specs):
        cosines(name)
    passing = [k for k in ks if f"fast_k{k}" in modes and passes(f"fast_k{k}")]
    if passing:  # the levers, one at a time on the cheapest passing K, then all that paid together
        best = f"fast_k{min(passing)}"
        paid = []
        for lever in levers:
            specs[f"{best}_{lever}"] = {**specs[best], **LEVERS[lever]}
            measure(f"{best}_{lever}")
            cosines(f"{best}_{lever}")
            seconds = modes[f"{best}_{lever}"]["seconds_per_training_image"]
            if passes(f"{best}_{lever}") and seconds < modes[best]["seconds_per_training_image"]:
                paid.append(lever)
        if len(paid) > 1:
            name = f"{best}_{'+'.join(paid)}"
            specs[name] = {**specs[best], **{k: v for lever in paid for k, v in LEVERS[lever].items()}}
            measure(name)
            cosines(name)
    official = modes["official"]["seconds_per_training_image"]
    for m in modes.values():
        m["speedup_vs_official"] = official / m["seconds_per_training_image"]
    ok = {n: m for n, m in modes.items() if passes(n)}
    fastest = min(ok, key=lambda n: ok[n]["seconds_per_training_image"])
    return {"device": device_name(), "threads": torch.get_num_threads(), **base, "grad_steps_tried": ks,
            "modes": modes, "fastest_meeting_cosine": fastest, "cosine_bar": COSINE_BAR,
            "generation": _call("generation", {"model": model, "batch": batch, "steps": steps, "guidance": guidance,
                                               "repeats": repeats, "dtype": dtype}, in_process)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairness.bench dft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, sd15 (SD-1.5 shapes, random weights) or a diffusers folder")
    parser.add_argument("--perception", default=None, help="perception bundle (default: a tiny random one)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations (and step draws) per mode")
    parser.add_argument("--grad-steps", default="2,4,5,10", help="K values to try for step subsampling")
    parser.add_argument("--vjp-batch", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="frozen weights (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--levers", default="bf16,cl,novaeckpt", help=f"levers to add one at a time to the best subsampled mode, "
                        f"of {sorted(LEVERS)} (compile: slow to build on CPU)")
    parser.add_argument("--work", default=None, help="folder for the built models (default: a temporary one)")
    parser.add_argument("--in-process", action="store_true", help="run every mode in this process (quick; shared peak memory)")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/dft-cpu.json, or dft-gpu.json on CUDA)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        kind = case.pop("kind")
        print(json.dumps(_dft_case(**case) if kind == "dft" else _generation_case(**case)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dft-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model in ("tiny", "sd15"):
        model, perception = build_models(args.model, work)
        perception = args.perception or perception
    else:
        model, perception = args.model, args.perception or build_models("tiny", work)[1]
    dtype = args.dtype or ("float16" if torch.cuda.is_available() else "float32")
    ks = [int(k) for k in args.grad_steps.split(",") if k]
    results = run(model, perception, args.batch, args.steps, args.guidance, args.repeats, dtype, ks, args.vjp_batch,
                  [x for x in args.levers.split(",") if x], work, args.in_process)
    results["command"] = "python -m fairness.bench dft " + " ".join(argv if argv is not None else [])
    out = Path(args.out or f"bench/results/dft-{'gpu' if torch.cuda.is_available() else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({n: {k: m[k] for k in ("seconds_per_training_image", "speedup_vs_official", "cosine_vs_exact")}
                      for n, m in results["modes"].items()}, indent=2))
    print(f"wrote {out}")
    return 0
