"""`facefleet models ...`: pull (the init container), verify, tiny, convert-gfpgan.

Registered lazily by facefleet/cli.py. Nothing here imports onnx, onnxruntime or torch at module
level, so `facefleet models pull` starts fast in a slim init image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facefleet.models.catalog import Catalog, CatalogError
from facefleet.models.pull import ExitCode, Puller, PullOptions

PULL_EPILOG = """\
exit codes:
  0  every requested model is present and verified
  2  usage: bad arguments, unreadable catalogue, unknown model name
  3  checksum mismatch: a source served bytes that do not match the catalogue (after retries);
     the mirror holds a different version or a corrupt copy - fix the mirror or the catalogue
  4  source unreachable: no URL delivered the file (refused, DNS, HTTP 4xx/5xx, missing file)
  5  disk or permission problem writing DEST (full, read-only, not a directory, EACCES)
  6  timed out waiting for another puller's lock on DEST/.lock (see --lock-timeout)

Files land in DEST/<file> only after their SHA-256 matched; partial downloads live in
DEST/.partial and resume on the next run; DEST/.verified holds stamps that make a re-run
on an unchanged volume cost a stat() per file.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    parser = sub.add_parser(name, help="pull, verify and generate model weights")
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    pull = commands.add_parser(
        "pull",
        help="download and verify models into DEST (init container)",
        epilog=PULL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _catalog_args(pull)
    pull.add_argument(
        "--base-url",
        metavar="URL",
        help="internal mirror: fetch <URL>/<file> instead of the catalogue URLs "
        "(http(s)://, file://, s3:// or a local directory)",
    )
    pull.add_argument("--retries", type=int, default=3, metavar="N", help="tries per URL (3)")
    pull.add_argument("--timeout", type=float, default=30.0, metavar="S", help="socket timeout")
    pull.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up (exit 6) after waiting S seconds for another puller (default: wait)",
    )
    pull.set_defaults(func=_pull)

    verify = commands.add_parser(
        "verify",
        help="check DEST against the catalogue (exit 1 listing problems)",
        description="Exit 0 when every model is present with the catalogue's size and SHA-256; "
        "exit 1 listing each problem; exit 2 on usage errors. Files without a valid "
        "verified-stamp are hashed; nothing is written.",
    )
    _catalog_args(verify)
    verify.add_argument(
        "--quick", action="store_true", help="presence, size and stamps only; never hash"
    )
    verify.set_defaults(func=_verify)

    tiny = commands.add_parser(
        "tiny", help="write tiny ONNX stand-ins with the real signatures, and their catalogue"
    )
    tiny.add_argument("--dest", type=Path, required=True, metavar="DIR")
    tiny.add_argument(
        "--dynamic-detector",
        action="store_true",
        help="give det_10g a symbolic input size like the real buffalo_l export",
    )
    tiny.set_defaults(func=_tiny)

    convert = commands.add_parser(
        "convert-gfpgan",
        help="convert GFPGANv1.4.pth to gfpgan_1.4.onnx (needs the torch extra)",
    )
    convert.add_argument("pth", type=Path, metavar="IN.pth")
    convert.add_argument("onnx", type=Path, metavar="OUT.onnx")
    convert.set_defaults(func=_convert)


def _catalog_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog",
        type=Path,
        default=None,
        metavar="FILE",
        help="catalogue YAML (default: the packaged models/catalog.yaml)",
    )
    dest = os.environ.get("FACEFLEET_MODEL_DIR")
    parser.add_argument(
        "--dest",
        type=Path,
        default=Path(dest) if dest else None,
        required=not dest,
        metavar="DIR",
        help="model directory (default: $FACEFLEET_MODEL_DIR)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAMES",
        help="comma-separated model names (repeatable); default: every non-optional entry",
    )


def _names(args: argparse.Namespace) -> list[str] | None:
    if not args.only:
        return None
    names = [n.strip() for chunk in args.only for n in chunk.split(",") if n.strip()]
    return names or None


def _pull(args: argparse.Namespace) -> int:
    try:
        catalog = Catalog.load(args.catalog)
        names = _names(args)
        catalog.select(names)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if args.retries < 1:
        print("error: --retries must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    options = PullOptions(
        base_url=args.base_url,
        attempts=args.retries,
        timeout_s=args.timeout,
        lock_timeout_s=args.lock_timeout,
    )
    report = Puller(catalog, args.dest, options).pull(names)
    if report.code != ExitCode.OK:
        failed = ", ".join(r.file for r in report.failed) or str(args.dest)
        print(f"pull failed (exit {int(report.code)}): {failed}", file=sys.stderr)
    return int(report.code)


def _verify(args: argparse.Namespace) -> int:
    try:
        catalog = Catalog.load(args.catalog)
        problems = catalog.verify_present(args.dest, _names(args), deep=not args.quick)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {args.dest} matches {catalog.source}", file=sys.stderr)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from facefleet.models.tiny import write_tiny_models

    catalog = write_tiny_models(args.dest, dynamic_detector=args.dynamic_detector)
    print(catalog)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from facefleet.models.convert_gfpgan import TorchMissing, convert

    try:
        out = convert(args.pth, args.onnx)
    except (TorchMissing, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(out)
    return 0
