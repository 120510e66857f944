"""`iris-demo`: the whole pipeline on built-in synthetic irises, on CPU, with an HTML report.

Trains a tiny VAE and a tiny diffusion model (configs/tiny-cpu.yaml), generates N images from VAE
priors and N from pure noise with the same model and seeds, runs the circularity check on both and
identity-check on both (against the training eyes, beside N held-out eyes), and writes
`OUT/report.html` (`pipeline.demo`). Each stage runs the same code as its console script.
`--serve` opens a web page on an earlier demo's models, or on any trained VAE + diffusion pair
(`pipeline.serve`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import dump_config
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, write_text_atomic
from pipeline.demo import text_table, write_demo_report

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
HELD_OUT_SEED = 1000  # held-out eyes: the training set's generator at data.seed + this (other eyes)
QUICK = ["data.synthetic_count=128", "vae.epochs=2", "train.max_steps=40", "train.save_every=40",
         "train.sample_every=40", "train.log_every=10", "train.stats_every=20"]


SERVE_ONLY = ("vae", "diffusion", "device", "host", "port", "share")
EXAMPLES = """examples:
  iris-demo --out runs/demo               train tiny models on synthetic eyes, write runs/demo/report.html
  iris-demo --serve --out runs/demo       a web page generating from that demo's models
  iris-demo --serve --vae runs/vae/vae.keras --diffusion runs/diffusion
                                          the same page for your own runs
  iris-demo --serve --vae runs/vae/vae.keras --diffusion runs/diffusion --device cuda
                                          generate on the GPU (auto, the default, picks it when there is one)
  iris-demo --serve --vae runs/vae/vae.keras --diffusion runs/diffusion --share
                                          also a public gradio.live link (Colab: prefix the line with !)
  iris-demo --serve --out runs/demo --host 0.0.0.0 --port 8080
                                          listen on every interface, port 8080
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iris-demo", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    parser.add_argument("--n", type=int, default=None, help="images per generation mode (default 32, quick 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    web = parser.add_argument_group("web page (--serve)")
    web.add_argument("--serve", action="store_true",
                     help="serve a web page (Gradio) generating with a strength slider from --vae and --diffusion "
                          "(each one not given: the earlier demo's in --out)")
    web.add_argument("--vae", metavar="VAE.keras", help="VAE file written by train-vae (default: OUT/vae/vae.keras)")
    web.add_argument("--diffusion", metavar="RUN_DIR",
                     help="train-diffusion run or checkpoint folder (default: OUT/diffusion)")
    web.add_argument("--device", default=None, metavar="DEVICE",
                     help="auto | cpu | cuda[:N] (default auto: cuda when torch sees a GPU, else cpu)")
    web.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, this machine only)")
    web.add_argument("--port", type=int, default=None, help="port to listen on (default 7860)")
    web.add_argument("--share", action="store_true", help="also a public gradio.live link (for Colab)")
    add_config_args(parser, example="data.synthetic_count=512", default_config=str(CONFIG_DIR / "tiny-cpu.yaml"))
    return parser


def _serve(args: argparse.Namespace) -> int:
    """`--serve`: check the models and the device, then serve the page until interrupted."""
    from pipeline.serve import find_models, pick_device, serve

    cfg = config_from_args(args)
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    device = pick_device(args.device or "auto")
    models = find_models(args.vae, args.diffusion, args.out)
    serve(cfg, models, device, host=args.host or "127.0.0.1", port=args.port or 7860, share=args.share)
    return 0


def _run(main, argv: list[str]) -> None:
    """Run a console script's `main` in-process (without its exit-code wrapper)."""
    log.info("$ %s %s", main.__module__, " ".join(argv))
    main.__wrapped__(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `iris-demo`."""
    args = build_parser().parse_args(argv)
    if args.serve:
        return _serve(args)
    given = [f"--{name}" for name in SERVE_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --serve")
    if args.quick:
        args.overrides = QUICK + args.overrides
    cfg = config_from_args(args)
    n = args.n or (8 if args.quick else 32)
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    out = prepare_out_dir(args.out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    write_text_atomic(config_path, dump_config(cfg))

    from pipeline.cli import circularity_check, generate, identity_check, train_diffusion, train_vae
    from pipeline.data.synthetic import write_dataset

    timings: dict[str, float] = {}

    def stage(name: str, main, argv: list[str]) -> None:
        t0 = time.perf_counter()
        _run(main, argv)
        timings[name] = time.perf_counter() - t0

    common = ["--config", str(config_path)]
    stage("train VAE", train_vae.main, [*common, "--out", str(out / "vae"), "--overwrite"])
    stage("train diffusion", train_diffusion.main, [*common, "--out", str(out / "diffusion"), "--overwrite",
                                                    "--device", "cpu"])
    gen_args = ["--diffusion", str(out / "diffusion"), "--n", str(n), "--seed", "0", "--device", "cpu",
                "--overwrite", *common]
    stage("generate from VAE", generate.main,
          ["--from-vae", str(out / "vae" / "vae.keras"), "--save-priors", "--out", str(out / "from_vae"), *gen_args])
    stage("generate from noise", generate.main, ["--from-noise", "--out", str(out / "from_noise"), *gen_args])
    stage("circularity check", circularity_check.main,
          [str(out / "from_vae"), "--reference", str(out / "from_noise"), "--out", str(out / "check"),
           "--overwrite", "--workers", "1", *common])

    train_set = out / "train_images" if cfg.data.path == "synthetic" else Path(cfg.data.path)
    t0 = time.perf_counter()
    if cfg.data.path == "synthetic":  # the eyes the models learnt from, and unseen ones drawn the same way
        write_dataset(train_set, cfg.data.synthetic_count, cfg.data.image_size, cfg.data.seed, cfg.data.channels,
                      cfg.data.synthetic_defects, overwrite=True)
    write_dataset(out / "held_out", n, cfg.data.image_size, cfg.data.seed + HELD_OUT_SEED, cfg.data.channels,
                  overwrite=True)
    timings["write training and held-out eyes"] = time.perf_counter() - t0
    for mode in ("from_vae", "from_noise"):
        stage(f"identity check ({mode})", identity_check.main,
              [str(out / mode), "--train", str(train_set), "--reference", str(out / "held_out"),
               "--out", str(out / f"identity_{mode}"), "--overwrite", "--workers", "1", *common])

    report, table, paired = write_demo_report(out, cfg.data.image_size, cfg.data.channels, n, timings, cfg.circularity)
    print(text_table(table))
    print(paired)
    print(f"wrote {report} (headline.md, summary.png beside it)")
    return 0


if __name__ == "__main__":
    main()
