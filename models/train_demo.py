"""Train the demo pipeline (see :mod:`xdit_compile.models.demo`) from scratch on CPU.

One command, fixed seed, resumable (checkpoints in ``--work``), a progress bar per stage::

    python -m xdit_compile.models.train_demo --out models/demo/emoji-pixart

Stages: (1) the VAE (L1 + MSE reconstruction, a small KL term); (2) the latents of every
training image, whose standard deviation sets ``vae.config.scaling_factor``; (3) the DiT and the
T5 text encoder together (v-prediction on DDPM noise, 10% empty captions for classifier-free
guidance, an EMA of the weights). The EMA weights are saved as a ``PixArtSigmaPipeline`` in half
precision, with ``training.json`` (times, losses) and ``training_loss.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import demo


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _images(subjects: int | None = None) -> tuple[list[demo.Sample], torch.Tensor]:
    samples = demo.samples(demo.SUBJECTS[:subjects])
    images = torch.stack([demo.to_tensor(s.image(seed=i)) for i, s in enumerate(samples)])
    return samples, images


def train_vae(
    vae: Any, images: torch.Tensor, work: Path, args: argparse.Namespace, log: dict[str, Any]
) -> None:
    from tqdm import tqdm

    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step, losses, elapsed = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        print(f"vae: resumed at step {step} from {ckpt}")
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    while step < args.vae_steps:
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = images[torch.randint(0, len(images), (args.vae_batch,))]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        (loss + args.vae_kl * kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            _save(
                ckpt,
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "losses": losses,
                    "elapsed": time.perf_counter() - start,
                    "rng": torch.get_rng_state(),
                },
            )
    bar.close()
    vae.eval()
    log["vae"] = {
        "steps": step,
        "batch": args.vae_batch,
        "seconds": time.perf_counter() - start,
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "losses": losses,
    }


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(64):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_dit(
    components: dict[str, Any],
    samples: list[demo.Sample],
    mean: torch.Tensor,
    std: torch.Tensor,
    scale: float,
    work: Path,
    args: argparse.Namespace,
    log: dict[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    dit, te, tok = components["transformer"], components["text_encoder"], components["tokenizer"]
    noise: Any = DDPMScheduler(**demo.NOISE)
    captions = [s.caption for s in samples]
    enc = tok(
        captions + [""],
        padding="max_length",
        max_length=args.text_len,
        truncation=True,
        return_tensors="pt",
    )
    ids, mask = enc.input_ids, enc.attention_mask
    empty = len(captions)
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = {
        "transformer": {k: v.detach().clone() for k, v in dit.state_dict().items()},
        "text_encoder": {k: v.detach().clone() for k, v in te.state_dict().items()},
    }
    ckpt = work / "dit.pt"
    step, losses, elapsed = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        dit.load_state_dict(state["transformer"])
        te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        print(f"dit+t5: resumed at step {step} from {ckpt}")
    dit.train()
    te.train()
    alphas = noise.alphas_cumprod
    bar = tqdm(total=args.dit_steps, initial=step, desc="dit+t5", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    while step < args.dit_steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step > args.dit_steps * 0.7:  # cosine down over the last 30%
            frac = (step - args.dit_steps * 0.7) / (args.dit_steps * 0.3)
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(captions), (args.batch,))
        x0 = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
        rows = torch.where(torch.rand(args.batch) < args.uncond, empty, index)
        t = torch.randint(0, noise.config.num_train_timesteps, (args.batch,))
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        text = te(ids[rows], attention_mask=mask[rows])[0]
        pred = dit(
            xt,
            encoder_hidden_states=text,
            encoder_attention_mask=mask[rows],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in (("transformer", dit), ("text_encoder", te)):
                for k, v in module.state_dict().items():
                    if v.is_floating_point():
                        ema[name][k].lerp_(v.detach(), 1 - decay)
                    else:
                        ema[name][k].copy_(v)
        losses.append(float(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", lr=f"{lr:.1e}")
        if step % args.checkpoint_every == 0 or step == args.dit_steps:
            _save(
                ckpt,
                {
                    "transformer": dit.state_dict(),
                    "text_encoder": te.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema,
                    "step": step,
                    "losses": losses,
                    "elapsed": time.perf_counter() - start,
                    "rng": torch.get_rng_state(),
                },
            )
    bar.close()
    log["dit"] = {
        "steps": step,
        "batch": args.batch,
        "seconds": time.perf_counter() - start,
        "final_loss": sum(losses[-200:]) / len(losses[-200:]),
        "losses": losses,
    }
    return ema


def _plot(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "vae", "VAE (L1 + MSE)"),
        (axes[1], "dit", "DiT + T5 (v MSE)"),
    ):
        losses = torch.tensor(log[key]["losses"])
        k = max(1, len(losses) // 100)
        smooth = losses[: len(losses) // k * k].view(-1, k).mean(1)
        ax.plot(torch.arange(len(smooth)) * k, smooth)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{title}: {log[key]['seconds'] / 60:.0f} min")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=demo.demo_path())
    p.add_argument("--work", type=Path, default=Path("demo-train"), help="checkpoints (resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond", type=float, default=0.1, help="share of empty captions")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--subjects", type=int, default=None, help="first N subjects only (smoke runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    components = demo.build_components(args.seed)
    log: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    samples, images = _images(args.subjects)
    print(
        f"{len(samples)} training images of {len(demo.SUBJECTS)} subjects; font {demo.font_path()}"
    )
    vae = components["vae"]
    train_vae(vae, images, args.work, args, log)
    mean, std = encode_latents(vae, images)
    scale = 1.0 / float(mean.std())
    vae.register_to_config(scaling_factor=scale)
    log["latent"] = {"shape": list(mean.shape[1:]), "scaling_factor": scale}
    ema = train_dit(components, samples, mean, std, scale, args.work, args, log)
    components["transformer"].load_state_dict(ema["transformer"])
    components["text_encoder"].load_state_dict(ema["text_encoder"])
    from diffusers import PixArtSigmaPipeline

    pipe: Any = PixArtSigmaPipeline(**components)
    pipe.to(torch.float16)
    # transformers loads a model in its saved dtype while diffusers loads float32 by default: a
    # float16 text encoder would make `from_pretrained(path)` a mixed-precision pipeline. Its
    # weights keep the float16 rounding (1.4 MB as float32).
    pipe.text_encoder.to(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out)
    _plot(log, args.out.parent / "training_loss.png")
    for key in ("vae", "dit"):
        log[key]["losses"] = log[key]["losses"][::10]  # keep the file small
    (args.out.parent / "training.json").write_text(json.dumps(log, indent=1))
    print(
        f"saved {args.out}: vae {log['vae']['final_loss']:.4f} in "
        f"{log['vae']['seconds'] / 60:.1f} min, dit {log['dit']['final_loss']:.4f} in "
        f"{log['dit']['seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
