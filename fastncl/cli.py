"""The `fastncl` command: argument parsing and exit codes only.

    fastncl train --method METHOD [--data synthetic|emoji|PATH] [--noise RATE]
                  [--noise-file F] [--preset NAME] [--config FILE.yaml] [--out DIR] [--seed N]
                  [--backbone vse|sgr|saf] [--compile] [--amp]
                  [--resume] [key.path=value ...]
    fastncl eval RUN_DIR [RUN_DIR ...] [--split test|dev]   (several runs: their ensemble, e.g. SGRAF)
    fastncl report RUN_DIR [--epochs 5,12]
    fastncl compare RUN_DIR... [--format md|csv]
    fastncl data emoji|glyphs|icons OUT_DIR [--limit N]
    fastncl data embed SRC OUT --encoder patches|torchscript|hf|open_clip [--checkpoint PATH] ...

A problem with the input (a file, an option, a config value) is one line on stderr and exit
status 2, and leaves no half-written run folder behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastncl import Diverged, FastnclError, __version__
from fastncl.config import ModelConfig, option_choices, parse_override


# `fastncl train` flags that set one config value: argparse dest -> config path
FLAG_PATHS = {"data": "data.source", "noise": "data.noise", "noise_file": "data.noise_file", "out": "out",
              "seed": "seed", "device": "runtime.device", "progress": "runtime.progress", "backbone": "model.backbone",
              "compile": "runtime.compile", "amp": "runtime.amp", "tensorboard": "runtime.tensorboard"}


def _parser(methods: tuple[str, ...] = (), preset_names: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The command line; ``methods`` and ``preset_names`` (from the method registry, which imports
    torch) are given for `fastncl train` only, so that the other commands start light."""
    p = argparse.ArgumentParser(prog="fastncl", description="Noisy correspondence learning, fast.")
    p.add_argument("--version", action="version", version=f"fastncl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train two co-teaching models and evaluate the best checkpoint")
    t.add_argument("--method", choices=methods or None, help="default: sps, or the preset's method")
    t.add_argument("--data", help="'synthetic' (the embedded default), 'emoji', 'glyphs' or 'icons' (real sets, built on first use), "
                   "'synthetic-f30k' (Flickr30K shapes, for benchmarks) or a SCAN/NCR precomputed-feature folder")
    t.add_argument("--noise", type=float, help="NCR-protocol noise rate in [0, 1)")
    t.add_argument("--noise-file", help="caption -> image index (.npy) saved by an earlier run")
    t.add_argument("--preset", help=f"one of: {', '.join(preset_names)}" if preset_names else "a preset name")
    t.add_argument("--config", help="YAML file with config values")
    t.add_argument("--out", help="run folder (default: runs/<method>-noise<r>-seed<s>-<time>)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--backbone", choices=option_choices(ModelConfig, "backbone"), help="vse (default), or the papers' sgr / saf")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the backbones (with CUDA graphs on a GPU: runtime.cuda_graphs)")
    t.add_argument("--amp", action="store_const", const="auto",
                   help="mixed precision: bf16 autocast where supported (fp16 with a gradient scaler: "
                        "runtime.amp=fp16 instead of --amp)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    t.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log the metrics and loss histograms to RUN/tb (needs the tensorboard package)")
    t.add_argument("overrides", nargs="*", metavar="key.path=value", help="any config value, e.g. optim.epochs=20")

    e = sub.add_parser("eval", help="evaluate a run's best checkpoint; several runs: their ensemble (SGRAF)")
    e.add_argument("run_dir", nargs="+")
    e.add_argument("--split", choices=("test", "dev"), default="test")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")

    r = sub.add_parser("report", help="report.md with figures: loss histograms, split quality, dev RSum, R@K")
    r.add_argument("run_dir")
    r.add_argument("--epochs", type=_epoch_list, help="epochs (1-based, comma-separated) of the loss histograms; "
                   "default: the first, middle and last split")

    c = sub.add_parser("compare", help="one table across run folders (method, noise, seed, data, R@K, RSum, split "
                       "AUC); runs that differ only by seed also get a mean ± std row")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--format", choices=("md", "csv"), default="md")

    d = sub.add_parser("data", help="build a dataset folder in the SCAN/NCR layout")
    dsub = d.add_subparsers(dest="data_command", required=True)
    for name, what in (("emoji", "Twemoji images with their names, 5 captions each (needs fastncl[demo])"),
                       ("glyphs", "DejaVu Sans characters with their Unicode names, one fine-grained caption each "
                                  "(needs fastncl[report])"),
                       ("icons", "Phosphor icons in two weights, 3 captions each from names, tags and categories "
                                 "(needs fastncl[icons])")):
        de = dsub.add_parser(name, help=what)
        de.add_argument("out_dir")
        de.add_argument("--limit", type=int, help="about this many images only (a small build, for tests)")
    _embed_parser(dsub)
    return p


def _embed_parser(dsub) -> None:
    from fastncl.data.encoders import GRANULARITIES, KINDS  # light: numpy only

    m = dsub.add_parser("embed", help="images with captions (a caption table or webdataset tar shards) -> a "
                        "training folder, with the built-in patches encoder or your own image encoder",
                        description="Embed images with captions into a folder that `fastncl train --data OUT` "
                        "reads. Under torchrun the ranks share the batches; a killed run resumes when started again.")
    m.add_argument("src", help="a caption table (.csv, .tsv, .jsonl: image path, caption, optional image id and "
                   "split), a .tar shard, or a folder holding one table or webdataset tar shards")
    m.add_argument("out", help="the folder to write (must not exist or be empty)")
    m.add_argument("--encoder", choices=KINDS, required=True,
                   help="patches: built-in region descriptor; torchscript: a torch.jit/torch.export file; hf: a "
                        "local CLIP-style transformers folder; open_clip: a local OpenCLIP checkpoint with --arch")
    m.add_argument("--checkpoint", help="the encoder's local file or folder (never downloaded)")
    m.add_argument("--arch", help="open_clip: the architecture name, e.g. ViT-B-32")
    m.add_argument("--image-size", type=int, help="input size (default: the checkpoint's, 224 for torchscript)")
    m.add_argument("--mean", type=_three_floats, help="per-channel normalisation mean, e.g. 0.481,0.458,0.408 "
                   "(default: the checkpoint's, else CLIP's)")
    m.add_argument("--std", type=_three_floats, help="per-channel normalisation std (default: the checkpoint's, else CLIP's)")
    m.add_argument("--granularity", choices=GRANULARITIES, help="image: one vector per image (default; --backbone vse); "
                   "tokens: the encoder's patch tokens or regions (--backbone sgr|saf; the patches encoder's only one)")
    m.add_argument("--dtype", choices=("float16", "float32"), help="default: float32 for patches, float16 otherwise")
    m.add_argument("--captions-per-image", type=int, help="K captions per image (default: the most common count; "
                   "images with more keep their first K, images with fewer are skipped)")
    m.add_argument("--dev-images", type=int, help="without a split column: dev images drawn by image id "
                   "(default: min(1000, 10%% of the images))")
    m.add_argument("--test-images", type=int, help="without a split column: test images drawn by image id (same default)")
    for role in ("image", "caption", "id", "split"):
        m.add_argument(f"--{role}-column", help=f"the caption table's {role} column (default: found by its name)")
    m.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                   help="an image that cannot be read or decoded: skip it and list it in OUT/skipped.txt (default), "
                        "or stop with an error")
    m.add_argument("--batch-size", type=int, default=64, help="images per encoder call (fixes the output bytes)")
    m.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torch encoders)")
    m.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar with images/s (default: when stderr is a terminal)")


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values


def _epoch_list(text: str) -> list[int]:
    try:
        epochs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None
    if not epochs or min(epochs) < 1:
        raise argparse.ArgumentTypeError(f"expected epoch numbers from 1, got {text!r}")
    return epochs


def _train(args) -> int:
    from fastncl.config import from_dict, load_yaml, resolve
    from fastncl.train import train

    if args.resume:
        if not args.out:
            raise FastnclError("--resume: give the run folder with --out")
        # --progress only changes how the resumed run shows itself
        others = [f"--{dest.replace('_', '-')}" for dest in ("method", "preset", "config", *FLAG_PATHS)
                  if dest not in ("out", "progress") and getattr(args, dest) is not None]
        if others or args.overrides:
            raise FastnclError(f"--resume continues with {args.out}/config.yaml; drop {', '.join(others + args.overrides)}")
        cfg_path = Path(args.out) / "config.yaml"
        if not cfg_path.exists():
            raise FastnclError(f"--resume: {cfg_path} does not exist")
        cfg = from_dict(load_yaml(cfg_path), str(cfg_path))
        cfg.out = args.out
        if args.progress is not None:
            cfg.runtime.progress = args.progress
        train(cfg, resume=True)
        return 0
    overrides = [parse_override(o) for o in args.overrides]
    overrides += [(path, getattr(args, dest)) for dest, path in FLAG_PATHS.items() if getattr(args, dest) is not None]
    cfg = resolve(preset=args.preset, config_file=args.config, overrides=overrides, method=args.method)
    train(cfg)
    return 0


def _eval(args) -> int:
    from fastncl.evaluation import evaluate_run

    print(evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint))
    return 0


def _report(args) -> int:
    from fastncl.report import write_report

    path, text = write_report(args.run_dir, epochs=args.epochs)
    print(text)
    print(f"report written to {path} (figures in {path.parent / 'report'})")
    return 0


def _compare(args) -> int:
    from fastncl.compare import compare_rows, compare_table

    print(compare_table(compare_rows(args.run_dirs), args.format), end="")
    return 0


def _data(args) -> int:
    if args.data_command == "embed":
        return _embed(args)
    from fastncl.data import builtin

    if args.limit is not None and args.limit < 10:
        raise FastnclError(f"--limit: at least 10 images, got {args.limit}")
    data_set = builtin.module(args.data_command)
    out = data_set.build(args.out_dir, limit=args.limit)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    k = manifest["captions_per_image"]
    print(f"{args.data_command} data written to {out}: " + ", ".join(f"{s} {n} images" for s, n in manifest["images"].items())
          + f", {k} caption{'s' if k > 1 else ''} each ({data_set.CREDIT}; see ATTRIBUTION.txt)")
    return 0


def _embed(args) -> int:
    from fastncl.data.embed import EmbedOptions, embed

    if args.threads is not None:
        if args.threads < 1:
            raise FastnclError(f"--threads {args.threads}: at least 1")
        import torch

        torch.set_num_threads(args.threads)
    columns = {role: getattr(args, f"{flag}_column") for role, flag in
               (("image", "image"), ("caption", "caption"), ("image_id", "id"), ("split", "split"))}
    options = EmbedOptions(
        encoder=args.encoder, checkpoint=args.checkpoint, arch=args.arch, image_size=args.image_size, mean=args.mean,
        std=args.std, granularity=args.granularity, dtype=args.dtype, captions_per_image=args.captions_per_image,
        dev_images=args.dev_images, test_images=args.test_images, columns={k: v for k, v in columns.items() if v},
        on_bad_image=args.on_bad_image, batch_size=args.batch_size, workers=args.workers, device=args.device,
        progress=args.progress)
    manifest = embed(args.src, args.out, options)
    if os.environ.get("RANK", "0") in ("0", ""):
        print(f"{args.out}: " + ", ".join(f"{s} {n} images" for s, n in manifest["images"].items())
              + f", {manifest['captions_per_image']} captions each, vectors {manifest['regions']} x "
              f"{manifest['feature_dim']} {manifest['dtype']}; train with: fastncl train --data {args.out}")
    return 0


def _say(kind: str, message, error: Exception) -> None:
    """The one line of an error. Under torchrun every rank meets the same error (the config, or
    errors the ranks agreed on: fastncl.distributed) and rank 0 says it; an error only one rank
    met (``rank_only``) is said by that rank, named."""
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else "0"
    if rank in ("0", ""):
        print(f"fastncl: {kind}: {message}", file=sys.stderr)
    elif getattr(error, "rank_only", None) is not None:
        print(f"fastncl: {kind}: rank {rank}: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    methods = preset_names = ()
    if argv[:1] == ["train"]:  # the registry (built-in methods and installed plug-ins) for its choices
        from fastncl.config import presets
        from fastncl.methods import registry

        try:
            methods, preset_names = registry.names(), tuple(presets())
        except FastnclError as e:
            print(f"fastncl: error: {e}", file=sys.stderr)
            return 2
    parser = _parser(methods, preset_names)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # key=value overrides may sit between options
        is_override = {x: "=" in x and not x.startswith("-") for x in extra}
        args.overrides += [x for x in extra if is_override[x]]
        extra = [x for x in extra if not is_override[x]]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        commands = {"train": _train, "eval": _eval, "report": _report, "compare": _compare, "data": _data}
        return commands[args.command](args)
    except FastnclError as e:
        _say("error", e, e)
        return 2
    except Diverged as e:  # a failed run is not a result
        _say("diverged", e, e)
        return 1
    except OSError as e:  # a file that cannot be read or written (permissions, a full disk, ...)
        where = f"{e.filename}: " if e.filename else ""
        _say("error", f"{where}{e.strerror or e}", e)
        return 2
    except KeyboardInterrupt:
        print("fastncl: interrupted", file=sys.stderr)
        return 130
