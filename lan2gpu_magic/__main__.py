"""``python -m lan2gpu_magic``: run the demo notebook, make a key, ping a worker."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker_kernel.protocol.curve import CLIENT, ensure_keypair, key_dir
from worker_kernel.protocol.errors import Lan2GPUError
from worker_kernel.protocol.keys import default_key_file, generate_key_file

from . import demo, kernelspec


def ping(
    address: str, key_file: str | None, server_key: str | None = None, timeout: float = 10.0
) -> int:
    from .client import connect

    with connect(
        address, key_file=key_file, server_key=server_key, connect_timeout=timeout
    ) as client:
        rtt = client.ping()
        print(f"{client.info.describe()}: round trip {rtt * 1000:.2f} ms")
        for warning in client.info.warnings:
            print(f"warning: {warning}")
    return 0


def list_kernels() -> int:
    found = kernelspec.installed()
    for name, folder, body in found:
        placement = body.get("metadata", {}).get("lan2gpu", {}).get("placement", [])
        where = " ".join(placement) or "(any worker)"
        print(f"{name}  {body.get('display_name')!r}  {where}  {folder}")
    if not found:
        print("no LAN kernels installed; see `python -m lan2gpu_magic install-kernel --help`")
    return 0


def install_kernel(args: argparse.Namespace) -> int:
    names = ("worker", "gpu", "min_memory", "min_cc", "gpus", "key_file", "server_key")
    options = {name: getattr(args, name) for name in (*names, "workers", "cpu", "simulate")}
    prefix = sys.prefix if args.sys_prefix else args.prefix
    folder = kernelspec.install(
        args.name,
        args.display_name or f"Python (LAN {args.name})",
        kernelspec.placement(options),
        user=args.user,
        prefix=prefix,
    )
    print(f"installed kernelspec {args.name!r} in {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lan2gpu_magic")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="run a notebook against a local worker, print each cell's output as it finishes",
    )
    d.add_argument(
        "notebook",
        nargs="?",
        default=demo.DEFAULT_NOTEBOOK,
        help="a path, or the name of one of lan2gpu's notebooks [default %(default)s]",
    )
    d.add_argument("--timeout", type=float, default=600, help="per-cell limit in seconds")
    d.add_argument(
        "--output",
        type=Path,
        metavar="PATH",
        help="where to write the executed notebook [default: lan2gpu-demo/NAME in the "
        "temporary folder]",
    )
    k = sub.add_parser("keygen", help="create a shared key file (mode 0600)")
    k.add_argument("--key-file", default=str(default_key_file()))
    i = sub.add_parser(
        "install-kernel",
        help="install a kernelspec whose kernels run on a LAN worker (for IDEs)",
        description="Install a Jupyter kernelspec: JupyterLab, Notebook, VS Code, PyCharm and "
        "`jupyter console --kernel NAME` then start kernels on a worker that fits.",
    )
    i.add_argument("--name", required=True)
    i.add_argument("--display-name", help="default: 'Python (LAN NAME)'")
    where = i.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="in this Python environment")
    where.add_argument("--prefix", help="under this prefix (share/jupyter/kernels)")
    for flag, meta in (("--worker", "NAME"), ("--gpu", "PATTERN"), ("--min-memory", "SIZE"),
                       ("--min-cc", "X.Y"), ("--gpus", "N"), ("--key-file", "PATH"),
                       ("--server-key", "PATH")):  # fmt: skip
        i.add_argument(flag, metavar=meta, help="passed to the kernel's placement")
    i.add_argument("--cpu", action="store_true")
    i.add_argument("--simulate", action="store_true")
    i.add_argument("--workers", metavar="ADDR,...", help="worker addresses, if not found by mDNS")
    sub.add_parser("list-kernels", help="list installed LAN kernelspecs")
    r = sub.add_parser("remove-kernel", help="remove a LAN kernelspec")
    r.add_argument("name")
    c = sub.add_parser(
        "curve-keygen", help="create this machine's CurveZMQ key pair, for --encrypt workers"
    )
    c.add_argument("--key-file", default=str(default_key_file()))
    p = sub.add_parser("ping", help="handshake with a worker and time a round trip")
    p.add_argument("address")
    p.add_argument("--key-file")
    p.add_argument("--server-key", help="the worker's worker.key (--encrypt workers)")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the handshake [default %(default)s]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo.run(args.notebook, args.timeout, args.output)
        if args.command == "keygen":
            print(f"wrote a new key to {generate_key_file(args.key_file)} (mode 0600)")
            return 0
        if args.command == "install-kernel":
            return install_kernel(args)
        if args.command == "list-kernels":
            return list_kernels()
        if args.command == "remove-kernel":
            print(f"removed {kernelspec.remove(args.name)}")
            return 0
        if args.command == "curve-keygen":
            public, _ = ensure_keypair(key_dir(args.key_file), CLIENT)
            print(f"client public key: {public}")
            print(
                "add it to each --encrypt worker's authorized_keys directory, e.g. "
                f"scp {public} gpuhost:.config/lan2gpu/authorized_keys/$(hostname).key"
            )
            return 0
        return ping(args.address, args.key_file, args.server_key, args.timeout)
    except Lan2GPUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
